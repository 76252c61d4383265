"""The HunyuanVideo transformer in Flax NNX, op for op diffusers' `HunyuanVideoTransformer3DModel`.

Latents are channels-last [B, F, H, W, C]; a (1, 2, 2) patch embedding makes L = F'·H'·W' image tokens
ordered (f, h, w). The text path is the token refiner: LLaVA states [B, M, 4096] -> Linear -> 2 masked
self-attention blocks gated by their own (timestep + masked-mean text) vector. The conditioning vector
vec [B, D] = timestep MLP + guidance MLP (distilled T2V only) + pooled-CLIP MLP [+ caller's extra vectors];
every modulation is Linear(SiLU(vec)). Then N dual-stream blocks (image and text keep their own
weights, one joint attention over [image ; text]) and N' single-stream blocks (one fused projection to
q, k, v and the MLP input, attention and MLP in parallel) over the concatenated sequence; the final
adaLN (scale, shift) and Linear act on the image tokens, unpatchified with channels outermost per token.

Attention: q/k RMSNorm per head (eps 1e-6); RoPE on the image tokens only, axes (16, 56, 56) θ 256 on
explicit (t, h, w) coordinates, float32 angles as the reference computes them; text padding (right-
padded, the mask's sum counts valid tokens) drops the padded text keys for every query, as diffusers'
[B, 1, 1, N] key mask does. Blocks are stacked and scanned (`nnx.scan`) per stream type. Numerics follow
the Wan DiT: parameters in `param_dtype`, matmuls in `dtype` with float32 accumulation, norms, the
modulation arithmetic, the vector MLPs, RoPE and softmax in float32.

Extension points (HunyuanVideo-Avatar): `extra_tokens` [B, E, D] with their own RoPE `extra_coords`
(the reference frame at t = −1) are prepended to the image tokens and dropped before the head;
`extra_vec` [B, D] is added to vec; `image_add` [B, L, D] to the patch-embedded video tokens; `dual_hook`
runs a stacked module after chosen dual blocks on the image tokens (see `HunyuanVideoTransformer.__call__`);
`single_cache` stores / reuses the last single block's input (the Avatar sampler's feature cache).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from hallojax.modelconfig import DTYPES, ModelConfig, with_precision
from hallojax.nn.attention import dot_product_attention
from hallojax.nn.layers import (
    MLP, REMAT_POLICIES, Dense, LayerNorm, check_execution, PatchEmbed, RMSNorm, gelu_tanh, stacked, timestep_embedding)
from hallojax.nn.rope import apply_rope, grid_coords, rope_cos_sin
from hallojax.sharding import constrain

FREQ_DIM = 256  # the sinusoidal timestep / guidance embedding width (fixed in the reference)
EPS = 1e-6  # every LayerNorm and RMSNorm of the model
TOKENS = ("act_batch", "act_len", "act_embed")


@dataclasses.dataclass(frozen=True)
class HunyuanVideoConfig(ModelConfig):
    """Sizes and numerics of a HunyuanVideo transformer; defaults are the released T2V 720p model
    (diffusers config names in brackets where ours differ)."""

    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "precision", "remat", "attention",
                                                 "scan_unroll")

    num_layers: int = 20  # dual-stream blocks
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    num_heads: int = 24  # [num_attention_heads]
    head_dim: int = 128  # [attention_head_dim]
    mlp_ratio: float = 4.0
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)  # [(patch_size_t, patch_size, patch_size)]
    text_dim: int = 4096  # [text_embed_dim] LLaVA hidden states
    pooled_dim: int = 768  # [pooled_projection_dim] CLIP-L pooled output
    guidance_embeds: bool = True  # the distilled T2V release; False for HunyuanVideo-Avatar
    rope_theta: float = 256.0
    rope_axes: tuple[int, int, int] = (16, 56, 56)  # [rope_axes_dim] (t, h, w), sums to head_dim
    rope_max_seq_len: int = 1024  # coordinates in [-rope_max_seq_len, rope_max_seq_len)
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    precision: str = "auto"
    remat: str = "none"  # one of REMAT_POLICIES
    attention: str = "xla"  # one of ATTENTION_IMPLS (splash: no text padding mask)
    scan_unroll: int = 1

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "rope_axes", tuple(int(a) for a in self.rope_axes))
        small = [f"model.{k}={getattr(self, k)}" for k in ("num_layers", "num_single_layers", "num_heads",
                                                          "head_dim", "in_channels", "out_channels", "text_dim",
                                                          "pooled_dim") if getattr(self, k) < 1]
        if small or self.num_refiner_layers < 1:
            raise ValueError(f"{', '.join(small) or f'model.num_refiner_layers={self.num_refiner_layers}'}: "
                             "must be >= 1")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"model.patch_size={self.patch_size}: expected three positive ints (t, h, w)")
        if len(self.rope_axes) != 3 or sum(self.rope_axes) != self.head_dim or any(a % 2 for a in self.rope_axes):
            raise ValueError(f"model.rope_axes={self.rope_axes}: expected three even sizes summing to "
                             f"head_dim={self.head_dim}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"model.mlp_ratio={self.mlp_ratio}: must be > 0")
        check_execution(self)

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)


PRESETS: dict[str, dict[str, Any]] = {
    "full": {},  # HunyuanVideo T2V 720p (guidance-distilled): 12,821,012,544 parameters
    "full-no-guidance": dict(guidance_embeds=False),  # the HunyuanVideo-Avatar trunk: 12,810,782,784
    "tiny": dict(num_layers=2, num_single_layers=2, num_heads=4, head_dim=16, rope_axes=(4, 6, 6), in_channels=8,
                 out_channels=8, text_dim=32, pooled_dim=24),
}


# --- attention -------------------------------------------------------------------------------------
class QKV(nnx.Module):
    """q, k, v projections (with bias) and per-head q/k RMSNorm (`norms`) of one token stream."""

    def __init__(self, dim: int, num_heads: int, *, norms: bool, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.num_heads = num_heads
        self.to_q = Dense(dim, dim, ("embed", "heads"), **kw)
        self.to_k = Dense(dim, dim, ("embed", "heads"), **kw)
        self.to_v = Dense(dim, dim, ("embed", "heads"), **kw)
        head_dim = dim // num_heads
        self.norm_q = RMSNorm(head_dim, EPS) if norms else None
        self.norm_k = RMSNorm(head_dim, EPS) if norms else None

    def _heads(self, x):
        x = x.reshape(*x.shape[:-1], self.num_heads, -1)  # [B, L, N, K]
        return constrain(x, ("act_batch", "act_len", "act_heads", None))

    def __call__(self, x, rope=None, rope_len: int | None = None):
        """q, k, v [B, L, N, K]; RoPE (cos, sin) on the first `rope_len` tokens (all when None)."""
        q, k, v = (self._heads(p(x)) for p in (self.to_q, self.to_k, self.to_v))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            n = q.shape[1] if rope_len is None else rope_len
            q, k = (jnp.concatenate([apply_rope(t[:, :n], *rope), t[:, n:]], axis=1) for t in (q, k))
        return q, k, v


def _attend(q, k, v, mask, impl):
    """Attention over the joint sequence -> [B, L, N·K]; `mask` [B, 1, 1|L, M] bool or None."""
    out = dot_product_attention(q, k, v, impl, mask=mask)
    return out.reshape(*out.shape[:2], -1)


def _modulation(dim: int, n: int, kw) -> Dense:
    return Dense(dim, n * dim, ("embed", "mlp"), **kw)


def _mod_chunks(mod: Dense, vec, n: int):
    """n float32 [B, 1, D] chunks of Linear(SiLU(vec)) (vec float32 [B, D])."""
    m = mod(jax.nn.silu(vec).astype(mod.dtype)).astype(jnp.float32)
    return [c[:, None] for c in jnp.split(m, n, axis=-1)]


def _modulate(norm: LayerNorm, x, shift, scale):
    return (norm(x) * (1 + scale) + shift).astype(x.dtype)


def _gated(x, y, gate):
    return (x.astype(jnp.float32) + y.astype(jnp.float32) * gate).astype(x.dtype)


# --- text token refiner ----------------------------------------------------------------------------
class RefinerBlock(nnx.Module):
    """x += gate_msa · attn(LN(x)) ; x += gate_mlp · MLP_silu(LN(x)); gates from Linear(SiLU(c))."""

    def __init__(self, cfg: HunyuanVideoConfig, *, rngs: nnx.Rngs):
        dim, dtype, pdt = cfg.dim, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=pdt)
        self.norm1 = LayerNorm(dim, EPS, affine=True, axis_name="embed")
        self.attn = QKV(dim, cfg.num_heads, norms=False, **kw)
        self.to_out = Dense(dim, dim, ("heads", "embed"), **kw)
        self.norm2 = LayerNorm(dim, EPS, affine=True, axis_name="embed")
        self.ff = MLP(dim, cfg.mlp_dim, dim, jax.nn.silu, axes_in=("embed", "mlp"), axes_out=("mlp", "embed"),
                      act_axes=("act_batch", "act_len", "act_mlp"), **kw)
        self.mod = _modulation(dim, 2, kw)

    def __call__(self, x, c, mask):
        q, k, v = self.attn(self.norm1(x).astype(x.dtype))
        gate_msa, gate_mlp = _mod_chunks(self.mod, c, 2)
        x = _gated(x, self.to_out(_attend(q, k, v, mask, "xla")), gate_msa)  # tiny: always the masked xla path
        return _gated(x, self.ff(self.norm2(x).astype(x.dtype)), gate_mlp)


class TokenRefiner(nnx.Module):
    """diffusers `HunyuanVideoTokenRefiner` (`txt_in` of the original code)."""

    def __init__(self, cfg: HunyuanVideoConfig, *, rngs: nnx.Rngs):
        dim, dtype, pdt, f32 = cfg.dim, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype], jnp.float32
        vec_kw = dict(rngs=rngs, dtype=f32, param_dtype=pdt)
        self.time_embedder = MLP(FREQ_DIM, dim, dim, jax.nn.silu, axes_in=(None, "embed"), axes_out=("embed", "mlp"),
                                 **vec_kw)
        self.text_embedder = MLP(cfg.text_dim, dim, dim, jax.nn.silu, axes_in=("mlp", "embed"),
                                 axes_out=("embed", "mlp"), **vec_kw)
        self.proj_in = Dense(cfg.text_dim, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype, param_dtype=pdt)
        self.blocks = stacked(RefinerBlock, cfg.num_refiner_layers, rngs, cfg)

    def __call__(self, text, timesteps, mask, *, remat: str, unroll: int):
        """text [B, M, text_dim], timesteps [B], mask [B, M] bool (None: all valid) -> [B, M, D]."""
        tf = text.astype(jnp.float32)
        if mask is None:
            pooled = jnp.mean(tf, axis=1)
            pair = None
        else:
            m = mask.astype(jnp.float32)[..., None]
            pooled = jnp.sum(tf * m, axis=1) / jnp.sum(m, axis=1)
            pair = mask[:, None, None, :] & mask[:, None, :, None]  # [B, 1, M, M]: query valid and key valid
            pair = pair.at[..., 0].set(True)  # key 0 always visible (no query is left without keys)
        c = self.time_embedder(timestep_embedding(timesteps, FREQ_DIM)) + self.text_embedder(pooled)
        x = constrain(self.proj_in(text.astype(self.proj_in.dtype)), TOKENS)
        return scan_layers(self.blocks, x, lambda blk, x, _, c, pair: constrain(blk(x, c, pair), TOKENS),
                           (c, pair), remat=remat, unroll=unroll)


# --- dual- and single-stream blocks ----------------------------------------------------------------
class DualBlock(nnx.Module):
    """Separate image/text modulation, projections, norms and MLPs; one joint attention [img ; txt]."""

    def __init__(self, cfg: HunyuanVideoConfig, *, rngs: nnx.Rngs):
        dim, dtype, pdt = cfg.dim, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=pdt)
        mlp = dict(axes_in=("embed", "mlp"), axes_out=("mlp", "embed"), act_axes=("act_batch", "act_len", "act_mlp"),
                   **kw)
        self.impl = cfg.attention
        self.img_mod = _modulation(dim, 6, kw)
        self.txt_mod = _modulation(dim, 6, kw)
        self.norm = LayerNorm(dim, EPS, affine=False)
        self.img_attn = QKV(dim, cfg.num_heads, norms=True, **kw)
        self.txt_attn = QKV(dim, cfg.num_heads, norms=True, **kw)
        self.img_out = Dense(dim, dim, ("heads", "embed"), **kw)
        self.txt_out = Dense(dim, dim, ("heads", "embed"), **kw)
        self.img_mlp = MLP(dim, cfg.mlp_dim, dim, gelu_tanh, **mlp)
        self.txt_mlp = MLP(dim, cfg.mlp_dim, dim, gelu_tanh, **mlp)

    def __call__(self, img, txt, vec, rope, mask):
        """img [B, L, D], txt [B, M, D], vec float32 [B, D], rope (cos, sin) [B|1, L, K/2] -> (img, txt)."""
        i_sh, i_sc, i_g, i_sh2, i_sc2, i_g2 = _mod_chunks(self.img_mod, vec, 6)
        t_sh, t_sc, t_g, t_sh2, t_sc2, t_g2 = _mod_chunks(self.txt_mod, vec, 6)
        qi, ki, vi = self.img_attn(_modulate(self.norm, img, i_sh, i_sc), rope)
        qt, kt, vt = self.txt_attn(_modulate(self.norm, txt, t_sh, t_sc))
        cat = lambda a, b: jnp.concatenate([a, b], axis=1)  # noqa: E731
        out = _attend(cat(qi, qt), cat(ki, kt), cat(vi, vt), mask, self.impl)
        out = checkpoint_name(out, "attn_out")
        n = img.shape[1]
        img = constrain(_gated(img, self.img_out(out[:, :n]), i_g), TOKENS)
        txt = _gated(txt, self.txt_out(out[:, n:]), t_g)
        img = _gated(img, self.img_mlp(_modulate(self.norm, img, i_sh2, i_sc2)), i_g2)
        txt = _gated(txt, self.txt_mlp(_modulate(self.norm, txt, t_sh2, t_sc2)), t_g2)
        return constrain(img, TOKENS), constrain(txt, TOKENS)


class SingleBlock(nnx.Module):
    """x += gate · Linear([attn(x_mod) ; GELU_tanh(Linear(x_mod))]) over the joint sequence [img ; txt]."""

    def __init__(self, cfg: HunyuanVideoConfig, *, rngs: nnx.Rngs):
        dim, dtype, pdt = cfg.dim, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=pdt)
        self.impl = cfg.attention
        self.mod = _modulation(dim, 3, kw)
        self.norm = LayerNorm(dim, EPS, affine=False)
        self.attn = QKV(dim, cfg.num_heads, norms=True, **kw)
        self.proj_mlp = Dense(dim, cfg.mlp_dim, ("embed", "mlp"), **kw)
        self.proj_out = Dense(dim + cfg.mlp_dim, dim, ("mlp", "embed"), **kw)

    def __call__(self, x, n_img: int, vec, rope, mask):
        """x [B, L + M, D] (image tokens first, `n_img` of them) -> [B, L + M, D]."""
        shift, scale, gate = _mod_chunks(self.mod, vec, 3)
        h = _modulate(self.norm, x, shift, scale)
        hidden = self.proj_mlp(h)
        hidden = constrain(gelu_tanh(hidden.astype(jnp.float32)).astype(hidden.dtype),
                           ("act_batch", "act_len", "act_mlp"))
        q, k, v = self.attn(h, rope, rope_len=n_img)
        out = checkpoint_name(_attend(q, k, v, mask, self.impl), "attn_out")
        return constrain(_gated(x, self.proj_out(jnp.concatenate([out, hidden], axis=-1)), gate), TOKENS)


def _layers(stack: nnx.Module, start: int, stop: int | None) -> nnx.Module:
    """Layers start:stop of a stacked module (still stacked)."""
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], state))


def scan_layers(stack: nnx.Module, carry, step, consts: tuple, *, remat: str, unroll: int, layer_xs=None):
    """Run `step(block, carry, xs, *consts) -> carry` over the stacked `stack` with `nnx.scan`, one layer
    per step (remat policy `remat`); xs = {"layer": index, **layer_xs} (arrays with a leading layer axis)."""
    graphdef, state = nnx.split(stack)
    n = jax.tree.leaves(state)[0].shape[0]
    xs = {"params": state, "layer": jnp.arange(n), **(layer_xs or {})}

    def body(carry, xs, *consts):
        carry = checkpoint_name(carry, "layer_input")
        return step(nnx.merge(graphdef, xs["params"]), carry, xs, *consts), None

    if remat != "none":
        body = nnx.remat(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    scan = nnx.scan(body, in_axes=(nnx.Carry, 0) + (None,) * len(consts), out_axes=(nnx.Carry, 0),
                    unroll=min(unroll, n))
    carry, _ = scan(carry, xs, *consts)
    return carry


# --- the model -------------------------------------------------------------------------------------
class HunyuanVideoTransformer(nnx.Module):
    """HunyuanVideo T2V transformer (diffusers `HunyuanVideoTransformer3DModel`, image_condition_type None).

    Call: ``model(latents, timesteps, text, pooled, *, text_mask=None, guidance=None, coords=None,
    extra_tokens=None, extra_coords=None, extra_vec=None, image_add=None, dual_hook=None, hook_inputs=None)``
      latents [B, F, H, W, C_in]; timesteps [B] in [0, 1000] (float); text [B, M, text_dim] LLaVA states;
      pooled [B, pooled_dim] CLIP pooled output; text_mask [B, M] (1 = valid; right padding: as diffusers,
      the first sum(mask) text tokens are the ones image tokens see); guidance [B] (guidance-distilled
      models: the scale × 1000); coords int [L, 3] or [B, L, 3] RoPE (t, h, w) of the image tokens
      (default: the grid from 0).
      Extension points: extra_tokens [B, E, D] already-embedded image-stream tokens prepended to the image
      tokens (e.g. `embed(reference_frame)`), rotated at extra_coords [E, 3] | [B, E, 3] (e.g. t = −1),
      dropped before the head; extra_vec [B, D] added to the conditioning vector; image_add [B, L, D] added
      to the patch-embedded video tokens (the Avatar's reference through its own embedding); dual_hook = (module,
      layers): `module` stacked (`stacked`) with one entry per dual block index in `layers`, applied after
      those blocks as ``img = module(img, txt, **hook_inputs)`` on the image stream (extra tokens first).
    Returns [B, F, H, W, C_out] in the compute dtype.
    """

    def __init__(self, cfg: HunyuanVideoConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dim, dtype, pdt, f32 = cfg.dim, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype], jnp.float32
        vec_kw = dict(rngs=rngs, dtype=f32, param_dtype=pdt)
        with nnx.use_eager_sharding(False):
            self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, dim, rngs=rngs, dtype=dtype,
                                         param_dtype=pdt)
            self.time_embedder = MLP(FREQ_DIM, dim, dim, jax.nn.silu, axes_in=(None, "embed"),
                                     axes_out=("embed", "mlp"), **vec_kw)
            self.guidance_embedder = (MLP(FREQ_DIM, dim, dim, jax.nn.silu, axes_in=(None, "embed"),
                                          axes_out=("embed", "mlp"), **vec_kw) if cfg.guidance_embeds else None)
            self.text_embedder = MLP(cfg.pooled_dim, dim, dim, jax.nn.silu, axes_in=(None, "embed"),
                                     axes_out=("embed", "mlp"), **vec_kw)
            self.refiner = TokenRefiner(cfg, rngs=rngs)
            self.double_blocks = stacked(DualBlock, cfg.num_layers, rngs, cfg)
            self.single_blocks = stacked(SingleBlock, cfg.num_single_layers, rngs, cfg)
            self.norm_out = LayerNorm(dim, EPS, affine=False)
            self.norm_out_mod = _modulation(dim, 2, dict(rngs=rngs, dtype=dtype, param_dtype=pdt))  # (scale, shift)
            self.proj_out = Dense(dim, cfg.out_channels * int(np.prod(cfg.patch_size)), ("embed", "mlp"), rngs=rngs,
                                  dtype=dtype, param_dtype=pdt)

    # --- pieces (the Avatar composes them) ---
    def embed(self, latents: jax.Array) -> jax.Array:
        """Latents [B, F, H, W, C_in] -> image tokens [B, F'·H'·W', D] (the shared patch embedding)."""
        return constrain(self.x_embedder(latents.astype(DTYPES[self.cfg.dtype])), TOKENS)

    def vector(self, timesteps, pooled, guidance=None, extra_vec=None) -> jax.Array:
        """The conditioning vector float32 [B, D]: timestep + guidance + pooled text (+ extra_vec)."""
        vec = self.time_embedder(timestep_embedding(timesteps, FREQ_DIM))
        if self.guidance_embedder is not None:
            vec = vec + self.guidance_embedder(timestep_embedding(guidance, FREQ_DIM))
        vec = vec + self.text_embedder(pooled.astype(jnp.float32))
        if extra_vec is not None:
            vec = vec + extra_vec.astype(jnp.float32)
        return vec

    def rope(self, coords):
        cfg = self.cfg
        cos, sin = rope_cos_sin(coords, cfg.head_dim, cfg.rope_theta, cfg.rope_max_seq_len, axes=cfg.rope_axes,
                                angle_dtype="float32")
        return (cos[None], sin[None]) if cos.ndim == 2 else (cos, sin)

    def check_inputs(self, latents, timesteps, text, pooled, text_mask, guidance, coords, extra_tokens, extra_coords,
                     dual_hook=None):
        cfg = self.cfg
        if dual_hook is not None:
            layers = tuple(int(i) for i in dual_hook[1])
            if len(set(layers)) != len(layers) or not all(0 <= i < cfg.num_layers for i in layers):
                raise ValueError(f"dual_hook layers {layers}: expected distinct indices in [0, {cfg.num_layers})")
        if latents.ndim != 5 or latents.shape[-1] != cfg.in_channels:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected [B, F, H, W, {cfg.in_channels}] "
                             "(channels last)")
        b, f, h, w, _ = latents.shape
        for name, n, p in zip("FHW", (f, h, w), cfg.patch_size):
            if n % p:
                raise ValueError(f"latents {tuple(latents.shape)}: {name}={n} is not divisible by patch {p}")
        if np.shape(timesteps) != (b,):
            raise ValueError(f"timesteps have shape {tuple(np.shape(timesteps))}; expected [{b}]")
        if text.ndim != 3 or text.shape[0] != b or text.shape[-1] != cfg.text_dim:
            raise ValueError(f"text has shape {tuple(text.shape)}; expected [{b}, M, {cfg.text_dim}]")
        if np.shape(pooled) != (b, cfg.pooled_dim):
            raise ValueError(f"pooled has shape {tuple(np.shape(pooled))}; expected [{b}, {cfg.pooled_dim}]")
        if text_mask is not None and np.shape(text_mask) != text.shape[:2]:
            raise ValueError(f"text_mask has shape {tuple(np.shape(text_mask))}; expected {tuple(text.shape[:2])}")
        if cfg.guidance_embeds and (guidance is None or np.shape(guidance) != (b,)):
            raise ValueError(f"this model embeds the guidance scale: pass guidance [{b}] (scale × 1000)")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError("guidance given to a model without a guidance embedder (guidance_embeds=False)")
        gf, gh, gw = f // cfg.patch_size[0], h // cfg.patch_size[1], w // cfg.patch_size[2]
        for name, c, n in (("coords", coords, gf * gh * gw),
                           ("extra_coords", extra_coords, None if extra_tokens is None else extra_tokens.shape[1])):
            if c is not None and (n is None or np.ndim(c) not in (2, 3) or np.shape(c)[-2:] != (n, 3)
                                  or (np.ndim(c) == 3 and np.shape(c)[0] != b)):
                raise ValueError(f"{name} has shape {tuple(np.shape(c))}; expected [{n}, 3] or [{b}, {n}, 3] "
                                 "(one (t, h, w) per token)")
        if (extra_tokens is None) != (extra_coords is None):
            raise ValueError("extra_tokens and extra_coords go together")
        if extra_tokens is not None and (extra_tokens.ndim != 3 or extra_tokens.shape[0] != b
                                         or extra_tokens.shape[2] != cfg.dim):
            raise ValueError(f"extra_tokens have shape {tuple(extra_tokens.shape)}; expected [{b}, E, {cfg.dim}]")

    @with_precision
    def __call__(self, latents, timesteps, text, pooled, *, text_mask=None, guidance=None, coords=None,
                 extra_tokens=None, extra_coords=None, extra_vec=None, image_add=None, dual_hook=None,
                 hook_inputs=None, single_cache=None):
        """`single_cache`: None (the plain forward); "store": also return the last single block's input
        [B, L_img + M, D] (a feature cache); that array: run only the last single block on it with this call's
        conditioning vector (every other input is read for shapes and the vector only) and the head."""
        cfg = self.cfg
        self.check_inputs(latents, timesteps, text, pooled, text_mask, guidance, coords, extra_tokens, extra_coords,
                          dual_hook)
        b, f, h, w, _ = latents.shape
        pt, ph, pw = cfg.patch_size
        gf, gh, gw = f // pt, h // ph, w // pw

        img = self.embed(latents)  # [B, L, D]
        if image_add is not None:
            if tuple(image_add.shape) != tuple(img.shape):
                raise ValueError(f"image_add has shape {tuple(image_add.shape)}; expected {tuple(img.shape)} "
                                 "(one vector per video token)")
            img = img + image_add.astype(img.dtype)
        rope = self.rope(grid_coords(gf, gh, gw) if coords is None else coords)
        if extra_tokens is not None:  # prepended, with their own coordinates
            extra_rope = self.rope(extra_coords)
            bb = max(rope[0].shape[0], extra_rope[0].shape[0])
            widen = lambda t: jnp.broadcast_to(t, (bb, *t.shape[1:]))  # noqa: E731
            rope = tuple(jnp.concatenate([widen(e), widen(r)], axis=1) for e, r in zip(extra_rope, rope))
            img = jnp.concatenate([extra_tokens.astype(img.dtype), img], axis=1)
        n_extra = 0 if extra_tokens is None else extra_tokens.shape[1]
        n_img = img.shape[1]

        vec = self.vector(timesteps, pooled, guidance, extra_vec)
        mask = None if text_mask is None else jnp.asarray(text_mask).astype(bool)
        cached = single_cache is not None and not isinstance(single_cache, str)
        if single_cache is not None and cfg.num_single_layers < 2:
            raise ValueError("single_cache: the feature cache needs >= 2 single blocks")
        if not cached:
            txt = self.refiner(text, timesteps, mask, remat=cfg.remat, unroll=cfg.scan_unroll)  # [B, M, D]
        key_mask = None
        if mask is not None:  # image tokens + the first sum(mask) text tokens (diffusers' effective length)
            m = text.shape[1]
            valid = jnp.arange(m)[None, :] < jnp.sum(mask, axis=1, dtype=jnp.int32)[:, None]
            key_mask = jnp.concatenate([jnp.ones((b, n_img), bool), valid], axis=1)[:, None, None, :]

        single = lambda blk, x, _, vec, rope, km: blk(x, n_img, vec, rope, km)  # noqa: E731
        if not cached:
            img, txt = self._run_dual(img, txt, vec, rope, key_mask, dual_hook, hook_inputs)
            x = jnp.concatenate([img, txt], axis=1)
            stack = self.single_blocks if single_cache is None else _layers(self.single_blocks, 0, -1)
            x = scan_layers(stack, x, single, (vec, rope, key_mask), remat=cfg.remat, unroll=cfg.scan_unroll)
        else:
            x = single_cache
            want = (b, n_img + text.shape[1], cfg.dim)
            if tuple(x.shape) != want:
                raise ValueError(f"single_cache has shape {tuple(x.shape)}; expected {want} (the last single "
                                 "block's input a 'store' call returned for these shapes)")
        cache = x
        if single_cache is not None:
            x = scan_layers(_layers(self.single_blocks, -1, None), x, single, (vec, rope, key_mask), remat=cfg.remat,
                            unroll=1)
        img = x[:, n_extra:n_img]

        scale, shift = _mod_chunks(self.norm_out_mod, vec, 2)
        img = _modulate(self.norm_out, img, shift, scale)
        out = self.proj_out(img)  # [B, L, C·pt·ph·pw]: channel outermost per token
        out = out.reshape(b, gf, gh, gw, cfg.out_channels, pt, ph, pw)
        out = out.transpose(0, 1, 5, 2, 6, 3, 7, 4)  # [B, F', pt, H', ph, W', pw, C]
        out = out.reshape(b, f, h, w, cfg.out_channels)
        return (out, cache) if isinstance(single_cache, str) else out

    def _run_dual(self, img, txt, vec, rope, key_mask, dual_hook, hook_inputs):
        """The dual-stream scan; with a hook, block i is followed by hook entry slot[i] when slot[i] >= 0."""
        cfg = self.cfg
        if dual_hook is None:
            step = lambda blk, c, _, vec, rope, km: blk(*c, vec, rope, km)  # noqa: E731
            return scan_layers(self.double_blocks, (img, txt), step, (vec, rope, key_mask), remat=cfg.remat,
                               unroll=cfg.scan_unroll)
        hook, layers = dual_hook
        slot = np.full(cfg.num_layers, -1, np.int32)
        slot[[int(i) for i in layers]] = np.arange(len(layers))
        hook_def, hook_state = nnx.split(hook)
        inputs = dict(hook_inputs or {})
        arrays = {k: v for k, v in inputs.items() if isinstance(v, (jax.Array, np.ndarray))}
        static = {k: v for k, v in inputs.items() if k not in arrays}

        def step(blk, carry, xs, vec, rope, km, hook_state, arrays):
            img, txt = blk(*carry, vec, rope, km)
            s = xs["slot"]

            def apply(img):
                entry = nnx.merge(hook_def, jax.tree.map(
                    lambda a: jax.lax.dynamic_index_in_dim(a, jnp.maximum(s, 0), keepdims=False), hook_state))
                return constrain(entry(img, txt, **arrays, **static).astype(img.dtype), TOKENS)

            img = jax.lax.cond(s >= 0, apply, lambda t: constrain(t, TOKENS), img)
            return img, txt

        return scan_layers(self.double_blocks, (img, txt), step, (vec, rope, key_mask, hook_state, arrays),
                           remat=cfg.remat, unroll=cfg.scan_unroll, layer_xs={"slot": jnp.asarray(slot)})


def build_model(cfg: HunyuanVideoConfig, seed: int = 0) -> HunyuanVideoTransformer:
    return HunyuanVideoTransformer(cfg, rngs=nnx.Rngs(seed))


def preset(name: str, **overrides) -> HunyuanVideoConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown HunyuanVideo preset {name!r}; known: {sorted(PRESETS)}")
    return HunyuanVideoConfig(**{**PRESETS[name], **overrides})
