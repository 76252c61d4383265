"""EchoMimicV3's audio projectors exactly as released (antgroup/echomimic_v3), for `WanDiT` with
``audio="decoupled"``: the tokens each latent frame's video tokens attend to in the decoupled (shared
query, shared output projection) cross-attention. Facts: shared/research/echomimic_v3.md §1.3-1.4.

- ``echomimic_preview`` (`audio2token`): the input is wav2vec2-base-960h's last hidden state at 50 Hz,
  r = 2 tokens per 25-fps video frame, as features [B, T, r, D_in]. All T·r tokens go through Linear (no
  bias) + LayerNorm, THEN latent frame i (covering video frames s(i−1)+1 .. s·i, s = 4) takes the r·s + 9
  = 17 consecutive tokens from r·(s(i−1)+1) − 5: its own 8 tokens, 4 before, 5 after (latent frame 0
  thus starts 11 tokens before the clip). Positions outside the clip become zero tokens appended at the
  end of the window (after projection: zero keys and values that still share the softmax; no key mask).
- ``echomimic_flash`` (`audio_injection`, MultiTalk's projector with 1536-wide tokens): the input is the
  12 wav2vec2 layer outputs per video frame [B, T, 12, D_in] (chinese-wav2vec2-base, features resampled
  to the frame rate); each frame takes a window of 2w + 1 frames (clamped at the ends). Frame 0's window
  goes through `proj1`; the other T − 1 frames are taken in groups of s: the first frame of a group
  gives its window positions 0..w, the middle frames position w, the last frame positions w..2w (2w + s
  entries) through `proj1_vf`; flatten order (window entry, layer, channel). ReLU, concatenated in time,
  ReLU(proj2), proj3 to K = 32 tokens, LayerNorm: [B, F, K, D].

Both return [B, F, M, D] with F = 1 + (T − 1) // s latent frames (the preview accepts any T and rounds
down, as the released code does; the Flash grouping needs T = 1 + s·k).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hallojax.nn.audio import window_features
from hallojax.nn.layers import Dense, LayerNorm

PROJECTORS = ("window_mlp", "echomimic_preview", "echomimic_flash")

# the DiTConfig fields of the released models on their Wan2.1-Fun-1.3B-InP base (36 input channels, CLIP image
# path): `configs/wan.py` presets and `hallojax convert echomimic-v3` (audio_dim and the added K/V width = dim)
COMMON = dict(in_channels=36, image_dim=1280, audio="decoupled", audio_in_dim=768, audio_stride=4,
              time_proj_float32=True)
VARIANTS = {
    "preview": dict(COMMON, audio_projector="echomimic_preview", audio_in_layers=2, audio_face_mask=True),
    "flash": dict(COMMON, audio_projector="echomimic_flash", audio_in_layers=12, audio_window=2, audio_hidden=512,
                  audio_tokens=32, audio_kv_bias=True),
}
# how the released scripts sample (infer_preview.py / infer_flash.py + run_flash.sh): `hallojax generate` defaults
# for a converted checkpoint ("sample": SampleConfig fields, "generation": the media it was made for)
RECIPES = {
    "preview": {"sample": dict(sampler="euler", steps=25, shift=5.0, guidance="echomimic-v3-preview",
                               negative_scale=1.5, negative_steps=2, clip_frames=113, long_video="chunks", overlap=8,
                               known_frames="condition"),
                "generation": dict(fps=25.0, frames=113, height=768, width=768, face_scale=1.0)},
    "flash": {"sample": dict(sampler="wan-unipc", steps=8, shift=5.0, guidance="audio=3", clip_frames=81,
                             long_video="continue", known_frames="condition", loudness=-23.0),
              "generation": dict(fps=25.0, frames=81, height=768, width=768)},
}


def preview_windows(num_tokens: int, tokens_per_frame: int = 2, stride: int = 4) -> np.ndarray:
    """int [F, r·s + 9] token indices of each latent frame's window; `num_tokens` (one past the last token)
    marks a zero token. Valid tokens first in order, the zero tokens after them (released right padding)."""
    r, s = tokens_per_frame, stride
    frames = num_tokens // r
    latent = 1 + (frames - 1) // s
    width = r * s + 9
    out = np.full((latent, width), num_tokens, np.int32)
    for i in range(latent):
        start = r * (s * (i - 1) + 1) - 5
        valid = [j for j in range(start, start + width) if 0 <= j < num_tokens]
        out[i, :len(valid)] = valid
    return out


class PreviewProjector(nnx.Module):
    """`audio2token`: Linear (no bias) + LayerNorm over the 50 Hz tokens, then 17-token windows."""

    def __init__(self, *, in_dim: int, out_dim: int, tokens_per_frame: int, stride: int, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        self.proj = Dense(in_dim, out_dim, (None, "embed"), use_bias=False, rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype)
        self.norm = LayerNorm(out_dim, 1e-5, affine=True, axis_name="embed")
        self.in_dim, self.tokens_per_frame, self.stride, self.dtype = in_dim, tokens_per_frame, stride, dtype

    def __call__(self, feats: jax.Array) -> jax.Array:
        if feats.ndim != 4 or feats.shape[2:] != (self.tokens_per_frame, self.in_dim):
            raise ValueError(f"audio features have shape {tuple(feats.shape)}; expected [B, T, "
                             f"{self.tokens_per_frame}, {self.in_dim}] (wav2vec2's last hidden state, "
                             f"{self.tokens_per_frame} tokens per video frame)")
        b, t = feats.shape[:2]
        dtype = self.dtype or feats.dtype
        x = self.proj(feats.reshape(b, t * self.tokens_per_frame, self.in_dim).astype(dtype))
        x = self.norm(x).astype(dtype)  # [B, T·r, D]
        x = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)  # the zero token, at index T·r
        return x[:, preview_windows(t * self.tokens_per_frame, self.tokens_per_frame, self.stride)]  # [B, F, 17, D]


def flash_groups(window: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(frame offset, window position) of the 2w + s entries a group of s frames contributes."""
    frames, positions = [], []
    for j in range(stride):
        picks = (range(window + 1) if j == 0 else range(window, 2 * window + 1) if j == stride - 1
                 else [window])
        frames += [j] * len(picks)
        positions += list(picks)
    return np.array(frames), np.array(positions)


class FlashProjector(nnx.Module):
    """`audio_injection`: per-frame windows of every wav2vec2 layer -> K tokens per latent frame."""

    def __init__(self, *, in_layers: int, in_dim: int, window: int, hidden: int, tokens: int, out_dim: int,
                 stride: int, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        per_entry = in_layers * in_dim
        self.proj1 = Dense((2 * window + 1) * per_entry, hidden, (None, "mlp"), **kw)
        self.proj1_vf = Dense((2 * window + stride) * per_entry, hidden, (None, "mlp"), **kw)
        self.proj2 = Dense(hidden, hidden, ("mlp", None), **kw)
        self.proj3 = Dense(hidden, tokens * out_dim, (None, "mlp"), **kw)
        self.norm = LayerNorm(out_dim, 1e-5, affine=True, axis_name="embed")
        self.in_layers, self.in_dim, self.window, self.stride = in_layers, in_dim, window, stride
        self.tokens, self.out_dim, self.dtype = tokens, out_dim, dtype

    def __call__(self, feats: jax.Array) -> jax.Array:
        b, t = feats.shape[:2]
        s = self.stride
        if feats.ndim != 4 or feats.shape[2:] != (self.in_layers, self.in_dim) or (t - 1) % s:
            raise ValueError(f"audio features have shape {tuple(feats.shape)}; expected [B, 1 + {s}k, "
                             f"{self.in_layers}, {self.in_dim}] (wav2vec2 layer outputs per video frame)")
        dtype = self.dtype or feats.dtype
        win = window_features(feats.astype(dtype), self.window)  # [B, T, 2w+1, layers, D]
        first = jax.nn.relu(self.proj1(win[:, 0].reshape(b, 1, -1)))  # [B, 1, hidden]
        parts = [first]
        if t > 1:
            offset, position = flash_groups(self.window, s)
            groups = win[:, 1:].reshape(b, (t - 1) // s, s, *win.shape[2:])  # [B, F−1, s, 2w+1, layers, D]
            picked = groups[:, :, offset, position]  # [B, F−1, 2w+s, layers, D]
            parts.append(jax.nn.relu(self.proj1_vf(picked.reshape(b, picked.shape[1], -1))))
        x = jax.nn.relu(self.proj2(jnp.concatenate(parts, axis=1)))  # [B, F, hidden]
        x = self.proj3(x).reshape(b, x.shape[1], self.tokens, self.out_dim)
        return self.norm(x).astype(dtype)  # [B, F, K, D]
