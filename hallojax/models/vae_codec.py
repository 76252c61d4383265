"""Any of our VAEs behind the data pipeline's `Codec` protocol (`hallojax.codec`): spec "KIND:DIR".

A VAE class offers `cfg.temporal_stride`, `cfg.spatial_stride`, `cfg.latent_channels`, `_check_video`,
`_check_latents`, `encode(video)` (float32 [B, T, H, W, 3] in [-1, 1] -> the latents the DiT consumes)
and `decode(latents)` (the inverse, clamped to [-1, 1]). Each is jitted once per shape and runs on the
default device (or under the active mesh); arrays come back as numpy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class VAECodec:
    KIND = ""  # the codec name and registry kind, e.g. "wan-vae"
    MODEL: type = object  # the VAE class a directory must hold
    LABEL = ""  # e.g. "Wan VAE", for errors

    def __init__(self, vae, name: str | None = None):
        self.vae, self.name = vae, name or self.KIND
        cfg = vae.cfg
        self.temporal_stride, self.spatial_stride, self.latent_channels = (cfg.temporal_stride, cfg.spatial_stride,
                                                                           cfg.latent_channels)
        graphdef, state = nnx.split(vae)
        self._state = state
        self._encode = jax.jit(lambda s, v: nnx.merge(graphdef, s).encode(v))
        self._decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))

    @classmethod
    def load(cls, path: str | None):
        kind = cls.KIND
        if not path:
            raise ValueError(f"codec '{kind}' needs a path: '{kind}:DIR' (a directory from `hallojax convert {kind}`)")
        from hallojax.checkpoint import load_pretrained

        vae, _ = load_pretrained(path)
        if not isinstance(vae, cls.MODEL):
            raise ValueError(f"{path} holds a {type(vae).__name__}, not a {cls.LABEL}")
        return cls(vae, name=f"{kind}:{path}")

    def encode(self, video):
        self.vae._check_video(video)
        return np.asarray(self._encode(self._state, jnp.asarray(video, jnp.float32)))

    def decode(self, latents):
        self.vae._check_latents(latents)
        return np.asarray(self._decode(self._state, jnp.asarray(latents, jnp.float32)))
