"""The CogVideoX VAE (diffusers `AutoencoderKLCogVideoX`) in Flax NNX, channels-last.

Video [B, T, H, W, 3] in [-1, 1] with T = 1 + 4k  <->  latents [B, 1 + k, H/8, W/8, 16]; a clip of at
most 8 frames (one encoder chunk) may have any length, F = ceil(T / 4) (each time halving maps t frames
to ceil(t / 2): Hallo3's 3 conditioning frames -> 2 -> 1).

Layout (diffusers names, so the converter maps paths one to one): encoder = conv_in, 4 down blocks of
`layers_per_block` GroupNorm resnets (the first two also halve time, all but the last halve space),
a 2-resnet mid block, GroupNorm, conv_out to (mean, logvar); decoder = conv_in, mid block, 4 up blocks
of `layers_per_block + 1` resnets, norm_out, conv_out, where every decoder norm is a spatial norm
GroupNorm(f)·conv_y(z) + conv_b(z) conditioned on the chunk's latents z (nearest-resized to f).
No quant convs. Numerics as the reference:
- causal 3D convs pad time with copies of the first frame (`time_fill="first"`), zeros in space;
- time downsampling keeps an odd chunk's first frame and averages the rest in pairs; time upsampling
  repeats frames (nearest) except an odd chunk's first; neither looks across chunks;
- GroupNorm (eps 1e-6) statistics run over the chunk, so the chunking is part of the model: encode runs
  a first chunk of 8 + T mod 8 frames (all T when T < 16) then chunks of 8, decode a first chunk of
  2 + F mod 2 latents then chunks of 2, exactly as diffusers' `_encode` / `_decode` (untiled). The
  causal convs carry their last 2 input frames from chunk to chunk (`FrameCache`), and the chunks after
  the first run under one `lax.scan`, so activation memory is bounded by one chunk, not the clip.
`encode` returns posterior mean (or sample) × scaling_factor (0.7 for 5B, 1.15258426 for 2B), the
latents the DiT consumes; `decode` divides by it and clamps to [-1, 1] (diffusers' decode returns the
unclamped video; its pipelines clamp when post-processing: `decode_raw(clamp=False)` is that output).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hallojax.modelconfig import DTYPES, ModelConfig, check_dtypes, with_precision
from hallojax.models.vae_codec import VAECodec
from hallojax.nn.conv import (CausalConv3d, Conv2d, check_latents, check_video, posterior, posterior_sample,
                              run_chunked)
from hallojax.nn.layers import GroupNorm, silu
from hallojax.nn.vae_blocks import check_widths

ENCODE_CHUNK_FRAMES = 8  # diffusers `num_sample_frames_batch_size`
DECODE_CHUNK_LATENTS = 2  # diffusers `num_latent_frames_batch_size`


@dataclasses.dataclass(frozen=True)
class CogVideoXVAEConfig(ModelConfig):
    """Sizes of a CogVideoX VAE (diffusers config names). Defaults: the released CogVideoX-2B VAE;
    `preset("5b")` differs only in scaling_factor."""

    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "precision")
    PRESETS: ClassVar[dict[str, dict]] = {
        "2b": dict(scaling_factor=1.15258426),
        "5b": dict(scaling_factor=0.7),
        "tiny": dict(block_out_channels=(8, 16, 16, 32), latent_channels=4, layers_per_block=1, norm_num_groups=4),
    }

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: int = 4
    scaling_factor: float = 1.15258426
    invert_scale_latents: bool = False  # CogVideoX 1.5 I2V: image latents are divided by the factor
    dtype: str = "float32"
    param_dtype: str = "float32"
    precision: str = "auto"  # matmul/conv precision (hallojax.modelconfig): auto = highest for float32

    def __post_init__(self):
        check_widths(self, "cogvideox_vae")
        levels = int(np.log2(self.temporal_compression_ratio))
        if 2**levels != self.temporal_compression_ratio or levels > len(self.block_out_channels) - 1:
            raise ValueError(f"cogvideox_vae.temporal_compression_ratio={self.temporal_compression_ratio}: expected "
                             f"a power of 2 up to 2^{len(self.block_out_channels) - 1}")
        if ENCODE_CHUNK_FRAMES % self.temporal_compression_ratio:
            raise ValueError(f"cogvideox_vae.temporal_compression_ratio={self.temporal_compression_ratio} must divide "
                             f"the encoder's chunk of {ENCODE_CHUNK_FRAMES} frames")
        check_dtypes(self, "cogvideox_vae")

    @classmethod
    def preset(cls, name: str, **overrides) -> "CogVideoXVAEConfig":
        if name not in cls.PRESETS:
            raise ValueError(f"CogVideoX VAE preset {name!r}: expected one of {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    @property
    def temporal_stride(self) -> int:
        return self.temporal_compression_ratio

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def time_levels(self) -> int:
        """How many of the first down (and up) blocks halve (double) time."""
        return int(np.log2(self.temporal_compression_ratio))


# --- resampling -------------------------------------------------------------------------------------


def _modulate(n: jax.Array, y: jax.Array, b: jax.Array) -> jax.Array:
    """n · y + b with y, b [B, t, h, w, C] nearest-upsampled to n's [B, T, H, W, C] (integer ratios) by
    broadcasting, so the upsampled y and b are never materialised."""
    (bs, *big, c), small = n.shape, y.shape[1:4]
    if any(m % k for m, k in zip(big, small)):
        raise ValueError(f"spatial norm: latents {y.shape} do not divide features {n.shape}")
    split = [d for k, m in zip(small, big) for d in (k, m // k)]  # [t, T/t, h, H/h, w, W/w]
    out = n.reshape(bs, *split, c) * y[:, :, None, :, None, :, None] + b[:, :, None, :, None, :, None]
    return out.reshape(n.shape)


def _odd_split(x: jax.Array, fn_first, fn_rest) -> jax.Array:
    """The references' first-frame rule: a chunk of odd length > 1 treats frame 0 apart from the rest."""
    return jnp.concatenate([fn_first(x[:, :1]), fn_rest(x[:, 1:])], axis=1)


class Downsample(nnx.Module):
    """CogVideoXDownsample3D: (if compress_time) time average-pooling in pairs, keeping an odd chunk's
    first frame; then zero-pad right/bottom by 1 and a stride-2 3×3 conv per frame."""

    def __init__(self, dim: int, compress_time: bool, *, rngs, dtype, param_dtype):
        self.conv = Conv2d(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs, dtype=dtype,
                           param_dtype=param_dtype)
        self.compress_time = compress_time

    def __call__(self, x):
        if self.compress_time:
            def pool(x):  # [B, 2k, ...] -> [B, k, ...]
                b, t = x.shape[:2]
                xf = x.astype(jnp.float32).reshape(b, t // 2, 2, *x.shape[2:])
                return ((xf[:, :, 0] + xf[:, :, 1]) * 0.5).astype(x.dtype)

            t = x.shape[1]
            if t % 2:
                x = x if t == 1 else _odd_split(x, lambda f: f, pool)
            else:
                x = pool(x)
        return self.conv(x)


class Upsample(nnx.Module):
    """CogVideoXUpsample3D: nearest ×2 in space and (if compress_time) ×2 in time, except an odd
    chunk's first frame and a single frame; then a 3×3 conv per frame."""

    def __init__(self, dim: int, compress_time: bool, *, rngs, dtype, param_dtype):
        self.conv = Conv2d(dim, dim, 3, padding=1, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.compress_time = compress_time

    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        t = x.shape[1]
        if self.compress_time and t > 1:
            x = _odd_split(x, lambda f: f, lambda r: jnp.repeat(r, 2, axis=1)) if t % 2 else jnp.repeat(x, 2, axis=1)
        return self.conv(x)


# --- blocks -----------------------------------------------------------------------------------------


class SpatialNorm(nnx.Module):
    """CogVideoXSpatialNorm3D: GroupNorm(f) · conv_y(z) + conv_b(z), z nearest-resized to f's frames and
    size (an odd f chunk > 1 frame maps z's first frame to its first frame, the rest to the rest).
    conv_y / conv_b are 1×1×1, so they run on z before the resize (the same values, fewer FLOPs), and
    the resize is a broadcast inside the product (no full-size y and b in memory)."""

    def __init__(self, f_channels: int, z_channels: int, groups: int, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm_layer = GroupNorm(f_channels, groups, 1e-6)
        self.conv_y = CausalConv3d(z_channels, f_channels, 1, **kw)
        self.conv_b = CausalConv3d(z_channels, f_channels, 1, **kw)

    def __call__(self, f, z):
        n, y, b = self.norm_layer(f), self.conv_y(z), self.conv_b(z)
        if f.shape[1] > 1 and f.shape[1] % 2:
            return _odd_split(n, lambda n0: _modulate(n0, y[:, :1], b[:, :1]),
                              lambda n1: _modulate(n1, y[:, 1:], b[:, 1:]))
        return _modulate(n, y, b)


class ResnetBlock(nnx.Module):
    """norm1 → SiLU → conv1 → norm2 → SiLU → conv2, plus the input (1×1×1 conv when channels change).
    Norms are GroupNorm (encoder) or SpatialNorm on z (decoder, `z_channels` set)."""

    def __init__(self, cin: int, cout: int, groups: int, eps: float, z_channels: int | None, *, rngs, dtype,
                 param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        if z_channels is None:
            self.norm1, self.norm2 = GroupNorm(cin, groups, eps), GroupNorm(cout, groups, eps)
        else:
            self.norm1 = SpatialNorm(cin, z_channels, groups, **kw)
            self.norm2 = SpatialNorm(cout, z_channels, groups, **kw)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1, time_fill="first", **kw)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1, time_fill="first", **kw)
        self.conv_shortcut = CausalConv3d(cin, cout, 1, **kw) if cin != cout else None

    def _norm(self, norm, x, z):
        return norm(x) if z is None else norm(x, z)

    def __call__(self, x, cache, z=None):
        h = self.conv1(silu(self._norm(self.norm1, x, z)), cache)
        h = self.conv2(silu(self._norm(self.norm2, h, z)), cache)
        return h + (self.conv_shortcut(x) if self.conv_shortcut is not None else x)


class Block(nnx.Module):
    """A down, mid or up block: resnets, then an optional resampler (diffusers `downsamplers.0` /
    `upsamplers.0`)."""

    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, eps: float, z_channels: int | None,
                 resample: type | None = None, compress_time: bool = False, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, eps, z_channels, **kw)
                                 for i in range(num_layers)])
        samplers = [resample(cout, compress_time, **kw)] if resample is not None else []
        name = "downsamplers" if resample is Downsample else "upsamplers"
        setattr(self, name, nnx.List(samplers))
        self._samplers = name

    def __call__(self, x, cache, z=None):
        for r in self.resnets:
            x = r(x, cache, z)
        for s in getattr(self, self._samplers):
            x = s(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: CogVideoXVAEConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        ch, g, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3, padding=1, time_fill="first", **kw)
        self.down_blocks = nnx.List([
            Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, eps, None,
                  Downsample if i < len(ch) - 1 else None, i < cfg.time_levels, **kw)
            for i in range(len(ch))])
        self.mid_block = Block(ch[-1], ch[-1], 2, g, eps, None, **kw)
        self.norm_out = GroupNorm(ch[-1], g, 1e-6)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3, padding=1, time_fill="first", **kw)

    def __call__(self, x, cache):
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(silu(self.norm_out(x)), cache)


class Decoder(nnx.Module):
    def __init__(self, cfg: CogVideoXVAEConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        ch, g, eps, zc = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.norm_eps, cfg.latent_channels
        self.conv_in = CausalConv3d(zc, ch[0], 3, padding=1, time_fill="first", **kw)
        self.mid_block = Block(ch[0], ch[0], 2, g, eps, zc, **kw)
        self.up_blocks = nnx.List([
            Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, eps, zc,
                  Upsample if i < len(ch) - 1 else None, i < cfg.time_levels, **kw)
            for i in range(len(ch))])
        self.norm_out = SpatialNorm(ch[-1], zc, g, **kw)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels, 3, padding=1, time_fill="first", **kw)

    def __call__(self, z, cache):
        x = self.conv_in(z, cache)
        x = self.mid_block(x, cache, z)
        for block in self.up_blocks:
            x = block(x, cache, z)
        return self.conv_out(silu(self.norm_out(x, z)), cache)


# --- model ------------------------------------------------------------------------------------------


def _chunks(x: jax.Array, size: int) -> tuple[jax.Array, jax.Array | None]:
    """diffusers' frame batching: a first chunk of size + (n mod size) frames (all n when n < 2·size),
    then chunks of `size` stacked [K, B, size, ...] for the scan (None when there are none)."""
    n = x.shape[1]
    k = max(n // size, 1) - 1
    first = n - k * size
    if k == 0:
        return x, None
    rest = x[:, first:].reshape(x.shape[0], k, size, *x.shape[2:])
    return x[:, :first], jnp.moveaxis(rest, 1, 0)


class CogVideoXVAE(nnx.Module):
    """``vae.encode(video) -> latents``, ``vae.decode(latents) -> video`` (channels last, see module doc)."""

    def __init__(self, cfg: CogVideoXVAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(rngs=rngs, dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype])
        with nnx.use_eager_sharding(False):  # placement happens later
            self.encoder = Encoder(cfg, **kw)
            self.decoder = Decoder(cfg, **kw)

    # --- shapes ---------------------------------------------------------------------------------
    def _check_video(self, video):
        check_video(video, self.cfg.in_channels, self.cfg.temporal_stride, self.cfg.spatial_stride,
                    any_frames_upto=ENCODE_CHUNK_FRAMES)

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames `encode` returns for T video frames: each chunk's t frames halve `time_levels`
        times, t -> ceil(t / 2) (an odd chunk keeps its first frame), so 1 + 4k -> 1 + k and, in one chunk
        (T <= 8), any T -> ceil(T / 4)."""
        s, c = self.cfg.temporal_stride, ENCODE_CHUNK_FRAMES
        if num_frames < 1 or ((num_frames - 1) % s and num_frames > c):
            raise ValueError(f"CogVideoX VAE: {num_frames} video frames; expected 1 + {s}k or at most {c}")
        k = max(num_frames // c, 1) - 1  # chunks after the first (`_chunks`)
        return -(-(num_frames - k * c) // s) + k * (c // s)

    def _check_latents(self, z):
        check_latents(z, self.cfg.latent_channels)

    def num_frames(self, latent_frames: int) -> int:
        """Video frames `decode` returns for F latent frames: 1 + 4(F−1) for odd F, 4F for even F
        (diffusers' decode of an even F)."""
        s, c = self.cfg.temporal_stride, DECODE_CHUNK_LATENTS
        first = latent_frames - (max(latent_frames // c, 1) - 1) * c
        return (1 + s * (first - 1) if first % 2 else s * first) + s * (latent_frames - first)

    # --- encode ---------------------------------------------------------------------------------
    @with_precision
    def encode_moments(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior (mean, logvar) [B, F, H/8, W/8, latent_channels] each, unscaled."""
        self._check_video(video)
        return posterior(run_chunked(self.encoder, *_chunks(video.astype(DTYPES[self.cfg.dtype]),
                                                            ENCODE_CHUNK_FRAMES)))

    def encode(self, video: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """Scaled latents (× scaling_factor): the posterior mean, or a sample when `rng` is given."""
        mean, logvar = self.encode_moments(video)
        return posterior_sample(mean, logvar, rng) * self.cfg.scaling_factor

    # --- decode ---------------------------------------------------------------------------------
    @with_precision
    def decode_raw(self, z: jax.Array, *, clamp: bool = True) -> jax.Array:
        """Unscaled latents -> video, chunk by chunk (diffusers' `decode`, which does not clamp)."""
        self._check_latents(z)
        video = run_chunked(self.decoder, *_chunks(z.astype(DTYPES[self.cfg.dtype]), DECODE_CHUNK_LATENTS))
        video = video.astype(jnp.float32)
        return jnp.clip(video, -1.0, 1.0) if clamp else video

    def decode(self, latents: jax.Array, *, clamp: bool = True) -> jax.Array:
        """Scaled latents [B, F, h, w, C] -> video [B, num_frames(F), 8h, 8w, 3] in [-1, 1]."""
        self._check_latents(latents)
        return self.decode_raw(latents.astype(jnp.float32) / self.cfg.scaling_factor, clamp=clamp)


class CogVideoXVAECodec(VAECodec):
    """The CogVideoX VAE as a codec, spec "cogvideox-vae:PATH": video [B, T, H, W, 3] <-> latents
    [B, F, H/8, W/8, 16] × scaling_factor (see `hallojax.models.vae_codec`); F from `latent_frames`."""

    KIND, LABEL = "cogvideox-vae", "CogVideoX VAE"
    MODEL = CogVideoXVAE

    def latent_frames(self, num_frames: int) -> int:
        return self.vae.latent_frames(num_frames)


def decode_memory(cfg: CogVideoXVAEConfig, latent_frames: int, height: int, width: int, batch: int = 1) -> dict:
    """XLA's compiled memory of `decode` on [batch, latent_frames, height, width, C] latents, built from
    abstract parameters (nothing is allocated): {argument, output, temp} bytes."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CogVideoXVAE(cfg, rngs=nnx.Rngs(0))))
    z = jax.ShapeDtypeStruct((batch, latent_frames, height, width, cfg.latent_channels), jnp.float32)
    fn = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
    m = fn.lower(state, z).compile().memory_analysis()
    return dict(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
                temp=int(m.temp_size_in_bytes))
