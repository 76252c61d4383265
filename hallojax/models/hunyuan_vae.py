"""The HunyuanVideo causal 3D VAE (diffusers `AutoencoderKLHunyuanVideo`, "884-16c") in Flax NNX,
channels-last.

Video [B, T, H, W, 3] in [-1, 1] with T = 1 + 4k  <->  latents [B, 1 + k, H/8, W/8, 16] · 0.476986.

Every conv is 3x3x3 (1x1x1 shortcuts), padded causally by replicating the first frame twice on the left
and the edge pixels in space; GroupNorm (32 groups, eps 1e-6) takes its statistics over (T, H, W); the
mid-block attention (one head, as wide as the channels) runs over all T·H·W positions with a causal mask
over frames. The encoder's blocks downsample by (1, 2, 2), (2, 2, 2), (2, 2, 2) (stride-2 convs on the
replicate-padded input), the decoder's upsample by (1, 2, 2), (2, 2, 2), (2, 2, 2) (nearest; in time
the first frame is kept once: 1 + 2(T − 1) frames) — `hallojax.nn.vae_blocks` holds the blocks.

Unlike the Wan VAE the whole clip runs at once: GroupNorm couples all frames (so a latent frame also
depends, through the statistics, on later frames; only convs and attention are causal). As diffusers does by
default, long clips are cut into overlapping temporal tiles that are blended linearly: decode takes
5 latent frames every 3 (17 video frames, the first dropped after the first tile, the last 4 blended),
encode 17 frames every 12 (the first latent dropped after the first tile, 1 blended). The tiles of
full length run under one `lax.map`, so activation memory stays that of one tile however long the clip
(`decode_memory` measures it). `tile`/`tile_stride` add diffusers' spatial tiling inside each tile,
its tiles of one shape under one `lax.map` too (`hallojax.nn.vae_blocks.tiled_decode`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hallojax.modelconfig import DTYPES, ModelConfig, check_dtypes, with_precision
from hallojax.models.vae_codec import VAECodec
from hallojax.nn.conv import check_latents, check_video, posterior, posterior_sample
from hallojax.nn.vae_blocks import Decoder, Encoder, VAEOps, check_widths, blend, tiled_decode


@dataclasses.dataclass(frozen=True)
class HunyuanVAEConfig(ModelConfig):
    """Sizes of an AutoencoderKLHunyuanVideo (diffusers config names); defaults are the released VAE."""

    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "precision")

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.476986
    spatial_compression_ratio: int = 8
    temporal_compression_ratio: int = 4
    dtype: str = "float32"
    param_dtype: str = "float32"
    precision: str = "auto"  # matmul/conv precision (hallojax.modelconfig): auto = highest for float32

    def __post_init__(self):
        check_widths(self, "hunyuan-vae")
        if self.temporal_compression_ratio != 4:  # the reference decoder supports 4 only
            raise ValueError(f"hunyuan-vae.temporal_compression_ratio={self.temporal_compression_ratio}: only 4")
        if self.spatial_compression_ratio not in (1, 2, 4, 8, 16, 32, 64):
            raise ValueError(f"hunyuan-vae.spatial_compression_ratio={self.spatial_compression_ratio}: a power of 2")
        check_dtypes(self, "hunyuan-vae")

    def resampling(self) -> list[tuple[int, int, int] | None]:
        """Per block i: the (t, h, w) factor block i of the encoder downsamples by (and block i of the
        decoder upsamples by), or None; the reference's rule for temporal compression 4."""
        n = len(self.block_out_channels)
        out = []
        for i in range(n):
            space = i < int(np.log2(self.spatial_compression_ratio))
            time = i >= n - 1 - int(np.log2(self.temporal_compression_ratio)) and i != n - 1
            out.append((2 if time else 1, 2 if space else 1, 2 if space else 1) if space or time else None)
        return out

    @property
    def temporal_stride(self) -> int:
        return int(np.prod([f[0] for f in self.resampling() if f]))

    @property
    def spatial_stride(self) -> int:
        return int(np.prod([f[1] for f in self.resampling() if f]))


PRESETS = {
    "hunyuan": HunyuanVAEConfig(),  # HunyuanVideo / HunyuanVideo-Avatar "884-16c-hy0801": 246.48M parameters
    "tiny": HunyuanVAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                             latent_channels=4),
}


def preset(name: str) -> HunyuanVAEConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown hunyuan-vae preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def temporal_tiles(fn, x: jax.Array, *, size: int, step: int, out_extent: int, out_step: int,
                   out_total: int) -> jax.Array:
    """diffusers' framewise (temporal-tiled) encode/decode along axis 1 of x [B, N, ...].

    Tiles x[:, i : i + size] for i = 0, step, 2·step, ...; each is run through `fn`; after the first tile
    the first output frame is dropped, the first `out_extent` frames are cross-faded with the previous
    tile's (blended) last ones, and out_step frames are kept (out_step + 1 of the first tile); the result
    is cut to out_total. Tiles of full length run under one `lax.map`, so only one tile's activations
    are live at a time; the shorter tail tiles run one by one.
    """
    n = x.shape[1]
    starts = [i for i in range(0, n, step) if i == 0 or n - i > 1]  # a 1-frame tail tile is dropped whole
    full = [i for i in starts if i + size <= n]
    outs = {}
    if full:
        stacked = jnp.stack([x[:, i:i + size] for i in full])  # [K, B, size, ...]
        mapped = jax.lax.map(fn, stacked)
        outs = {i: mapped[k] for k, i in enumerate(full)}
    tiles = [outs[i] if i in outs else fn(x[:, i:i + size]) for i in starts]
    pieces = []
    for k, tile in enumerate(tiles):
        if k > 0:
            tile = blend(tiles[k - 1], tile[:, 1:], out_extent, axis=1)
            tiles[k] = tile  # the reference blends in place: the next tile blends with this one
        pieces.append(tile[:, :out_step + (k == 0)])
    return jnp.concatenate(pieces, axis=1)[:, :out_total]


class HunyuanVAE(nnx.Module):
    """``vae.encode(video) -> latents``, ``vae.decode(latents) -> video`` (channels last, see module doc)."""

    def __init__(self, cfg: HunyuanVAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        ops = VAEOps(causal3d=True, groups=cfg.norm_num_groups, rngs=rngs, dtype=DTYPES[cfg.dtype],
                     param_dtype=DTYPES[cfg.param_dtype])
        widths, lat, factors = cfg.block_out_channels, cfg.latent_channels, cfg.resampling()
        with nnx.use_eager_sharding(False):  # placement happens later, from logical axes
            self.encoder = Encoder(cfg.in_channels, lat, widths, cfg.layers_per_block, factors, ops)
            self.quant_conv = ops.conv(2 * lat, 2 * lat, 1)
            self.post_quant_conv = ops.conv(lat, lat, 1)
            self.decoder = Decoder(lat, cfg.out_channels, widths, cfg.layers_per_block, factors, ops)

    # --- shapes ---------------------------------------------------------------------------------
    def _check_video(self, video):
        check_video(video, self.cfg.in_channels, self.cfg.temporal_stride, self.cfg.spatial_stride)

    def _check_latents(self, z):
        check_latents(z, self.cfg.latent_channels)

    # --- encode ---------------------------------------------------------------------------------
    @with_precision
    def encode_moments(self, video: jax.Array, *, frames: int | None = 16, frame_stride: int = 12):
        """Posterior (mean, logvar) [B, F, H/8, W/8, latent] each, unscaled. Clips longer than `frames`
        video frames are encoded in temporal tiles of frames + 1 every `frame_stride` (diffusers'
        default framewise encoding); frames=None encodes the clip at once."""
        self._check_video(video)
        x = video.astype(DTYPES[self.cfg.dtype])
        run = lambda v: self.quant_conv(self.encoder(v))  # noqa: E731
        st = self.cfg.temporal_stride
        if frames is None or x.shape[1] <= frames:
            return posterior(run(x))
        tile_lat, stride_lat = frames // st, frame_stride // st
        moments = temporal_tiles(run, x, size=frames + 1, step=frame_stride, out_extent=tile_lat - stride_lat,
                                 out_step=stride_lat, out_total=(x.shape[1] - 1) // st + 1)
        return posterior(moments)

    def encode(self, video: jax.Array, *, rng: jax.Array | None = None, **tiling) -> jax.Array:
        """Scaled latents: the posterior mean (or a sample when `rng` is given) times scaling_factor."""
        mean, logvar = self.encode_moments(video, **tiling)
        return posterior_sample(mean, logvar, rng) * self.cfg.scaling_factor

    # --- decode ---------------------------------------------------------------------------------
    @with_precision
    def decode_raw(self, z: jax.Array) -> jax.Array:
        """Unscaled latents -> video, the whole clip at once, not clamped (the reference's decoder)."""
        self._check_latents(z)
        return self.decoder(self.post_quant_conv(z.astype(DTYPES[self.cfg.dtype]))).astype(jnp.float32)

    def _decode_tile(self, z, tile, tile_stride):
        lt = tile // self.cfg.spatial_stride if tile else None
        if tile is None or (z.shape[2] <= lt and z.shape[3] <= lt):
            return self.decode_raw(z)
        return tiled_decode(self.decode_raw, z, self.cfg.spatial_stride, tile, tile_stride or tile * 3 // 4)

    def decode(self, latents: jax.Array, *, clamp: bool = True, frames: int | None = 16, frame_stride: int = 12,
               tile: int | None = None, tile_stride: int | None = None) -> jax.Array:
        """Scaled latents [B, F, h, w, C] -> video [B, 1 + 4(F−1), 8h, 8w, 3], clamped to [-1, 1] by default.

        frames / frame_stride (video frames): temporal tiles when F > frames / 4, as diffusers' default
        framewise decoding (None: the whole clip at once). tile / tile_stride (pixels, e.g. 256 / 192):
        spatial tiles within each, blended linearly (diffusers' enable_tiling); None: whole frames.
        """
        self._check_latents(latents)
        z = latents.astype(jnp.float32) / self.cfg.scaling_factor
        st = self.cfg.temporal_stride
        run = functools.partial(self._decode_tile, tile=tile, tile_stride=tile_stride)
        if frames is None or z.shape[1] <= frames // st:
            video = run(z)
        else:
            video = temporal_tiles(run, z, size=frames // st + 1, step=frame_stride // st,
                                   out_extent=frames - frame_stride, out_step=frame_stride,
                                   out_total=(z.shape[1] - 1) * st + 1)
        return jnp.clip(video, -1.0, 1.0) if clamp else video


def compile_decode(vae: "HunyuanVAE | HunyuanVAEConfig", latent_shape, **decode_kw) -> jax.stages.Compiled:
    """`decode` compiled ahead of time for latents [B, F, h, w, C] of `latent_shape` (a config compiles
    the abstract model: no memory). Run it as ``compiled(nnx.state(vae), latents)``;
    ``compiled.memory_analysis()`` has the bytes XLA plans for it."""
    if isinstance(vae, HunyuanVAEConfig):
        cfg = vae
        vae = nnx.eval_shape(lambda: HunyuanVAE(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(vae)
    fn = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z, **decode_kw))
    return fn.lower(state, jax.ShapeDtypeStruct(tuple(latent_shape), jnp.float32)).compile()


def decode_memory(vae, latent_shape, **decode_kw) -> dict[str, int]:
    """Bytes XLA plans for `decode` (see `compile_decode`): arguments (weights + latents), output and
    temporaries (the activations)."""
    mem = compile_decode(vae, latent_shape, **decode_kw).memory_analysis()
    return dict(argument=mem.argument_size_in_bytes, output=mem.output_size_in_bytes, temp=mem.temp_size_in_bytes)


class HunyuanVAECodec(VAECodec):
    """The HunyuanVideo VAE as a codec, spec "hunyuan-vae:PATH": video [B, 1 + 4k, H, W, 3] <-> scaled
    latents [B, 1 + k, H/8, W/8, 16] (default temporal tiling, no spatial tiling)."""

    KIND, LABEL = "hunyuan-vae", "HunyuanVideo VAE"
    MODEL = HunyuanVAE
