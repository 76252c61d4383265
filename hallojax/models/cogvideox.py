"""CogVideoX in Flax NNX, op for op the diffusers `CogVideoXTransformer3DModel` (1.0: 2B, 5B, 5B-I2V; 1.5).

Latents are channels-last [B, F, H, W, C]. Video tokens are ordered (f, h, w) after a (pt, p, p) patch
embedding (1.0: per-frame Conv2d, pt = 1; 1.5: pt = 2, a Linear over (c, pt, p, p)-flattened patches,
reordered by the converter). Text states go through `text_proj`; every block runs joint attention and one
FFN over the sequence [text M | video L] with *expert adaLN*: one LayerNorm and one set of attention/FFN
weights, separate shift/scale/gate for the text and the video stream (diffusers `CogVideoXLayerNormZero`,
chunks shift, scale, gate, enc_shift, enc_scale, enc_gate). q/k LayerNorm over each head (eps 1e-6, shared
by the heads), then 3D RoPE (t/h/w = K/4, 3K/8, 3K/8, interleaved pairs, float32 angles) on the video
tokens only, on explicit integer (t, h, w) coordinates (default: the grid from 0). Positions: 2B adds a
fixed 3D sin-cos table (computed for the actual grid, as diffusers does), 5B uses RoPE only, 5B-I2V adds
RoPE and a learned table [1, M + F·H'·W', D] (sliced to the first F frames for shorter inputs: SAT's
behaviour, where diffusers would replace it by sin-cos). Time: sinusoid [cos, sin] of width D -> Linear ->
SiLU -> Linear (512); 1.5-I2V adds the same embedding of `ofs`. Output: LayerNorm, AdaLayerNorm (shift,
scale), proj_out, unpatchify with features ordered (c, pt, p, p).

Numerics follow the Wan DiT's conventions: parameters in `param_dtype`, matmuls in `dtype`, norms computed
in float32 (their parameters float32), modulation and gated residuals applied in float32 and rounded once;
the time MLP runs in `dtype` as diffusers' CogVideoX does (no fp32 modules there). Blocks are stacked and
scanned. Extension points (Hallo3): `extra_tokens` (per-layer tokens joined to the attention keys/values
through the block's own K/V projections and k-norm, no RoPE), `hook` (a per-layer module applied to the
video stream after the attention residual, before the FFN) and `attention_inputs` (every layer's modulated
video attention input, the reference-network bank).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from hallojax.modelconfig import DTYPES, ModelConfig, check_dtypes, with_precision
from hallojax.models.wan import check_video_inputs, param_count
from hallojax.nn.layers import REMAT_POLICIES
from hallojax.nn.attention import ATTENTION_IMPLS, dot_product_attention
from hallojax.nn.layers import MLP, Dense, LayerNorm, PatchEmbed, gelu_tanh, stacked, timestep_embedding
from hallojax.nn.rope import apply_rope, axis_dims, grid_coords, rope_cos_sin
from hallojax.sharding import constrain

__all__ = ["CogVideoXConfig", "CogVideoXTransformer", "LayerHook", "PRESETS", "preset", "param_count",
           "sincos_table"]


@dataclasses.dataclass(frozen=True)
class CogVideoXConfig(ModelConfig):
    """Sizes and numerics of a CogVideoX transformer. Defaults are CogVideoX-5B-I2V (diffusers config names
    in brackets where ours differ)."""

    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "precision", "remat", "attention",
                                                 "scan_unroll", "norm_out_eps")

    num_layers: int = 42
    num_heads: int = 48  # [num_attention_heads]
    head_dim: int = 64  # [attention_head_dim]
    in_channels: int = 32
    out_channels: int = 16
    text_dim: int = 4096  # [text_embed_dim]
    text_len: int = 226  # [max_text_seq_length]: text rows of the position tables
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None  # 1.5-I2V: the `ofs` embedding width (512)
    patch_size: int = 2
    patch_size_t: int | None = None  # 1.5: 2 (a Linear patch embedding); None: per-frame Conv2d
    patch_bias: bool = True  # diffusers' flag: only the Conv2d honours it (1.5's Linear always has a bias)
    sample_frames: int = 49  # pixel frames of the position tables: (sample_frames - 1) // tcr + 1 latent frames
    sample_height: int = 60  # latent height of the position tables
    sample_width: int = 90
    temporal_compression_ratio: int = 4
    rope: bool = True  # [use_rotary_positional_embeddings]; False: 2B's fixed sin-cos table
    learned_positions: bool = False  # [use_learned_positional_embeddings] (5B-I2V)
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    norm_eps: float = 1e-5
    qk_norm_eps: float = 1e-6
    norm_out_eps: float | None = None  # the final AdaLayerNorm's eps; None = norm_eps (diffusers; SAT: 1e-6)
    rope_theta: float = 10000.0
    rope_max_pos: int = 1024
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    precision: str = "auto"
    remat: str = "none"  # one of REMAT_POLICIES
    attention: str = "xla"  # one of ATTENTION_IMPLS
    scan_unroll: int = 1

    def __post_init__(self):
        small = [f"model.{k}={getattr(self, k)}" for k in ("num_layers", "num_heads", "head_dim", "in_channels",
                                                          "out_channels", "text_dim", "time_embed_dim",
                                                          "patch_size") if getattr(self, k) < 1]
        if small:
            raise ValueError(f"{', '.join(small)}: must be >= 1")
        if self.patch_size_t is not None and self.patch_size_t < 1:
            raise ValueError(f"model.patch_size_t={self.patch_size_t}: expected None or >= 1")
        if self.patch_size_t is None and not self.patch_bias:
            raise ValueError("model.patch_bias=False with the Conv2d patch embedding is not supported "
                             "(every released CogVideoX 1.0 model has the bias)")
        if self.learned_positions and not self.rope:
            raise ValueError("model.learned_positions needs model.rope (as in diffusers: no such checkpoint)")
        if self.rope:
            axis_dims(self.head_dim, "cogvideox")  # raises unless head_dim % 16 == 0
        if not self.rope and self.dim % 16:
            raise ValueError(f"model dim {self.dim}: the 3D sin-cos table needs a multiple of 16")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention={self.attention!r}: expected one of {ATTENTION_IMPLS}")
        if self.attention == "cudnn" and self.dtype == "float32":
            raise ValueError("model.attention='cudnn' needs dtype bfloat16 or float16 (cuDNN flash attention)")
        if self.scan_unroll < 1:
            raise ValueError(f"model.scan_unroll={self.scan_unroll}: expected >= 1")
        check_dtypes(self, "model")

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def ffn_dim(self) -> int:
        return 4 * self.dim

    @property
    def patch(self) -> tuple[int, int, int]:
        return (self.patch_size_t or 1, self.patch_size, self.patch_size)

    @property
    def sample_grid(self) -> tuple[int, int, int]:
        """(F', H', W') token grid of the position tables."""
        pt, p, _ = self.patch
        frames = (self.sample_frames - 1) // self.temporal_compression_ratio + 1
        return frames // pt, self.sample_height // p, self.sample_width // p


_V1 = dict(head_dim=64, text_dim=4096, text_len=226, time_embed_dim=512, out_channels=16)
PRESETS: dict[str, dict[str, Any]] = {
    "2b": dict(_V1, num_layers=30, num_heads=30, in_channels=16, rope=False),
    "5b": dict(_V1, num_layers=42, num_heads=48, in_channels=16),
    "5b-i2v": dict(_V1, num_layers=42, num_heads=48, in_channels=32, learned_positions=True),
    "1.5-5b": dict(_V1, num_layers=42, num_heads=48, in_channels=16, patch_size_t=2, patch_bias=False,
                   sample_frames=81, sample_height=300, sample_width=300),
    "1.5-5b-i2v": dict(_V1, num_layers=42, num_heads=48, in_channels=32, patch_size_t=2, patch_bias=False,
                       sample_frames=81, sample_height=300, sample_width=300, ofs_embed_dim=512),
    # tests: 5B-I2V-style (RoPE + learned table), 2 layers, D 64
    "tiny": dict(num_layers=2, num_heads=4, head_dim=16, in_channels=8, out_channels=4, text_dim=32, text_len=6,
                 time_embed_dim=32, sample_frames=9, sample_height=4, sample_width=6, learned_positions=True),
}


def preset(name: str, **overrides) -> CogVideoXConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown CogVideoX preset {name!r}; known: {sorted(PRESETS)}")
    return CogVideoXConfig(**{**PRESETS[name], **overrides})


def sincos_table(dim: int, frames: int, height: int, width: int, spatial_scale: float,
                 temporal_scale: float) -> np.ndarray:
    """CogVideoX-2B's fixed 3D sin-cos positions of an (f, h, w) token grid: float32 [F·H·W, D].

    Columns: t (D/4: sin | cos), then w (3D/8: sin | cos), then h (3D/8) -- diffusers'
    `get_3d_sincos_pos_embed` (its 2D part encodes the first grid coordinate, w, first); frequencies
    10000^(-i/(d/2)) and the products in float64, positions in float32, as there.
    """

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    d_s, d_t = 3 * dim // 4, dim // 4
    h = (np.arange(height, dtype=np.float32) / np.float32(spatial_scale)).astype(np.float32)
    w = (np.arange(width, dtype=np.float32) / np.float32(spatial_scale)).astype(np.float32)
    t = (np.arange(frames, dtype=np.float32) / np.float32(temporal_scale)).astype(np.float32)
    hh, ww = np.meshgrid(h, w, indexing="ij")  # [H, W]
    spatial = np.concatenate([one(d_s // 2, ww.reshape(-1)), one(d_s // 2, hh.reshape(-1))], axis=1)  # [HW, 3D/4]
    temporal = one(d_t, t)  # [F, D/4]
    table = np.concatenate([np.repeat(temporal[:, None], height * width, axis=1),
                            np.repeat(spatial[None], frames, axis=0)], axis=-1)  # [F, HW, D]
    return table.reshape(-1, dim).astype(np.float32)


# --- blocks ---


class JointAttention(nnx.Module):
    """to_q/k/v over the joint sequence [text | video], per-head q/k LayerNorm, RoPE on the video part,
    softmax attention, to_out. Extra key/value tokens (Hallo3's reference bank) take this layer's own
    K/V projections and k-norm, no RoPE; they form no query (their outputs would be dropped)."""

    def __init__(self, dim: int, num_heads: int, *, qk_eps: float, rngs: nnx.Rngs, dtype, param_dtype,
                 impl: str = "xla"):
        self.num_heads = num_heads
        self.impl = impl
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.to_q = Dense(dim, dim, ("embed", "heads"), **kw)
        self.to_k = Dense(dim, dim, ("embed", "heads"), **kw)
        self.to_v = Dense(dim, dim, ("embed", "heads"), **kw)
        self.to_out = Dense(dim, dim, ("heads", "embed"), **kw)
        self.norm_q = LayerNorm(dim // num_heads, qk_eps, affine=True)
        self.norm_k = LayerNorm(dim // num_heads, qk_eps, affine=True)

    def heads(self, x: jax.Array) -> jax.Array:
        x = x.reshape(*x.shape[:-1], self.num_heads, -1)  # [B, L, N, K]
        return constrain(x, ("act_batch", "act_len", "act_heads", None))

    def qk_norm(self, norm: LayerNorm, x: jax.Array) -> jax.Array:
        return norm(self.heads(x)).astype(x.dtype)

    def __call__(self, x: jax.Array, text_len: int, rope, extra: jax.Array | None = None) -> jax.Array:
        """x [B, M + L, D] (text first); rope (cos, sin) [B|1, L, K/2] or None; extra [B, R, D]."""
        q = self.qk_norm(self.norm_q, self.to_q(x))
        k = self.qk_norm(self.norm_k, self.to_k(x))
        v = self.heads(self.to_v(x))
        if rope is not None:
            q = jnp.concatenate([q[:, :text_len], apply_rope(q[:, text_len:], *rope)], axis=1)
            k = jnp.concatenate([k[:, :text_len], apply_rope(k[:, text_len:], *rope)], axis=1)
        if extra is not None:
            k = jnp.concatenate([k, self.qk_norm(self.norm_k, self.to_k(extra))], axis=1)
            v = jnp.concatenate([v, self.heads(self.to_v(extra))], axis=1)
        out = dot_product_attention(q, k, v, self.impl)
        return self.to_out(out.reshape(*out.shape[:2], -1))


class ExpertAdaLN(nnx.Module):
    """diffusers `CogVideoXLayerNormZero`: SiLU -> Linear(E -> 6D) chunked shift, scale, gate, enc_shift,
    enc_scale, enc_gate, over one affine LayerNorm shared by the text and the video stream."""

    def __init__(self, cond_dim: int, dim: int, eps: float, *, rngs, dtype, param_dtype):
        self.linear = Dense(cond_dim, 6 * dim, ("mlp", "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = LayerNorm(dim, eps, affine=True, axis_name="embed")

    def modulation(self, emb: jax.Array) -> tuple[jax.Array, ...]:
        """emb [B, E] -> six float32 [B, 1, D]: shift, scale, gate, enc_shift, enc_scale, enc_gate."""
        mod = self.linear(jax.nn.silu(emb.astype(jnp.float32)).astype(emb.dtype)).astype(jnp.float32)
        return tuple(m[:, None] for m in jnp.split(mod, 6, axis=-1))

    def __call__(self, x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
        return (self.norm(x) * (1 + scale) + shift).astype(x.dtype)


def _gated(x: jax.Array, y: jax.Array, gate: jax.Array) -> jax.Array:
    return (x.astype(jnp.float32) + gate * y.astype(jnp.float32)).astype(x.dtype)


class CogVideoXBlock(nnx.Module):
    """norm1 (expert adaLN) -> joint attention -> gated residuals -> [hook] -> norm2 -> FFN on the joint
    sequence (GELU-tanh, 4D) -> gated residuals."""

    def __init__(self, cfg: CogVideoXConfig, *, rngs: nnx.Rngs):
        dim, dtype, pdt = cfg.dim, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=pdt)
        self.norm1 = ExpertAdaLN(cfg.time_embed_dim, dim, cfg.norm_eps, **kw)
        self.attn1 = JointAttention(dim, cfg.num_heads, qk_eps=cfg.qk_norm_eps, impl=cfg.attention, **kw)
        self.norm2 = ExpertAdaLN(cfg.time_embed_dim, dim, cfg.norm_eps, **kw)
        self.ff = MLP(dim, cfg.ffn_dim, dim, gelu_tanh, axes_in=("embed", "mlp"), axes_out=("mlp", "embed"),
                      act_axes=("act_batch", "act_len", "act_mlp"), **kw)

    def attn_input(self, video: jax.Array, emb: jax.Array) -> jax.Array:
        """The modulated video attention input [B, L, D] (what Hallo3's reference layers bank)."""
        shift, scale, *_ = self.norm1.modulation(emb)
        return self.norm1(video, shift, scale)

    def __call__(self, video: jax.Array, text: jax.Array, emb: jax.Array, rope, *, extra: jax.Array | None = None,
                 after_attention: Callable[[jax.Array, jax.Array], jax.Array] | None = None):
        """video [B, L, D], text [B, M, D], emb [B, E]; rope (cos, sin) of the video tokens or None;
        extra [B, R, D]: extra attention keys/values; after_attention(video, text) -> video: the hook.
        Returns (video, text)."""
        m = text.shape[1]
        shift, scale, gate, e_shift, e_scale, e_gate = self.norm1.modulation(emb)
        h = jnp.concatenate([self.norm1(text, e_shift, e_scale), self.norm1(video, shift, scale)], axis=1)
        a = checkpoint_name(self.attn1(h, m, rope, extra), "attn_out")
        video = constrain(_gated(video, a[:, m:], gate), ("act_batch", "act_len", "act_embed"))
        text = _gated(text, a[:, :m], e_gate)
        if after_attention is not None:
            video = constrain(after_attention(video, text), ("act_batch", "act_len", "act_embed"))

        shift, scale, gate, e_shift, e_scale, e_gate = self.norm2.modulation(emb)
        h = jnp.concatenate([self.norm2(text, e_shift, e_scale), self.norm2(video, shift, scale)], axis=1)
        f = self.ff(h)
        video = constrain(_gated(video, f[:, m:], gate), ("act_batch", "act_len", "act_embed"))
        return video, _gated(text, f[:, :m], e_gate)


@dataclasses.dataclass(frozen=True)
class LayerHook:
    """A per-layer extension run after each block's attention residual (Hallo3's face/audio cross-attention).

    module: an nnx module stacked over layers (`hallojax.nn.layers.stacked`; scanned with the blocks) or None;
    fn(block, layer_module, video, text, inputs) -> video, with `block` this layer's `CogVideoXBlock` (its
    norms are reachable, e.g. `block.attn1.norm_q`) and `inputs` the pytree of arrays given here.
    """

    fn: Callable[..., jax.Array]
    module: nnx.Module | None = None
    inputs: Any = None


# --- model ---


class CogVideoXTransformer(nnx.Module):
    """CogVideoX 1.0 / 1.5 transformer (T2V and I2V: I2V = 32 input channels, noisy latents first).

    Call: ``model(latents, timesteps, context, *, ofs=None, coords=None, extra_tokens=None, hook=None)``
      latents [B, F, H, W, C_in] channels last (F divisible by patch_size_t), timesteps [B], context
      [B, M, text_dim] (T5 states; M = text_len when a position table is used), ofs [B] (1.5-I2V: 2.0 in the
      pipeline), coords int [L, 3] or [B, L, 3] RoPE (t, h, w) of the video tokens (default: the grid from 0),
      extra_tokens [num_layers, B, R, D] per-layer extra attention keys/values, hook a `LayerHook`.
    Returns [B, F, H, W, C_out] in the compute dtype.
    """

    def __init__(self, cfg: CogVideoXConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dim, dtype, pdt = cfg.dim, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=pdt)
        with nnx.use_eager_sharding(False):
            self.patch_embed = PatchEmbed(cfg.patch, cfg.in_channels, dim, **kw)
            self.text_proj = Dense(cfg.text_dim, dim, ("mlp", "embed"), **kw)
            if cfg.learned_positions:
                f, h, w = cfg.sample_grid
                self.pos_embedding = nnx.Param(jnp.zeros((1, cfg.text_len + f * h * w, dim), pdt),
                                               out_sharding=(None, None, "embed"), eager_sharding=False)
            else:
                self.pos_embedding = None
            self.time_embedding = MLP(dim, cfg.time_embed_dim, cfg.time_embed_dim, jax.nn.silu,
                                      axes_in=("embed", "mlp"), axes_out=("mlp", None), **kw)
            self.ofs_embedding = (MLP(cfg.ofs_embed_dim, cfg.ofs_embed_dim, cfg.ofs_embed_dim, jax.nn.silu,
                                      axes_in=(None, "mlp"), axes_out=("mlp", None), **kw)
                                  if cfg.ofs_embed_dim else None)
            self.blocks = stacked(CogVideoXBlock, cfg.num_layers, rngs, cfg)
            self.norm_final = LayerNorm(dim, cfg.norm_eps, affine=True, axis_name="embed")
            self.norm_out_linear = Dense(cfg.time_embed_dim, 2 * dim, ("mlp", "embed"), **kw)
            eps = cfg.norm_eps if cfg.norm_out_eps is None else cfg.norm_out_eps
            self.norm_out = LayerNorm(dim, eps, affine=True, axis_name="embed")
            self.proj_out = Dense(dim, cfg.out_channels * int(np.prod(cfg.patch)), ("embed", None), **kw)

    # --- inputs ---

    def check_inputs(self, latents, timesteps, context, ofs, coords):
        cfg = self.cfg
        check_video_inputs(latents, timesteps, context, coords, in_channels=cfg.in_channels, patch=cfg.patch,
                           text_dim=cfg.text_dim)
        if cfg.learned_positions and context.shape[1] != cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens; the learned position table has "
                             f"{cfg.text_len} text rows (pad the text states to {cfg.text_len})")
        if (ofs is None) != (cfg.ofs_embed_dim is None):
            raise ValueError("`ofs` is needed exactly when model.ofs_embed_dim is set (CogVideoX1.5-I2V)")

    def positions(self, grid: tuple[int, int, int], dtype) -> tuple[jax.Array | None, jax.Array | None]:
        """(text rows [1, M, D], video rows [1, L, D]) of the absolute position table, or (None, None)."""
        cfg = self.cfg
        gf, gh, gw = grid
        if cfg.learned_positions:
            sf, sh, sw = cfg.sample_grid
            if (gh, gw) != (sh, sw) or gf > sf:
                raise ValueError(f"token grid {grid} does not fit the learned position table (up to {sf} frames "
                                 f"of {sh}x{sw}): this model runs only at its training resolution")
            table = self.pos_embedding[...]
            m = cfg.text_len
            return table[:, :m].astype(dtype), table[:, m: m + gf * gh * gw].astype(dtype)
        if not cfg.rope:
            table = sincos_table(cfg.dim, gf, gh, gw, cfg.spatial_interpolation_scale,
                                 cfg.temporal_interpolation_scale)
            return None, jnp.asarray(table)[None].astype(dtype)
        return None, None

    def embed(self, latents, timesteps, context, ofs=None):
        """(video tokens [B, L, D], text tokens [B, M, D], emb [B, E]) before the blocks."""
        cfg = self.cfg
        dtype = DTYPES[cfg.dtype]
        b, f, h, w, _ = latents.shape
        pt, p, _ = cfg.patch
        emb = self.time_embedding(timestep_embedding(timesteps, cfg.dim).astype(dtype))
        if self.ofs_embedding is not None:
            ofs = jnp.broadcast_to(jnp.asarray(ofs, jnp.float32), (b,))
            emb = emb + self.ofs_embedding(timestep_embedding(ofs, cfg.ofs_embed_dim).astype(dtype))
        video = self.patch_embed(latents.astype(dtype))  # [B, L, D]
        text = self.text_proj(context.astype(dtype))  # [B, M, D]
        pos_text, pos_video = self.positions((f // pt, h // p, w // p), dtype)
        if pos_text is not None:
            text = text + pos_text
        if pos_video is not None:
            video = video + pos_video
        return constrain(video, ("act_batch", "act_len", "act_embed")), text, emb

    def rope(self, grid, coords=None):
        """(cos, sin) [B|1, L, K/2] of the video tokens, or None (2B)."""
        cfg = self.cfg
        if not cfg.rope:
            return None
        coords = grid_coords(*grid) if coords is None else coords
        cos, sin = rope_cos_sin(coords, cfg.head_dim, cfg.rope_theta, cfg.rope_max_pos, split="cogvideox")
        return (cos[None], sin[None]) if cos.ndim == 2 else (cos, sin)

    # --- layers ---

    def run_blocks(self, video, text, emb, rope, *, extra_tokens=None, hook: LayerHook | None = None,
                   collect: bool = False):
        """Scan the stacked blocks. collect: also return every layer's modulated video attention input
        [num_layers, B, L, D]. Returns (video, text, collected | None)."""
        cfg = self.cfg
        graphdef, state = nnx.split(self.blocks)
        xs = {"blocks": state}
        if extra_tokens is not None:
            xs["extra"] = extra_tokens
        hook_def = None
        if hook is not None and hook.module is not None:
            hook_def, xs["hook"] = nnx.split(hook.module)

        def layer(carry, xs, emb, cos, sin, hook_inputs):
            video, text = carry
            video = checkpoint_name(video, "layer_input")
            block = nnx.merge(graphdef, xs["blocks"])
            after = None
            if hook is not None:
                mod = nnx.merge(hook_def, xs["hook"]) if hook_def is not None else None
                after = lambda v, t: hook.fn(block, mod, v, t, hook_inputs)  # noqa: E731
            collected = block.attn_input(video, emb) if collect else None
            rope_ = None if cos is None else (cos, sin)
            video, text = block(video, text, emb, rope_, extra=xs.get("extra"), after_attention=after)
            return (video, text), collected

        if cfg.remat != "none":
            layer = nnx.remat(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        scan = nnx.scan(layer, in_axes=(nnx.Carry, 0, None, None, None, None), out_axes=(nnx.Carry, 0),
                        unroll=min(cfg.scan_unroll, cfg.num_layers))
        cos, sin = rope if rope is not None else (None, None)
        (video, text), collected = scan((video, text), xs, emb, cos, sin, hook.inputs if hook else None)
        return video, text, collected

    def head(self, video, emb, grid, latent_shape):
        """norm_final -> AdaLayerNorm (shift, scale) -> proj_out -> unpatchify to [B, F, H, W, C_out]."""
        cfg = self.cfg
        dtype = video.dtype
        b, f, h, w = latent_shape
        gf, gh, gw = grid
        pt, p, _ = cfg.patch
        x = self.norm_final(video).astype(dtype)
        mod = self.norm_out_linear(jax.nn.silu(emb.astype(jnp.float32)).astype(dtype)).astype(jnp.float32)
        shift, scale = (m[:, None] for m in jnp.split(mod, 2, axis=-1))
        x = (self.norm_out(x) * (1 + scale) + shift).astype(dtype)
        x = self.proj_out(x)  # [B, L, C·pt·p·p]
        x = x.reshape(b, gf, gh, gw, cfg.out_channels, pt, p, p)
        x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)  # [B, F', pt, H', p, W', p, C]
        return x.reshape(b, f, h, w, cfg.out_channels)

    def _prepare(self, latents, timesteps, context, ofs, coords):
        self.check_inputs(latents, timesteps, context, ofs, coords)
        _, f, h, w, _ = latents.shape
        pt, p, _ = self.cfg.patch
        grid = (f // pt, h // p, w // p)
        video, text, emb = self.embed(latents, timesteps, context, ofs)
        return grid, video, text, emb, self.rope(grid, coords)

    @with_precision
    def __call__(self, latents, timesteps, context, *, ofs=None, coords=None, extra_tokens=None,
                 hook: LayerHook | None = None):
        grid, video, text, emb, rope = self._prepare(latents, timesteps, context, ofs, coords)
        video, _, _ = self.run_blocks(video, text, emb, rope, extra_tokens=extra_tokens, hook=hook)
        return self.head(video, emb, grid, latents.shape[:4])

    @with_precision
    def attention_inputs(self, latents, timesteps, context, *, ofs=None, coords=None) -> jax.Array:
        """Every layer's modulated video attention input [num_layers, B, L, D] (Hallo3's reference bank)."""
        _, video, text, emb, rope = self._prepare(latents, timesteps, context, ofs, coords)
        return self.run_blocks(video, text, emb, rope, collect=True)[2]


def build_model(cfg: CogVideoXConfig, seed: int = 0) -> CogVideoXTransformer:
    return CogVideoXTransformer(cfg, rngs=nnx.Rngs(seed))
