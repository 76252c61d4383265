"""hallojax: audio-driven portrait-animation video DiTs in JAX / Flax NNX.

    from hallojax import load_pretrained
    model, config = load_pretrained("ckpt/wan2.1-t2v-1.3b")
    velocity = model(latents, timesteps, context)   # latents [B, F, H, W, C], channels last
"""

from hallojax.checkpoint import load_pretrained, save_pretrained
from hallojax.models.wan import DiTConfig, WanDiT

__all__ = ["DiTConfig", "WanDiT", "load_pretrained", "save_pretrained"]
__version__ = "0.1.0"
