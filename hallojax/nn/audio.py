"""Audio conditioning of the DiT: projecting per-video-frame speech features to audio tokens per latent
frame, and attending to them locally in time.

Input features are `[B, T, layers, D_a]`: wav2vec2 hidden states interpolated to the video fps
(`hallojax.models.encoders.wav2vec2.encode_audio`). For every video frame a window of ±w frames (clamped at
the ends) over all layers goes through an MLP to K tokens (Hallo3: w = 2, 12 layers, 32 tokens). The
video has T = 1 + 4(F − 1) frames for F latent frames of a causal VAE with temporal stride 4: the first
latent frame holds the first video frame alone, every later one 4 video frames. Two ways to align:

- ``group`` (HunyuanVideo-Avatar's convention): the first video frame's tokens are repeated 3 more
  times in front, so every latent frame owns 4 video frames' tokens: 4·K tokens per latent frame.
- ``conv`` (Hallo3's): the first frame bypasses, the other 4(F − 1) frames are compressed in time by two
  stride-2 convolutions (kernel 3, padding 1): K tokens per latent frame.

The stride (4 here) is the codec's and configurable (`audio_stride`: 1, 2 or 4): with the lossless pixel
codec of the demo (stride 1) every latent frame is one video frame.

`AudioCrossAttention` lets the video tokens of latent frame f attend only to the audio tokens of frame
f (optionally also of frames f ± e, for smooth transitions); its output projection starts at zero, so
adding it to a pretrained model changes nothing until it trains; its output can be multiplied by a face
mask (the face-aware adapter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hallojax.nn.layers import Dense, LayerNorm, RMSNorm

ALIGN_MODES = ("group", "conv")


def frames_to_latent(num_video_frames: int, stride: int = 4) -> int:
    if num_video_frames < 1 or (num_video_frames - 1) % stride:
        raise ValueError(f"{num_video_frames} video frames: expected 1 + {stride}k (causal VAE, temporal stride {stride})")
    return 1 + (num_video_frames - 1) // stride


def window_features(feats: jax.Array, w: int) -> jax.Array:
    """[B, T, layers, D] -> [B, T, 2w+1, layers, D]: frames t−w..t+w, clamped at the ends (numpy in, numpy
    out: the data loader's threads build windows without a device)."""
    t = feats.shape[1]
    idx = np.clip(np.arange(t)[:, None] + np.arange(-w, w + 1)[None, :], 0, t - 1)  # [T, 2w+1], static
    return feats[:, idx]


class AudioProjector(nnx.Module):
    """[B, T, layers, D_a] features -> [B, F, M, D_audio] tokens per latent frame (M = 4K or K)."""

    def __init__(self, *, in_layers: int, in_dim: int, window: int, hidden: int, tokens: int, out_dim: int,
                 align: str, stride: int = 4, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        """stride: the codec's temporal stride (4 for the Wan VAE, 1 for the pixel codec): video frames
        per latent frame after the first."""
        if align not in ALIGN_MODES:
            raise ValueError(f"audio align mode {align!r}: expected one of {ALIGN_MODES}")
        if stride not in (1, 2, 4):
            raise ValueError(f"audio stride {stride}: expected 1, 2 or 4 (the codec's temporal stride)")
        self.stride = stride
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.window, self.tokens, self.out_dim, self.align = window, tokens, out_dim, align
        self.in_layers, self.in_dim = in_layers, in_dim
        self.fc1 = Dense((2 * window + 1) * in_layers * in_dim, hidden, (None, "mlp"), **kw)
        self.fc2 = Dense(hidden, hidden, ("mlp", None), **kw)
        self.fc3 = Dense(hidden, tokens * out_dim, (None, "mlp"), **kw)
        # conv: log2(stride) stride-2 temporal convs, shared over tokens: kernel [3, D, D]
        init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        n_convs = stride.bit_length() - 1 if align == "conv" else 0
        self.convs = nnx.List([nnx.Param(init(rngs.params(), (3, out_dim, out_dim), param_dtype))
                               for _ in range(n_convs)])
        self.norm = LayerNorm(out_dim, 1e-5, affine=True)
        self.dtype = dtype

    def _compress(self, x, kernel):
        """Stride-2 temporal conv (kernel 3, padding 1) over x [B, T, K, D] -> [B, T/2, K, D]."""
        b, t, k, d = x.shape
        y = jax.lax.conv_general_dilated(
            x.transpose(0, 2, 1, 3).reshape(b * k, t, d), kernel[...].astype(x.dtype), (2,), ((1, 1),),
            dimension_numbers=("NWC", "WIO", "NWC"), preferred_element_type=jnp.float32).astype(x.dtype)
        return y.reshape(b, k, -1, d).transpose(0, 2, 1, 3)

    def window_tokens(self, windows: jax.Array) -> jax.Array:
        """The MLP alone: windows [B, T, 2w+1, layers, D_a] (flattened in that order) -> [B, T, K, D], before
        alignment and the norm (LetsTalk's windows come clamped at the ends of the whole audio, not the clip)."""
        b, t = windows.shape[:2]
        x = windows.reshape(b, t, -1)
        x = jax.nn.relu(self.fc1(x.astype(self.dtype or windows.dtype)))
        x = jax.nn.relu(self.fc2(x))
        return self.fc3(x).reshape(b, t, self.tokens, self.out_dim)

    def __call__(self, feats: jax.Array) -> jax.Array:
        if feats.ndim != 4 or feats.shape[2:] != (self.in_layers, self.in_dim):
            raise ValueError(f"audio features have shape {tuple(feats.shape)}; expected "
                             f"[B, T, {self.in_layers}, {self.in_dim}] (wav2vec2 states per video frame)")
        b, t = feats.shape[:2]
        f = frames_to_latent(t, self.stride)
        s = self.stride
        x = self.window_tokens(window_features(feats, self.window))  # [B, T, K, D]
        if self.align == "group":
            x = jnp.concatenate([jnp.repeat(x[:, :1], s - 1, axis=1), x], axis=1)  # [B, s·F, K, D]
            x = x.reshape(b, f, s * self.tokens, self.out_dim)
        else:
            rest = x[:, 1:]
            if t > 1:
                for kernel in self.convs:
                    rest = self._compress(rest, kernel)  # halves time each: [B, F-1, K, D] at the end
            x = jnp.concatenate([x[:, :1], rest], axis=1)
        return self.norm(x).astype(x.dtype)


def frame_windows(tokens: jax.Array, neighbors: int) -> tuple[jax.Array, jax.Array]:
    """Audio tokens per latent frame [B, F, M, ...] -> those of frames f−e..f+e: [B, F, (2e+1)M, ...]
    and a validity mask [F, (2e+1)M] (False where f±e falls outside the clip)."""
    if neighbors == 0:
        return tokens, jnp.ones(tokens.shape[1:3], bool)
    f, m = tokens.shape[1:3]
    offsets = jnp.arange(-neighbors, neighbors + 1)
    src = jnp.arange(f)[:, None] + offsets[None, :]  # [F, 2e+1]
    valid = (src >= 0) & (src < f)
    gathered = tokens[:, jnp.clip(src, 0, f - 1)]  # [B, F, 2e+1, M, ...]
    return (gathered.reshape(tokens.shape[0], f, (2 * neighbors + 1) * m, *tokens.shape[3:]),
            jnp.repeat(valid, m, axis=1))


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array) -> jax.Array:
    """Per-frame attention: q [B, F, P, N, K] over k/v [B, F, M, N, K]; valid [F, M] masks keys."""
    logits = jnp.einsum("bfpnk,bfmnk->bfnpm", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    logits = jnp.where(valid[None, :, None, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bfnpm,bfmnk->bfpnk", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)


class AudioCrossAttention(nnx.Module):
    """x += W_o(attention of LN(x) over the audio tokens of the same latent frame) [· face mask]."""

    def __init__(self, dim: int, num_heads: int, audio_dim: int, *, eps: float, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.num_heads = num_heads
        self.norm = LayerNorm(dim, eps, affine=True, axis_name="embed")
        self.to_q = Dense(dim, dim, ("embed", "heads"), **kw)
        self.to_k = Dense(audio_dim, dim, (None, "heads"), **kw)
        self.to_v = Dense(audio_dim, dim, (None, "heads"), **kw)
        self.norm_q = RMSNorm(dim, eps, axis_name="heads")
        self.norm_k = RMSNorm(dim, eps, axis_name="heads")
        zeros = nnx.initializers.zeros_init()
        self.to_out = Dense(dim, dim, ("heads", "embed"), kernel_init=zeros, **kw)  # zero-init: no change at start

    def __call__(self, x: jax.Array, audio: jax.Array, *, frames: int, neighbors: int = 0,
                 face_mask: jax.Array | None = None) -> jax.Array:
        """x [B, L, D] video tokens ordered (f, h, w), L = frames·P; audio [B, F, M, D_a]; face_mask [B, L]."""
        b, l, d = x.shape
        p = l // frames
        q = self.norm_q(self.to_q(self.norm(x).astype(x.dtype))).reshape(b, frames, p, self.num_heads, -1)
        kv, valid = frame_windows(audio, neighbors)
        k = self.norm_k(self.to_k(kv)).reshape(*kv.shape[:3], self.num_heads, -1)
        v = self.to_v(kv).reshape(*kv.shape[:3], self.num_heads, -1)
        out = self.to_out(local_attention(q, k, v, valid).reshape(b, l, d))
        if face_mask is not None:
            out = out * face_mask[..., None].astype(out.dtype)
        return out
