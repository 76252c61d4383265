"""Weight converters between PyTorch checkpoints and hallojax, driven by declarative name tables."""

from hallojax.convert.table import ConversionError
from hallojax.convert.wan import convert_wan_diffusers, export_wan_diffusers

__all__ = ["ConversionError", "convert_wan_diffusers", "export_wan_diffusers"]
