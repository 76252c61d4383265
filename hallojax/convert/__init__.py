"""Weight converters between PyTorch checkpoints and hallojax, driven by declarative name tables.

`FORMATS` is what `hallojax convert FORMAT SRC OUT` and `hallojax export FORMAT CKPT OUT` accept:
format name -> (module, import function, export function), imported on first use.
"""

from __future__ import annotations

import importlib

from hallojax.convert.table import ConversionError
from hallojax.convert.wan import convert_wan_diffusers, export_wan_diffusers

FORMATS: dict[str, tuple[str, str, str]] = {
    "wan-diffusers": ("hallojax.convert.wan", "convert_wan_diffusers", "export_wan_diffusers"),
    "wan": ("hallojax.convert.wan_original", "convert_wan_original", "export_wan_original"),
    "echomimic-v3": ("hallojax.convert.echomimic", "convert_echomimic_v3", ""),
    "clip": ("hallojax.convert.clip", "convert_clip", ""),
    "wan-vae": ("hallojax.convert.wan_vae", "convert_wan_vae", "export_wan_vae"),
    "sd-vae": ("hallojax.convert.sd_vae", "convert_sd_vae", "export_sd_vae"),
    "hunyuan-vae": ("hallojax.convert.hunyuan_vae", "convert_hunyuan_vae", "export_hunyuan_vae"),
    "wav2vec2": ("hallojax.convert.wav2vec2", "convert_wav2vec2", "export_wav2vec2"),
    "umt5": ("hallojax.convert.t5", "convert_umt5", "export_umt5"),
    "t5": ("hallojax.convert.t5", "convert_t5", "export_t5"),
    "whisper": ("hallojax.convert.whisper", "convert_whisper", "export_whisper"),
    "cogvideox": ("hallojax.convert.cogvideox", "convert_cogvideox", "export_cogvideox"),
    "hallo3": ("hallojax.convert.hallo3", "convert_hallo3", "export_hallo3"),
    "letstalk": ("hallojax.convert.letstalk", "convert_letstalk", "export_letstalk"),
    "hunyuan-video": ("hallojax.convert.hunyuan", "convert_hunyuan_diffusers", "export_hunyuan_diffusers"),
    "hunyuan-video-original": ("hallojax.convert.hunyuan", "convert_hunyuan_original", "export_hunyuan_original"),
    "cogvideox-vae": ("hallojax.convert.cogvideox_vae", "convert_cogvideox_vae", "export_cogvideox_vae"),
    "hunyuan-avatar": ("hallojax.convert.hunyuan_avatar", "convert_hunyuan_avatar", "export_hunyuan_avatar"),
}


# formats whose import reads several inputs (default: one SRC)
SOURCES: dict[str, tuple[str, ...]] = {"echomimic-v3": ("BASE_DIR", "ECHO_FILE")}


def converter(fmt: str, direction: str):
    """The import ("convert") or export function of `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {sorted(FORMATS)}")
    module, convert_name, export_name = FORMATS[fmt]
    if direction != "convert" and not export_name:
        raise ValueError(f"format {fmt!r} is import-only (there is no `hallojax export {fmt}`)")
    return getattr(importlib.import_module(module), convert_name if direction == "convert" else export_name)


__all__ = ["FORMATS", "SOURCES", "ConversionError", "converter", "convert_wan_diffusers", "export_wan_diffusers"]
