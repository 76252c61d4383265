"""The Wan2.1 causal 3D VAE (diffusers `AutoencoderKLWan`) in Flax NNX, channels-last.

Video [B, T, H, W, 3] in [-1, 1] with T = 1 + 4k  <->  latents [B, 1 + k, H/8, W/8, 16].

Every temporal convolution is causal, so the network can run chunk by chunk in time with a small
feature cache, which bounds activation memory for long videos: the encoder sees the first frame alone,
then chunks of 4 frames; the decoder one latent frame at a time. The cache is an explicit list of
arrays (`FrameCache`, hallojax.nn.conv), one entry per cached layer in call order, with the same shapes
for every chunk after the first, so the chunks after the first run under one `lax.scan`. As in the reference:
- a causal conv with temporal kernel k caches the last k−1 frames of its (zero-padded) input;
- the encoder's temporal downsampler passes the first chunk through and then convolves
  [last frame of the previous chunk, chunk] with stride 2;
- the decoder's temporal upsampler passes the first chunk through and sees zeros in its place.

`encode` returns the posterior mean normalised with the per-channel latent mean/std (the latents the
DiT consumes); `decode` undoes that and clamps to [-1, 1]. Decoding can also be tiled in space with
linear blending of overlaps (diffusers' tiled decode), which bounds memory at high resolution.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from hallojax.models.vae_codec import VAECodec
from hallojax.nn.conv import (CausalConv3d, Conv2d, check_latents, check_video, posterior, posterior_sample,
                              run_chunked)
from hallojax.nn.layers import Dense, silu as _silu
from hallojax.nn.vae_blocks import single_head_attention, tiled_decode
from hallojax.modelconfig import DTYPES, ModelConfig, check_dtypes, with_precision

WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class VAEConfig(ModelConfig):
    """Sizes of a Wan2.1 VAE. Defaults are the released Wan2.1 VAE (diffusers config names)."""

    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "precision")

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # [sic], the reference's name
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    dtype: str = "float32"
    param_dtype: str = "float32"
    precision: str = "auto"  # matmul/conv precision (hallojax.modelconfig): auto = highest for float32

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"vae.temperal_downsample has {len(self.temperal_downsample)} entries; "
                             f"expected len(dim_mult) - 1 = {len(self.dim_mult) - 1}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"vae.latents_mean/std need {self.z_dim} entries (z_dim)")
        check_dtypes(self, "vae")

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.z_dim


class ChannelRMSNorm(nnx.Module):
    """x / max(‖x‖₂, 1e-12) · √C · γ over channels (the reference's F.normalize form), in float32."""

    def __init__(self, dim: int):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.dim = dim

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
        return (xf / jnp.maximum(norm, 1e-12) * (self.dim**0.5) * self.scale[...]).astype(x.dtype)


class ResidualBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = ChannelRMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1, **kw)
        self.norm2 = ChannelRMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1, **kw)
        self.conv_shortcut = CausalConv3d(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x, cache):
        h = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        x = self.conv1(_silu(self.norm1(x)), cache)
        x = self.conv2(_silu(self.norm2(x)), cache)
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the H·W positions of each frame."""

    def __init__(self, dim: int, *, rngs, dtype, param_dtype):
        self.norm = ChannelRMSNorm(dim)
        self.to_qkv = Dense(dim, 3 * dim, (None, None), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.proj = Dense(dim, dim, (None, None), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, cache=None):
        b, t, h, w, c = x.shape
        q, k, v = jnp.split(self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3 * c), 3, axis=-1)
        out = single_head_attention(q, k, v)
        return self.proj(out.reshape(b, t, h, w, c)) + x


class Resample(nnx.Module):
    """2x spatial down/upsampling, optionally with 2x temporal down/upsampling (see module docstring)."""

    def __init__(self, dim: int, mode: str, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = Conv2d(dim, dim // 2, 3, padding=1, **kw)
        elif mode.startswith("downsample"):
            self.resample = Conv2d(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), **kw)
        else:
            raise ValueError(f"resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), **kw)
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), **kw)
        else:
            self.time_conv = None

    def __call__(self, x, cache):
        if self.mode == "upsample3d":
            prev = cache.take()
            if prev is None:  # first chunk: passes through; the next chunk sees zeros before it
                cache.put(jnp.zeros((x.shape[0], 2, *x.shape[2:]), x.dtype))
            else:
                ctx = jnp.concatenate([prev, x], axis=1)
                cache.put(ctx[:, -2:])
                y = self.time_conv.conv(ctx)  # [B, T, H, W, 2C]: frame pairs along channels
                b, t, h, w, c2 = y.shape
                x = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c2 // 2)
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest, x2
            return self.resample(x)
        x = self.resample(x)
        if self.mode == "downsample3d":
            prev = cache.take()
            cache.put(x[:, -1:])
            if prev is not None:  # first chunk passes through
                x = self.time_conv.conv(jnp.concatenate([prev, x], axis=1))
        return x


class MidBlock(nnx.Module):
    def __init__(self, dim: int, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResidualBlock(dim, dim, **kw), ResidualBlock(dim, dim, **kw)])
        self.attentions = nnx.List([AttentionBlock(dim, **kw)])

    def __call__(self, x, cache):
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1, **kw)
        blocks, scale = [], 1.0
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout, **kw))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(cout, **kw))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(cout, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d", **kw))
                scale /= 2.0
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], **kw)
        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1, **kw)

    def __call__(self, x, cache):
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(_silu(self.norm_out(x)), cache)


class UpBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, mode: str | None, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResidualBlock(cin if j == 0 else cout, cout, **kw)
                                 for j in range(num_res_blocks + 1)])
        self.upsamplers = nnx.List([Resample(cout, mode, **kw)] if mode else [])

    def __call__(self, x, cache):
        for r in self.resnets:
            x = r(x, cache)
        for u in self.upsamplers:
            x = u(x, cache)
        return x


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        dims = [cfg.base_dim * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_up = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1, **kw)
        self.mid_block = MidBlock(dims[0], **kw)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2  # the previous upsampler halved the channels
            mode = None
            if i != len(cfg.dim_mult) - 1:
                mode = "upsample3d" if temporal_up[i] else "upsample2d"
            blocks.append(UpBlock(cin, cout, cfg.num_res_blocks, mode, **kw))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1, **kw)

    def __call__(self, x, cache):
        x = self.conv_in(x, cache)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out(_silu(self.norm_out(x)), cache)


class WanVAE(nnx.Module):
    """``vae.encode(video) -> latents``, ``vae.decode(latents) -> video`` (channels last, see module doc)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(rngs=rngs, dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype])
        with nnx.use_eager_sharding(False):  # placement happens later, from logical axes
            self.encoder = Encoder(cfg, **kw)
            self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1, **kw)
            self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1, **kw)
            self.decoder = Decoder(cfg, **kw)

    # --- shapes ---------------------------------------------------------------------------------
    def _check_video(self, video):
        check_video(video, self.cfg.in_channels, self.cfg.temporal_stride, self.cfg.spatial_stride)

    def _check_latents(self, z):
        check_latents(z, self.cfg.z_dim)

    # --- encode ---------------------------------------------------------------------------------
    @with_precision
    def encode_moments(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior (mean, logvar) [B, F, H/8, W/8, z_dim] each, unnormalised."""
        self._check_video(video)
        s = self.cfg.temporal_stride
        b, t = video.shape[:2]
        x = video.astype(DTYPES[self.cfg.dtype])

        rest = None
        if t > 1:
            rest = jnp.moveaxis(x[:, 1:].reshape(b, (t - 1) // s, s, *x.shape[2:]), 1, 0)  # [K, B, s, H, W, C]
        return posterior(self.quant_conv(run_chunked(self.encoder, x[:, :1], rest)))

    def normalize(self, z: jax.Array) -> jax.Array:
        mean = jnp.asarray(self.cfg.latents_mean, jnp.float32)
        std = jnp.asarray(self.cfg.latents_std, jnp.float32)
        return (z - mean) * (1.0 / std)

    def denormalize(self, z: jax.Array) -> jax.Array:
        mean = jnp.asarray(self.cfg.latents_mean, jnp.float32)
        std = jnp.asarray(self.cfg.latents_std, jnp.float32)
        return z.astype(jnp.float32) / (1.0 / std) + mean

    def encode(self, video: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """Normalised latents: the posterior mean, or a sample when `rng` is given."""
        mean, logvar = self.encode_moments(video)
        return self.normalize(posterior_sample(mean, logvar, rng))

    # --- decode ---------------------------------------------------------------------------------
    @with_precision
    def decode_raw(self, z: jax.Array, *, clamp: bool = True) -> jax.Array:
        """Unnormalised latents -> video (clamped to [-1, 1]), one latent frame per chunk."""
        self._check_latents(z)
        x = self.post_quant_conv(z.astype(DTYPES[self.cfg.dtype]))

        rest = jnp.moveaxis(x[:, 1:, None], 1, 0) if x.shape[1] > 1 else None  # [F-1, B, 1, h, w, C]
        video = run_chunked(self.decoder, x[:, :1], rest).astype(jnp.float32)
        return jnp.clip(video, -1.0, 1.0) if clamp else video

    def decode(self, latents: jax.Array, *, tile: int | None = None, tile_stride: int | None = None) -> jax.Array:
        """Normalised latents [B, F, h, w, z] -> video [B, 1 + 4(F−1), 8h, 8w, 3] in [-1, 1].

        tile / tile_stride (in pixels, e.g. 256 / 192): decode overlapping spatial tiles and blend the
        overlaps linearly, as diffusers' tiled decode does; None decodes the whole frame at once.
        """
        self._check_latents(latents)
        z = self.denormalize(latents)
        if tile is None:
            return self.decode_raw(z)
        video = tiled_decode(functools.partial(self.decode_raw, clamp=False), z, self.cfg.spatial_stride, tile,
                             tile_stride or tile * 3 // 4)
        return jnp.clip(video, -1.0, 1.0)  # after blending, as the reference does


class WanVAECodec(VAECodec):
    """The Wan VAE as a codec, spec "wan-vae:PATH": video [B, T, H, W, 3] <-> normalised latents
    [B, F, H/8, W/8, 16] (see `hallojax.models.vae_codec`)."""

    KIND, LABEL = "wan-vae", "Wan VAE"
    MODEL = WanVAE
