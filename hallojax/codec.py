"""Video codecs: the interface between pixels and the latents the DiT is trained on.

A codec maps a video `[B, T, H, W, 3]` (float32 in [-1, 1], channels last) to latents
`[B, F, H', W', C]` and back. The data pipeline, training and sampling see only this protocol, so the
tiny lossless `PixelCodec` used by the demo and the tests and a real VAE (Wan's causal 3D VAE, stride
(4, 8, 8), 16 channels) are interchangeable. Codecs are built from a short spec string by `get_codec`:

    get_codec("pixel")       # PixelCodec(patch=1): latents are the pixels themselves
    get_codec("pixel:4")     # 4x4 space-to-depth: [B, T, H/4, W/4, 48]

    get_codec("wan-vae:DIR") # the Wan2.1 VAE from a `hallojax convert wan-vae` directory
    get_codec("sd-vae:DIR")  # the SD VAE, frame by frame (stride (1, 8, 8), 4 channels)
    get_codec("hunyuan-vae:DIR")  # the HunyuanVideo causal 3D VAE (stride (4, 8, 8), 16 channels)
    get_codec("cogvideox-vae:DIR")  # the CogVideoX VAE (stride (4, 8, 8), 16 channels; also T <= 8 in one piece)

A new codec registers a factory `arg -> Codec` under its name in `CODECS` (or with `register_codec`).
Temporal stride `s` follows the causal-VAE rule: `T = 1 + s·k` frames give `F = 1 + k`
latent frames (the first frame alone, then groups of `s`); see `latent_frames` (a codec with its own
`latent_frames(T)` method, e.g. the CogVideoX VAE's, has the last word).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Codec(Protocol):
    name: str  # the spec that rebuilds it with get_codec, e.g. "pixel:4"
    temporal_stride: int
    spatial_stride: int
    latent_channels: int

    def encode(self, video):
        """float32 `[B, T, H, W, 3]` in [-1, 1] -> latents `[B, F, H/spatial_stride, W/spatial_stride, C]`."""
        ...

    def decode(self, latents):
        """latents `[B, F, H', W', C]` -> video float32 `[B, T, H, W, 3]`."""
        ...


def latent_frames(codec: Codec, num_frames: int) -> int:
    """Latent frames F for `num_frames` video frames: the codec's own `latent_frames(T)` when it has one,
    else 1 + k for 1 + stride·k frames (other counts refused)."""
    own = getattr(codec, "latent_frames", None)
    if callable(own):
        return own(num_frames)
    s = codec.temporal_stride
    if num_frames < 1 or (num_frames - 1) % s:
        raise ValueError(f"codec {codec.name!r} (temporal stride {s}) needs 1 + {s}·k video frames, got {num_frames}")
    return 1 + (num_frames - 1) // s


def _namespace(x):
    # numpy in the data pipeline (no accelerator is touched), jax.numpy for jax arrays and under jit
    if isinstance(x, np.ndarray):
        return np
    import jax
    import jax.numpy as jnp

    return jnp if isinstance(x, jax.Array) else np


class PixelCodec:
    """Lossless space-to-depth "codec": the tiny-demo and test stand-in for a VAE.

    Each `patch × patch` block of RGB pixels becomes one latent position with `3·patch²` channels,
    ordered (dy, dx, rgb); temporal stride 1. `decode(encode(x)) == x` bit for bit, so tests of the data
    path (cropping, resampling, shards) can read exact pixels back from the stored latents.
    """

    temporal_stride = 1

    def __init__(self, patch: int = 1):
        if not isinstance(patch, (int, np.integer)) or isinstance(patch, bool) or patch < 1:
            raise ValueError(f"PixelCodec patch must be a positive integer, got {patch!r}")
        self.patch = int(patch)
        self.spatial_stride = self.patch
        self.latent_channels = 3 * self.patch**2
        self.name = "pixel" if self.patch == 1 else f"pixel:{self.patch}"

    def __repr__(self):
        return f"PixelCodec(patch={self.patch})"

    def encode(self, video):
        xp, p = _namespace(video), self.patch
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"{self.name} encode: video must be [B, T, H, W, 3], got shape {tuple(video.shape)}")
        b, t, h, w, _ = video.shape
        if h % p or w % p:
            raise ValueError(f"{self.name} encode: height and width must be multiples of {p}, got {h}x{w}")
        x = xp.reshape(video, (b, t, h // p, p, w // p, p, 3))
        x = xp.transpose(x, (0, 1, 2, 4, 3, 5, 6))  # [B, T, H', W', dy, dx, 3]
        return xp.reshape(x, (b, t, h // p, w // p, self.latent_channels))

    def decode(self, latents):
        xp, p = _namespace(latents), self.patch
        if latents.ndim != 5 or latents.shape[-1] != self.latent_channels:
            raise ValueError(f"{self.name} decode: latents must be [B, F, H', W', {self.latent_channels}], "
                             f"got shape {tuple(latents.shape)}")
        b, f, h, w, _ = latents.shape
        x = xp.reshape(latents, (b, f, h, w, p, p, 3))
        x = xp.transpose(x, (0, 1, 2, 4, 3, 5, 6))  # [B, F, H', dy, W', dx, 3]
        return xp.reshape(x, (b, f, h * p, w * p, 3))


def _pixel(arg: str | None) -> PixelCodec:
    if arg is None:
        return PixelCodec(1)
    try:
        patch = int(arg)
    except ValueError:
        raise ValueError(f"codec 'pixel:{arg}': the argument must be an integer patch size") from None
    return PixelCodec(patch)


def _wan_vae(arg: str | None) -> Codec:
    from hallojax.models.wan_vae import WanVAECodec  # imported on use: building the pixel codec needs no jax

    return WanVAECodec.load(arg)


def _sd_vae(arg: str | None) -> Codec:
    from hallojax.models.sd_vae import SDVAECodec

    return SDVAECodec.load(arg)


def _hunyuan_vae(arg: str | None) -> Codec:
    from hallojax.models.hunyuan_vae import HunyuanVAECodec

    return HunyuanVAECodec.load(arg)


def _cogvideox_vae(arg: str | None) -> Codec:
    from hallojax.models.cogvideox_vae import CogVideoXVAECodec

    return CogVideoXVAECodec.load(arg)


# name -> factory(arg or None): the extension point for codecs
CODECS: dict[str, Callable[[str | None], Codec]] = {"pixel": _pixel, "wan-vae": _wan_vae, "sd-vae": _sd_vae,
                                                    "hunyuan-vae": _hunyuan_vae, "cogvideox-vae": _cogvideox_vae}


def register_codec(name: str, factory: Callable[[str | None], Codec]) -> None:
    """Make `get_codec("NAME[:ARG]")` call `factory(ARG)` (ARG is None when absent)."""
    if ":" in name or not name:
        raise ValueError(f"codec name must be non-empty and contain no ':', got {name!r}")
    CODECS[name] = factory


def get_codec(spec: str) -> Codec:
    """Build a codec from "NAME" or "NAME:ARG" (e.g. "pixel", "pixel:4")."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"codec spec must be a non-empty string like 'pixel' or 'pixel:4', got {spec!r}")
    name, _, arg = spec.partition(":")
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r} in {spec!r}; registered: {sorted(CODECS)}")
    codec = CODECS[name](arg if arg else None)
    missing = [a for a in ("name", "temporal_stride", "spatial_stride", "latent_channels", "encode", "decode")
               if not hasattr(codec, a)]
    if missing:
        raise ValueError(f"codec factory for {name!r} returned {type(codec).__name__} without {missing}")
    return codec
