"""The Stable Diffusion VAE (diffusers `AutoencoderKL`, e.g. `stabilityai/sd-vae-ft-ema`) in Flax NNX,
channels-last, used as a per-frame video codec (LetsTalk v1's latent space).

Image [H, W, 3] in [-1, 1]  <->  latents [H/8, W/8, 4] · scaling_factor (0.18215 for SD 1.x/2.x).
A video [B, T, H, W, 3] is encoded and decoded frame by frame: every layer (2D conv, GroupNorm, the
mid-block attention over the H·W positions) acts on each frame alone, so latents are [B, T, H/8, W/8, 4]
(temporal stride 1) and frame t depends on frame t only. `frames_per_step` runs the frames through
`lax.map` that many at a time, which bounds activation memory for long clips.

Encoder: conv_in, DownEncoderBlock2D x len(block_out_channels) (`layers_per_block` ResNets, then a
stride-2 conv on a zero row/column padded at the bottom/right, except the last), mid block (ResNet,
attention, ResNet), GroupNorm, SiLU, conv_out to 2·4 channels, quant_conv (1x1) -> posterior mean and
log-variance (clipped to [-30, 20]). Decoder: post_quant_conv (1x1), conv_in, mid block,
UpDecoderBlock2D x n (layers + 1 ResNets, then nearest x2 + conv, except the last), GroupNorm, SiLU,
conv_out. GroupNorm eps 1e-6; norms, softmax and SiLU in float32 (`hallojax.nn.vae_blocks`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from hallojax.modelconfig import DTYPES, ModelConfig, check_dtypes, with_precision
from hallojax.models.vae_codec import VAECodec
from hallojax.nn.conv import check_latents, check_video, posterior, posterior_sample
from hallojax.nn.vae_blocks import Decoder, Encoder, VAEOps, check_widths


@dataclasses.dataclass(frozen=True)
class SDVAEConfig(ModelConfig):
    """Sizes of an SD-style AutoencoderKL (diffusers config names). Defaults are the SD 1.x/2.x VAE."""

    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "precision")

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    dtype: str = "float32"
    param_dtype: str = "float32"
    precision: str = "auto"  # matmul/conv precision (hallojax.modelconfig): auto = highest for float32

    def __post_init__(self):
        check_widths(self, "sd-vae")
        check_dtypes(self, "sd-vae")

    temporal_stride: ClassVar[int] = 1  # frame by frame

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


PRESETS = {
    "sd": SDVAEConfig(),  # SD 1.x / 2.x (sd-vae-ft-ema, sd-vae-ft-mse): 83.65M parameters
    "tiny": SDVAEConfig(block_out_channels=(8, 16, 16, 16), norm_num_groups=4),  # the real structure, narrow
}


def preset(name: str) -> SDVAEConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown sd-vae preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def _per_frame(fn, x: jax.Array, frames_per_step: int | None) -> jax.Array:
    """fn on [B, T, ...] whose frames are independent; with `frames_per_step`, T is mapped over that many
    frames at a time (`lax.map`) so only those frames' activations are live."""
    if frames_per_step is None or frames_per_step >= x.shape[1]:
        return fn(x)
    out = jax.lax.map(lambda frame: fn(frame[:, None])[:, 0], jnp.moveaxis(x, 1, 0), batch_size=frames_per_step)
    return jnp.moveaxis(out, 0, 1)


class SDVAE(nnx.Module):
    """``vae.encode(video) -> latents``, ``vae.decode(latents) -> video``, per frame (see module doc)."""

    def __init__(self, cfg: SDVAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        ops = VAEOps(causal3d=False, groups=cfg.norm_num_groups, rngs=rngs, dtype=DTYPES[cfg.dtype],
                     param_dtype=DTYPES[cfg.param_dtype])
        widths, n, lat = cfg.block_out_channels, len(cfg.block_out_channels), cfg.latent_channels
        resample = [(1, 2, 2)] * (n - 1) + [None]
        with nnx.use_eager_sharding(False):  # placement happens later, from logical axes
            self.encoder = Encoder(cfg.in_channels, lat, widths, cfg.layers_per_block, resample, ops)
            self.quant_conv = ops.conv(2 * lat, 2 * lat, 1)
            self.post_quant_conv = ops.conv(lat, lat, 1)
            self.decoder = Decoder(lat, cfg.out_channels, widths, cfg.layers_per_block, resample, ops)

    # --- shapes ---------------------------------------------------------------------------------
    def _check_video(self, video):
        check_video(video, self.cfg.in_channels, 1, self.cfg.spatial_stride,
                    hint=" (an image batch [N, H, W, C] is video[:, None])")

    def _check_latents(self, z):
        check_latents(z, self.cfg.latent_channels)

    # --- encode / decode ---------------------------------------------------------------------------
    @with_precision
    def encode_moments(self, video: jax.Array, *, frames_per_step: int | None = None):
        """Posterior (mean, logvar) [B, T, H/8, W/8, 4] each, unscaled."""
        self._check_video(video)
        x = video.astype(DTYPES[self.cfg.dtype])
        return posterior(_per_frame(lambda v: self.quant_conv(self.encoder(v)), x, frames_per_step))

    def encode(self, video: jax.Array, *, rng: jax.Array | None = None, frames_per_step: int | None = None):
        """Scaled latents: the posterior mean (or a sample when `rng` is given) times scaling_factor."""
        mean, logvar = self.encode_moments(video, frames_per_step=frames_per_step)
        return posterior_sample(mean, logvar, rng) * self.cfg.scaling_factor

    @with_precision
    def decode_raw(self, z: jax.Array, *, frames_per_step: int | None = None) -> jax.Array:
        """Unscaled latents -> video (not clamped): what AutoencoderKL.decode returns."""
        self._check_latents(z)
        x = z.astype(DTYPES[self.cfg.dtype])
        return _per_frame(lambda v: self.decoder(self.post_quant_conv(v)), x, frames_per_step).astype(jnp.float32)

    def decode(self, latents: jax.Array, *, clamp: bool = True, frames_per_step: int | None = None) -> jax.Array:
        """Scaled latents [B, T, h, w, 4] -> video [B, T, 8h, 8w, 3], clamped to [-1, 1] by default."""
        video = self.decode_raw(latents.astype(jnp.float32) / self.cfg.scaling_factor,
                                frames_per_step=frames_per_step)
        return jnp.clip(video, -1.0, 1.0) if clamp else video


class SDVAECodec(VAECodec):
    """The SD VAE as a codec, spec "sd-vae:PATH": video [B, T, H, W, 3] <-> scaled latents
    [B, T, H/8, W/8, 4], frame by frame (temporal stride 1)."""

    KIND, LABEL = "sd-vae", "SD VAE"
    MODEL = SDVAE
