"""Blocks of the diffusers-style VAEs, channels-last on video [B, T, H, W, C]: the ResNet block, the
mid-block attention, the encoder/decoder trunks and spatial tiled decoding, built from the shared
convolutions (`hallojax.nn.conv`) and GroupNorm (`hallojax.nn.layers`).

Two families share them through `VAEOps`:
- 2D (SD's `AutoencoderKL`, run per frame): 3x3 convs with zero padding, GroupNorm statistics and
  attention per frame, so a video is just a batch of images;
- causal 3D (`AutoencoderKLHunyuanVideo`): 3x3x3 convs padded by replicating the first frame k_t − 1
  times on the left and the edge pixels in space, GroupNorm over (T, H, W), attention over all T·H·W
  positions with a causal mask over frames (a position sees its own frame and the earlier ones).
The Wan VAE uses the attention kernel and the tiled decode from here; the CogVideoX VAE only the
shared convs and GroupNorm. Numerics: norms, softmax and SiLU in float32, convs and linears accumulate
in float32 and round once to the compute dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from hallojax.nn.conv import CausalConv3d, Conv2d
from hallojax.nn.layers import Dense, GroupNorm, silu


def single_head_attention(q, k, v, frames: int | None = None, block: int = 4096):
    """softmax(q·kᵀ/√C)·v for q, k, v [B, L, C] (one head as wide as the channels), float32 softmax.

    `frames`: the L positions are `frames` equal runs, frame-major, and a query sees the keys of its own
    and earlier frames. Longer than `block`, the queries run `block` at a time under `lax.map`, so the
    logits held are [B, block, L], not [B, L, L] (72,000 positions of a 720p 5-latent-frame tile: 1.3 GB
    a block instead of 21 GB); each query's sums are the same either way.
    """
    b, n, c = q.shape
    k_frame = jnp.arange(n) // (n // frames) if frames else None

    def attend(qb, q_frame):  # [B, l, C], [l]
        logits = jnp.einsum("blc,bmc->blm", qb, k, preferred_element_type=jnp.float32) * c**-0.5
        if frames:
            logits = jnp.where(q_frame[:, None] >= k_frame[None, :], logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("blm,bmc->blc", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)

    q_frame = k_frame if frames else jnp.zeros((n,), jnp.int32)
    if n <= block:
        return attend(q, q_frame)
    nb, pad = -(-n // block), -n % block  # padded queries see every key and are cut off after
    qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0))).reshape(b, nb, block, c).transpose(1, 0, 2, 3)
    fb = jnp.pad(q_frame, (0, pad), constant_values=frames or 0).reshape(nb, block)
    out = jax.lax.map(lambda a: attend(*a), (qb, fb))  # [nb, B, block, C]
    return out.transpose(1, 0, 2, 3).reshape(b, nb * block, c)[:, :n]


class Attention(nnx.Module):
    """diffusers' VAE mid-block attention (`Attention(..., _from_deprecated_attn_block=True)`): GroupNorm,
    one head as wide as the channels, q/k/v/out linears with bias, plus the input. Per frame, or over all
    T·H·W positions with a causal mask over frames."""

    def __init__(self, dim: int, groups: int, eps: float, *, per_frame: bool, rngs, dtype, param_dtype):
        self.group_norm = GroupNorm(dim, groups, eps, batch_axes=2 if per_frame else 1)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.to_q, self.to_k, self.to_v, self.to_out = (Dense(dim, dim, (None, None), **kw) for _ in range(4))
        self.per_frame = per_frame

    def __call__(self, x):
        b, t, h, w, c = x.shape
        y = self.group_norm(x)
        y = y.reshape(b * t, h * w, c) if self.per_frame else y.reshape(b, t * h * w, c)
        out = single_head_attention(self.to_q(y), self.to_k(y), self.to_v(y), None if self.per_frame else t)
        return self.to_out(out).reshape(x.shape) + x


# --- ResNet block, up/down samplers, trunks --------------------------------------------------------


def check_widths(cfg, where: str) -> None:
    """For a frozen VAE config's __post_init__: `block_out_channels` as a tuple, at least one, each a
    multiple of `norm_num_groups`."""
    object.__setattr__(cfg, "block_out_channels", tuple(cfg.block_out_channels))
    if not cfg.block_out_channels or any(c % cfg.norm_num_groups for c in cfg.block_out_channels):
        raise ValueError(f"{where}.block_out_channels {cfg.block_out_channels}: need at least one, each a "
                         f"multiple of norm_num_groups={cfg.norm_num_groups}")


@dataclasses.dataclass(frozen=True)
class VAEOps:
    """How a VAE family builds its layers (see the module docstring): `causal3d` False = per-frame 2D."""

    causal3d: bool
    groups: int
    rngs: nnx.Rngs
    dtype: object
    param_dtype: object
    eps: float = 1e-6

    def conv(self, cin: int, cout: int, kernel: int, stride=(1, 1, 1)):
        kw = dict(rngs=self.rngs, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.causal3d:
            return CausalConv3d(cin, cout, kernel, stride=stride, padding=kernel // 2, time_fill="first",
                                spatial_fill="edge", **kw)
        if tuple(stride) == (1, 2, 2):  # diffusers' Downsample2D(padding=0): zero row/column at the bottom/right
            return Conv2d(cin, cout, kernel, stride=2, padding=((0, 1), (0, 1)), **kw)
        if tuple(stride) != (1, 1, 1):
            raise ValueError(f"a 2D VAE cannot stride by {stride}")
        return Conv2d(cin, cout, kernel, padding=kernel // 2, **kw)

    def norm(self, dim: int) -> GroupNorm:
        return GroupNorm(dim, self.groups, self.eps, batch_axes=1 if self.causal3d else 2)

    def attention(self, dim: int) -> Attention:
        return Attention(dim, self.groups, self.eps, per_frame=not self.causal3d, rngs=self.rngs, dtype=self.dtype,
                         param_dtype=self.param_dtype)


class ResnetBlock(nnx.Module):
    """GroupNorm → SiLU → conv3 → GroupNorm → SiLU → conv3, plus the input (through a 1x1 conv when the
    width changes): diffusers' ResnetBlock2D / HunyuanVideoResnetBlockCausal3D without time embedding."""

    def __init__(self, cin: int, cout: int, ops: VAEOps):
        self.norm1, self.conv1 = ops.norm(cin), ops.conv(cin, cout, 3)
        self.norm2, self.conv2 = ops.norm(cout), ops.conv(cout, cout, 3)
        self.conv_shortcut = ops.conv(cin, cout, 1) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(silu(self.norm2(h)))
        return h + (self.conv_shortcut(x) if self.conv_shortcut is not None else x)


class Upsample(nnx.Module):
    """Nearest-neighbour upsampling by `factor` (t, h, w) then a 3x3 conv. With t = 2 the first frame
    is only upsampled in space (the causal decoder's 1 + 2(T − 1) frames)."""

    def __init__(self, dim: int, factor: Sequence[int], ops: VAEOps):
        self.conv = ops.conv(dim, dim, 3)
        self.factor = tuple(factor)

    def __call__(self, x):
        ft, fh, fw = self.factor
        x = jnp.repeat(jnp.repeat(x, fh, axis=2), fw, axis=3)
        if ft > 1 and x.shape[1] > 1:
            x = jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], ft, axis=1)], axis=1)
        return self.conv(x)


class MidBlock(nnx.Module):
    """ResNet, attention, ResNet at the narrowest resolution."""

    def __init__(self, dim: int, ops: VAEOps):
        self.resnets = nnx.List([ResnetBlock(dim, dim, ops), ResnetBlock(dim, dim, ops)])
        self.attentions = nnx.List([ops.attention(dim)])

    def __call__(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, num_layers: int, stride: Sequence[int] | None, ops: VAEOps):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, ops) for i in range(num_layers)])
        self.downsamplers = nnx.List([ops.conv(cout, cout, 3, stride)] if stride else [])

    def __call__(self, x):
        for module in (*self.resnets, *self.downsamplers):
            x = module(x)
        return x


class UpBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, num_layers: int, factor: Sequence[int] | None, ops: VAEOps):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, ops) for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample(cout, factor, ops)] if factor else [])

    def __call__(self, x):
        for module in (*self.resnets, *self.upsamplers):
            x = module(x)
        return x


class Encoder(nnx.Module):
    """conv_in → down blocks (`strides[i]` (t, h, w) or None: no downsampler) → mid block → GroupNorm,
    SiLU, conv_out to 2·latent channels (the posterior's mean and log-variance)."""

    def __init__(self, cin: int, latent: int, widths: Sequence[int], layers: int,
                 strides: Sequence[Sequence[int] | None], ops: VAEOps):
        self.conv_in = ops.conv(cin, widths[0], 3)
        self.down_blocks = nnx.List([DownBlock(widths[max(i - 1, 0)], w, layers, strides[i], ops)
                                     for i, w in enumerate(widths)])
        self.mid_block = MidBlock(widths[-1], ops)
        self.conv_norm_out = ops.norm(widths[-1])
        self.conv_out = ops.conv(widths[-1], 2 * latent, 3)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
    """conv_in → mid block → up blocks (widths reversed, layers + 1 ResNets each, `factors[i]` (t, h, w)
    or None) → GroupNorm, SiLU, conv_out."""

    def __init__(self, latent: int, cout: int, widths: Sequence[int], layers: int,
                 factors: Sequence[Sequence[int] | None], ops: VAEOps):
        rev = list(reversed(widths))
        self.conv_in = ops.conv(latent, rev[0], 3)
        self.mid_block = MidBlock(rev[0], ops)
        self.up_blocks = nnx.List([UpBlock(rev[max(i - 1, 0)], w, layers + 1, factors[i], ops)
                                   for i, w in enumerate(rev)])
        self.conv_norm_out = ops.norm(rev[-1])
        self.conv_out = ops.conv(rev[-1], cout, 3)

    def __call__(self, x):
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


# --- tiled decoding -----------------------------------------------------------------------------------


def blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """Linear cross-fade of the last `extent` rows of `a` into the first rows of `b` along `axis`."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    ramp = (jnp.arange(extent, dtype=jnp.float32) / extent).reshape((-1,) + (1,) * (b.ndim - axis - 1))
    a_tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    b_head = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
    mixed = a_tail * (1 - ramp) + b_head * ramp
    return jnp.concatenate([mixed, jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)], axis=axis)


def tiled_decode(decode_raw, z: jax.Array, spatial_stride: int, tile: int, tile_stride: int) -> jax.Array:
    """Decode z [B, F, h, w, C] in overlapping spatial tiles (sizes in pixels) and blend them.

    Each tile is blended with its upper and left neighbours *after* those were blended themselves
    (the reference blends in place), then cropped to the stride. Tiles of one shape (the full ones, and
    those cut by the bottom or right edge) run under one `lax.map`, one after the other, so activation
    memory is that of one tile, not of all of them at once."""
    lt, ls = tile // spatial_stride, tile_stride // spatial_stride
    h, w = z.shape[2:4]
    extent = tile - tile_stride
    by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i in range(0, h, ls):
        for j in range(0, w, ls):
            by_shape.setdefault((min(lt, h - i), min(lt, w - j)), []).append((i, j))
    decoded = {}
    for corners in by_shape.values():
        stacked = jnp.stack([z[:, :, i:i + lt, j:j + lt] for i, j in corners])  # [K, B, F, th, tw, C]
        outs = jax.lax.map(decode_raw, stacked) if len(corners) > 1 else decode_raw(stacked[0])[None]
        decoded.update({corner: outs[k] for k, corner in enumerate(corners)})
    rows = [[decoded[(i, j)] for j in range(0, w, ls)] for i in range(0, h, ls)]
    out_rows = []
    for i, row in enumerate(rows):
        pieces = []
        for j in range(len(row)):
            t = row[j]
            if i > 0:
                t = blend(rows[i - 1][j], t, extent, axis=2)
            if j > 0:
                t = blend(row[j - 1], t, extent, axis=3)
            row[j] = t
            pieces.append(t[:, :, :tile_stride, :tile_stride])
        out_rows.append(jnp.concatenate(pieces, axis=3))
    return jnp.concatenate(out_rows, axis=2)[:, :, :h * spatial_stride, :w * spatial_stride]
