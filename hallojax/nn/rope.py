"""3D rotary position embedding on explicit per-token (t, h, w) integer coordinates.

Both families rotate interleaved pairs (2i, 2i+1) of each axis' part of the head by angle
pos · theta^(−2i/d) and differ in the split and the angle precision (``split``):
``wan``: h = w = 2·(K // 6), t = K − h − w (128 → 44/42/42), angles in float64 cast to float32;
``cogvideox`` (diffusers `get_3d_rotary_pos_embed`, SAT `Rotary3DPositionEmbeddingMixin`): t = K/4,
h = w = 3K/8 (64 → 16/24/24), angles computed in float32 as both references do. HunyuanVideo gives
its axis sizes explicitly (``axes``, e.g. 16/56/56) with float32 angles (``angle_dtype``).
The tables are built on the host, once per (K, theta, range, split), and rows are gathered by
coordinate inside the jitted program. Coordinates are explicit per token rather
than implied by a grid, so conditioning tokens can sit at t = −1 (identity frame) or at spatially
shifted positions, and the rotation stays exact for every position in [−max_pos, max_pos).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


SPLITS = ("wan", "cogvideox")


def axis_dims(head_dim: int, split: str = "wan") -> tuple[int, int, int]:
    """(t, h, w) sub-dimensions of a head, as Wan (default) or CogVideoX splits them."""
    if split == "cogvideox":
        if head_dim % 16:
            raise ValueError(f"CogVideoX RoPE needs head_dim % 16 == 0 (t = K/4, h = w = 3K/8 even), got {head_dim}")
        return head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3
    if split != "wan":
        raise ValueError(f"RoPE split {split!r}: expected one of {SPLITS}")
    h = w = 2 * (head_dim // 6)
    return head_dim - h - w, h, w


@functools.lru_cache(maxsize=16)
def _tables(axes: tuple[int, int, int], theta: float, max_pos: int,
            angle_dtype: str = "float64") -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of every (position, pair) for positions −max_pos … max_pos−1: float32 [2·max_pos, K/2].

    Columns are the t pairs, then h pairs, then w pairs; row r is position r − max_pos. Frequencies and
    angles in `angle_dtype`, each reference's own: float64 (Wan) or float32 (CogVideoX, HunyuanVideo).
    """
    f64 = np.dtype(angle_dtype) == np.float64
    pos = np.arange(-max_pos, max_pos, dtype=np.float64 if f64 else np.float32)
    cos, sin = [], []
    for d in axes:
        if f64:
            inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        else:  # torch's float32 `1 / theta ** (arange / d)`: its pow is the float64 power rounded (bitwise equal)
            e = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
            inv = np.float32(1.0) / (np.float64(theta) ** e.astype(np.float64)).astype(np.float32)
        ang = np.outer(pos, inv).astype(np.float64)  # float32 products stay float32 values
        cos.append(np.cos(ang).astype(np.float32))
        sin.append(np.sin(ang).astype(np.float32))
    return np.concatenate(cos, axis=1), np.concatenate(sin, axis=1)


def rope_cos_sin(coords: jax.Array | np.ndarray, head_dim: int, theta: float = 10000.0,
                 max_pos: int = 1024, split: str = "wan", *, axes: tuple[int, int, int] | None = None,
                 angle_dtype: str | None = None) -> tuple[jax.Array, jax.Array]:
    """cos, sin for integer coordinates `coords` [..., L, 3] (t, h, w): float32 [..., L, K/2].

    split: the (t, h, w) sub-dimensions and angle precision of a family (`axis_dims`); `axes` (even, summing
    to head_dim) and `angle_dtype` override them (HunyuanVideo: (16, 56, 56), float32). Coordinates outside [−max_pos, max_pos) raise for host arrays; inside jit (where values are not
    known) they produce NaN rather than silently reading another position's row.
    """
    axes = axis_dims(head_dim, split) if axes is None else tuple(int(a) for a in axes)
    if sum(axes) != head_dim or any(a % 2 for a in axes):
        raise ValueError(f"RoPE axis dims {axes}: must be even and sum to head_dim {head_dim}")
    if angle_dtype is None:
        angle_dtype = "float64" if split == "wan" else "float32"
    dt, dh, dw = axes
    cos_t, sin_t = _tables(axes, float(theta), int(max_pos), angle_dtype)
    if not isinstance(coords, jax.core.Tracer):
        coords = np.asarray(coords)
        if coords.size and (coords.min() < -max_pos or coords.max() >= max_pos):
            raise ValueError(f"RoPE coordinates span [{coords.min()}, {coords.max()}], outside "
                             f"[-{max_pos}, {max_pos}); raise rope_max_seq_len")
    idx = jnp.asarray(coords, jnp.int32) + max_pos
    bounds = np.cumsum([0, dt // 2, dh // 2, dw // 2])
    cols = []
    for axis in range(3):
        sl = slice(bounds[axis], bounds[axis + 1])
        rows = idx[..., axis]
        cols.append(tuple(jnp.asarray(t[:, sl]).at[rows].get(mode="fill", fill_value=jnp.nan)
                          for t in (cos_t, sin_t)))
    cos = jnp.concatenate([c for c, _ in cols], axis=-1)
    sin = jnp.concatenate([s for _, s in cols], axis=-1)
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs of x [B, L, N, K] by cos/sin [B or 1, L, K/2]; computed in float32."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)  # [B, L, N, K/2, 2]
    x1, x2 = xf[..., 0], xf[..., 1]
    c = cos[:, :, None, :]
    s = sin[:, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def grid_coords(frames: int, height: int, width: int, *, t0: int = 0, h0: int = 0, w0: int = 0) -> np.ndarray:
    """Coordinates of an (f, h, w)-ordered token grid starting at (t0, h0, w0): int32 [F·H·W, 3]."""
    t, h, w = np.meshgrid(np.arange(frames) + t0, np.arange(height) + h0, np.arange(width) + w0,
                          indexing="ij")
    return np.stack([t, h, w], axis=-1).reshape(-1, 3).astype(np.int32)


def frame_coords(height: int, width: int, *, t: int = -1, offset="none") -> np.ndarray:
    """Coordinates of one extra frame of tokens (e.g. an identity frame at t = −1).

    offset: "none" (same h, w grid as the video), "shift" (h, w shifted by the grid size, so the
    frame never shares a spatial position with a video token), or an int array [H·W, 2] of per-token
    (h, w) offsets added to the grid.
    """
    coords = grid_coords(1, height, width, t0=t)
    if isinstance(offset, str):
        if offset == "none":
            return coords
        if offset == "shift":
            coords[:, 1] += height
            coords[:, 2] += width
            return coords
        raise ValueError(f"RoPE frame offset mode {offset!r}: expected 'none', 'shift' or an array")
    if np.shape(offset) != (height * width, 2):
        raise ValueError(f"per-token RoPE offsets have shape {np.shape(offset)}, expected {(height * width, 2)}")
    if isinstance(offset, jax.Array):  # traced (e.g. a jitted argument): stay in jnp
        return jnp.asarray(coords).at[:, 1:].add(offset.astype(jnp.int32))
    coords[:, 1:] += np.asarray(offset, np.int32)
    return coords
