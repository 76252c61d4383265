"""Convolutions over channels-last video [B, T, H, W, C] shared by every video VAE (Wan, CogVideoX,
HunyuanVideo, SD per frame), the chunk-by-chunk runner with a frame cache that bounds their activation
memory, and their shared input checks and posterior.

A causal 3D convolution pads only on the left in time (k_t − 1 frames): on the first chunk with zeros
(Wan) or copies of the first frame (CogVideoX, HunyuanVideo), on later chunks with the last k_t − 1
frames of the previous chunk's padded input, read from a `FrameCache`; in space with zeros (Wan,
CogVideoX) or the edge pixels (HunyuanVideo). Cache entries are matched by call order, as the
references do. All convolutions take inputs and kernels in the compute dtype and accumulate in
float32; the bias is added in float32 before one rounding back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class FrameCache:
    """Feature cache of one chunked pass: `take` the previous chunk's entry (None on the first chunk),
    `put` this chunk's; entries are matched by call order."""

    def __init__(self, entries: list | None):
        self.entries, self.new, self._i = entries, [], 0

    def take(self):
        if self.entries is None:
            return None
        self._i += 1
        return self.entries[self._i - 1]

    def put(self, value):
        self.new.append(value)


def conv_kernel_init(rngs, shape, dtype):
    fan_in = int(np.prod(shape[:-1]))
    return (jax.random.normal(rngs.params(), shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype)


TIME_FILLS = ("zeros", "first")
SPATIAL_FILLS = ("zeros", "edge")


class CausalConv3d(nnx.Module):
    """Conv3d, causal in time: 2·p_t frames on the left (zeros, or the first frame repeated when
    `time_fill="first"`; the cached frames on later chunks), none on the right; p_h, p_w on each side
    in space, zeros or (`spatial_fill="edge"`) the edge pixels repeated."""

    def __init__(self, cin: int, cout: int, kernel, *, stride=(1, 1, 1), padding=(0, 0, 0), time_fill: str = "zeros",
                 spatial_fill: str = "zeros", rngs, dtype, param_dtype):
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        padding = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        if time_fill not in TIME_FILLS or spatial_fill not in SPATIAL_FILLS:
            raise ValueError(f"time_fill {time_fill!r}, spatial_fill {spatial_fill!r}: expected one of {TIME_FILLS} "
                             f"and one of {SPATIAL_FILLS}")
        self.kernel = nnx.Param(conv_kernel_init(rngs, (*kernel, cin, cout), param_dtype))  # [kt, kh, kw, I, O]
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype))
        self.time_pad = 2 * padding[0]
        self.time_fill = time_fill
        pad = ((padding[1], padding[1]), (padding[2], padding[2]))
        # edge: padded before the conv (jnp.pad), zeros: by the conv itself
        self.edge_pad = ((0, 0), (0, 0), *pad, (0, 0)) if spatial_fill == "edge" and any(padding[1:]) else None
        self.spatial_pad = ((0, 0), (0, 0)) if spatial_fill == "edge" else pad
        self.stride = stride
        self.dtype = dtype

    def conv(self, x: jax.Array) -> jax.Array:
        if self.edge_pad is not None:
            x = jnp.pad(x, self.edge_pad, mode="edge")
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride, ((0, 0), *self.spatial_pad),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), preferred_element_type=jnp.float32)
        return (y + self.bias[...].astype(jnp.float32)).astype(self.dtype)

    def __call__(self, x: jax.Array, cache: FrameCache | None = None) -> jax.Array:
        if self.time_pad:
            prev = cache.take() if cache is not None else None
            if prev is None:
                shape = (x.shape[0], self.time_pad, *x.shape[2:])
                prev = (jnp.zeros(shape, x.dtype) if self.time_fill == "zeros"
                        else jnp.broadcast_to(x[:, :1], shape))
            x = jnp.concatenate([prev, x], axis=1)
            if cache is not None:
                cache.put(x[:, -self.time_pad:])
        return self.conv(x)


class Conv2d(nnx.Module):
    """Per-frame 2D convolution on [B, T, H, W, C]; kernel [kh, kw, I, O]."""

    def __init__(self, cin, cout, kernel, *, stride=1, padding=0, rngs, dtype, param_dtype):
        self.kernel = nnx.Param(conv_kernel_init(rngs, (kernel, kernel, cin, cout), param_dtype))
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype))
        self.stride, self.padding, self.dtype = (stride, stride), padding, dtype

    def __call__(self, x):
        b, t = x.shape[:2]
        pad = self.padding if isinstance(self.padding, tuple) else ((self.padding,) * 2,) * 2
        y = jax.lax.conv_general_dilated(
            x.reshape(b * t, *x.shape[2:]).astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride,
            pad, dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
        y = (y + self.bias[...].astype(jnp.float32)).astype(self.dtype)
        return y.reshape(b, t, *y.shape[1:])


def run_chunked(fn, first: jax.Array, rest: jax.Array | None):
    """Run `fn(chunk, cache) -> out` on `first` with a fresh `FrameCache`, then scan it over `rest`
    [K, B, t, ...], each chunk reading the cache the previous one left; returns the outputs
    concatenated in time.

    Only one chunk's activations are live at a time, and each chunk's output is written in place into
    the preallocated result (the scan's carry), so memory is one chunk plus the output, not the clip."""

    def step(chunk, entries):
        cache = FrameCache(entries)
        return fn(chunk, cache), cache.new

    out0, entries = step(first, None)
    if rest is None:
        return out0
    k = rest.shape[0]
    t = jax.eval_shape(lambda c, e: step(c, e)[0], rest[0], entries).shape[1]
    out = jnp.zeros((out0.shape[0], out0.shape[1] + k * t, *out0.shape[2:]), out0.dtype)
    out = jax.lax.dynamic_update_slice_in_dim(out, out0, 0, axis=1)

    def body(carry, i):
        entries, out = carry
        y, entries = step(rest[i], entries)
        return (entries, jax.lax.dynamic_update_slice_in_dim(out, y, out0.shape[1] + i * t, axis=1)), None

    (_, out), _ = jax.lax.scan(body, (entries, out), jnp.arange(k))
    return out


# --- the video VAEs' shared API checks and posterior ----------------------------------------------


def check_video(video, channels: int, temporal_stride: int, spatial_stride: int, *, any_frames_upto: int = 0,
                hint: str = "") -> None:
    """video [B, T, H, W, channels] with H, W multiples of `spatial_stride` and T = 1 + temporal_stride·k,
    or any T ≤ `any_frames_upto` (a VAE that encodes such clips in one piece); `hint` ends the shape error."""
    if video.ndim != 5 or video.shape[-1] != channels:
        raise ValueError(f"video has shape {tuple(video.shape)}; expected [B, T, H, W, {channels}]{hint}")
    t, h, w = video.shape[1:4]
    bad_t = (t - 1) % temporal_stride and not 1 <= t <= any_frames_upto
    if bad_t or h % spatial_stride or w % spatial_stride:
        if temporal_stride == 1:
            raise ValueError(f"video {tuple(video.shape)}: H and W must be multiples of {spatial_stride}")
        upto = f" (or at most {any_frames_upto})" if any_frames_upto else ""
        raise ValueError(f"video {tuple(video.shape)}: T must be 1 + {temporal_stride}k{upto} and H, W "
                         f"multiples of {spatial_stride}")


def check_latents(z, channels: int) -> None:
    if z.ndim != 5 or z.shape[-1] != channels:
        raise ValueError(f"latents have shape {tuple(z.shape)}; expected [B, F, H, W, {channels}]")


def posterior(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
    """diffusers' DiagonalGaussianDistribution of the encoder's moments [..., 2C]: (mean, logvar clipped
    to [-30, 20]), float32."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


def posterior_sample(mean: jax.Array, logvar: jax.Array, rng: jax.Array | None) -> jax.Array:
    """The diagonal Gaussian's mean (rng None) or a sample mean + exp(logvar / 2)·ε."""
    return mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
