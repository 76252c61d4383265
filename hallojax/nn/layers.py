"""Small layers shared by every model: dense with logical axes, fp32 norms (layer, RMS, group), MLPs,
timestep embedding, the patch embedding and the remat policies of the DiTs.

Norms always compute in float32 whatever the compute dtype (as diffusers' FP32LayerNorm and the Wan
reference do): in bf16 the variance of a 5120-wide activation loses too many bits otherwise.
Every parameter carries logical axis names in its ``out_sharding`` metadata; `hallojax.sharding`
maps them to mesh axes with a per-preset rules table.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hallojax.sharding import constrain

Axes = tuple[str | None, ...]


class Dense(nnx.Module):
    """y = x·W + b with kernel [in, out] annotated with logical `axes` = (in, out), bias with (out,).

    Computed as torch does in low precision: inputs and kernel in `dtype`, float32 accumulation, the
    bias added in float32, one rounding to `dtype` at the end.
    """

    def __init__(self, in_features: int, out_features: int, axes: Axes, *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32, use_bias: bool = True,
                 kernel_init=nnx.initializers.xavier_uniform()):
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype),
                                out_sharding=tuple(axes), eager_sharding=False)
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), out_sharding=(axes[1],), eager_sharding=False)
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = jnp.einsum("...i,io->...o", x.astype(dtype), self.kernel[...].astype(dtype),
                       preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 (biased variance, like torch); affine parameters optional."""

    def __init__(self, dim: int, eps: float, *, affine: bool, axis_name: str | None = None):
        self.eps = eps
        if affine:  # norm parameters stay float32 whatever the model's param_dtype
            meta = {"out_sharding": (axis_name,), "eager_sharding": False}
            self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), **meta)
            self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), **meta)
        else:
            self.scale = self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns float32; callers cast back where the reference does."""
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale, computed in float32 and cast back to x.dtype."""

    def __init__(self, dim: int, eps: float, *, axis_name: str | None = None):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=(axis_name,), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class GroupNorm(nnx.Module):
    """torch GroupNorm on channels-last input [B, ..., C]: each of `groups` channel groups is normalised
    over its channels and every non-batch axis (biased variance), in float32, cast back to x.dtype.
    `batch_axes` leading axes index separate samples (2 on video [B, T, H, W, C]: statistics per frame)."""

    def __init__(self, channels: int, groups: int, eps: float, *, batch_axes: int = 1):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels do not split into {groups} groups")
        self.groups, self.eps, self.batch_axes = groups, eps, batch_axes
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        n = math.prod(shape[:self.batch_axes])
        xf = x.astype(jnp.float32).reshape(n, -1, self.groups, shape[-1] // self.groups)  # [B, P, G, C/G]
        mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=(1, 3), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def silu(x):
    """SiLU evaluated in float32 and rounded once to x.dtype."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def gelu_erf(x):
    return jax.nn.gelu(x, approximate=False)


class MLP(nnx.Module):
    """Linear -> activation -> Linear (diffusers FeedForward / PixArtAlphaTextProjection / TimestepEmbedding).

    The activation is evaluated in float32 on the rounded linear output and rounded once, as torch's
    GELU/SiLU kernels do for bf16 tensors.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, activation, *, axes_in: Axes, axes_out: Axes,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32, act_axes: Axes | None = None):
        self.fc1 = Dense(in_dim, hidden, axes_in, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc2 = Dense(hidden, out_dim, axes_out, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.activation = activation
        self.act_axes = act_axes

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.fc1(x)
        h = self.activation(h.astype(jnp.float32)).astype(h.dtype)
        if self.act_axes is not None:
            h = constrain(h, self.act_axes)
        return self.fc2(h)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding, [cos, sin] order (diffusers `Timesteps(flip_sin_to_cos=True, shift=0)`).

    t: [B] (float or int). Returns float32 [B, dim]. Frequencies exp(-ln(max_period) * i / half): the
    exponent in float32 as the reference computes it, the exp correctly rounded on the host (XLA's and
    torch's float32 exp each miss by an ulp here and there, which t ~ 1000–6000 magnifies to ~1e-4 rad).
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def stacked(cls, n: int, rngs: nnx.Rngs, *args, **kw):
    """n instances of cls with a leading ``layers`` axis on every parameter (for scanning)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return cls(*args, rngs=r, **kw)

    return make(rngs)


# --- patch embedding and remat policies (every DiT) ---
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
    "offload_attn_out": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["attn_out"],
        offload_src="device", offload_dst="pinned_host"),
    # every layer's input (the residual stream the layer loop carries) to pinned host memory, the rest
    # recomputed: device memory no longer grows with depth (14B at 720p, 2 samples per v5p chip)
    "offload_layer_input": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"],
        offload_src="device", offload_dst="pinned_host"),
}



def check_execution(cfg, where: str = "model") -> None:
    """How a layer stack executes, checked the same way for every model: `remat` (a REMAT_POLICIES name),
    `attention` (a kernel of hallojax.nn.attention), `scan_unroll` (>= 1 layers per loop step), the dtypes
    and the matmul precision."""
    from hallojax.modelconfig import check_dtypes
    from hallojax.nn.attention import ATTENTION_IMPLS

    if cfg.remat not in REMAT_POLICIES:
        raise ValueError(f"{where}.remat={cfg.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
    if cfg.attention not in ATTENTION_IMPLS:
        raise ValueError(f"{where}.attention={cfg.attention!r}: expected one of {ATTENTION_IMPLS}")
    if cfg.scan_unroll < 1:
        raise ValueError(f"{where}.scan_unroll={cfg.scan_unroll}: expected >= 1 (layers per loop step)")
    check_dtypes(cfg, where)

class PatchEmbed(nnx.Module):
    """Conv3d with kernel = stride = patch, as one matmul over patches. kernel [pt, ph, pw, C, D].

    Input channels-last [B, F, H, W, C]; tokens ordered (f, h, w). Also CogVideoX's per-frame Conv2d
    (patch (1, p, p)) and its 1.5 Linear over (c, pt, ph, pw)-flattened patches (converters reorder).
    """

    def __init__(self, patch, in_channels: int, dim: int, *, rngs: nnx.Rngs, dtype, param_dtype,
                 zero_from: int | None = None):
        """zero_from: input channels from this index on start at zero (conditioning channels added to
        a pretrained model contribute nothing until trained)."""
        self.patch = tuple(patch)
        init = nnx.initializers.xavier_uniform(in_axis=(0, 1, 2, 3), out_axis=4)
        kernel = init(rngs.params(), (*patch, in_channels, dim), param_dtype)
        if zero_from is not None:
            kernel = kernel.at[..., zero_from:, :].set(0)
        self.kernel = nnx.Param(kernel, out_sharding=(None, None, None, None, "embed"), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("embed",), eager_sharding=False)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        b, f, h, w, c = x.shape
        pt, ph, pw = self.patch
        x = x.reshape(b, f // pt, pt, h // ph, ph, w // pw, pw, c)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # [B, F', H', W', pt, ph, pw, C]
        x = x.reshape(b, -1, pt, ph, pw, c).astype(self.dtype)  # [B, L, pt, ph, pw, C]
        y = jnp.einsum("blthwc,thwcd->bld", x, self.kernel[...].astype(self.dtype),
                       preferred_element_type=jnp.float32)
        return (y + self.bias[...].astype(jnp.float32)).astype(self.dtype)
