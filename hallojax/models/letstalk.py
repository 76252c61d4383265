"""LetsTalk (arXiv 2411.16748 v1; zhang-haojie/LetsTalk `models/model_cat.py`, `model_cat_long.py`) in Flax NNX.

A Latte/VDT-style video DiT over per-frame latents (SD VAE, 4 channels, no temporal compression). Latents are
channels-last [B, F, H, W, C]; inside, tokens are [B, F, P, D] (P = H·W / p² per frame, row-major). Each block,
in this order (facts: shared/research/hyavatar_letstalk.md C.2-C.3):
  1. temporal attention over each spatial position's frames: x += fc(MHSA(LN_affine(x))), no modulation;
     the memory bank's M frames (long variant) join here, and only here, in front along time;
  2. audio cross-attention per frame ("Direct Fusion"): x += MHA(LN(x), that frame's audio tokens), no gate;
  3. spatial self-attention over [frame tokens, reference tokens] (2P, "Symbiotic Fusion") with adaLN-Zero,
     then the MLP with adaLN-Zero on both halves; the reference half is carried to the next block.
Positions are fixed sin-cos tables (MAE 2D over the patch grid: first half of the channels the column, second
half the row, sin before cos; 1D over frame index [memory; clip]), computed in float64 and rounded to float32
as the released buffers are; the reference gets the 2D table only. The conditioning vector is the timestep
embedding alone ([cos, sin], 256) through Linear-SiLU-Linear; modulation and the final (shift, scale) are
SiLU -> Linear of it, in float32. Output: 2C channels (ε and the learned-variance interpolation v), as
released; or, with prediction="flow" and learn_sigma=False (configs/letstalk.py:lipsync-small), C channels of
flow velocity ε − x0.
Norms compute in float32; matmuls in `dtype` with float32 accumulation; blocks are stacked and scanned.
The audio projector (Hallo's AudioProjModel, `hallojax.nn.audio.AudioProjector` with one token set per frame)
maps wav2vec2 windows [B, F, 2w+1, layers, 768] to [B, F, 32, 768] tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from hallojax.modelconfig import DTYPES, ModelConfig, with_precision
from hallojax.models.wan import REMAT_POLICIES, PatchEmbed
from hallojax.nn.attention import dot_product_attention
from hallojax.nn.audio import AudioProjector
from hallojax.nn.layers import MLP, Dense, LayerNorm, check_execution, gelu_tanh, stacked, timestep_embedding
from hallojax.sharding import constrain

# --- sizes -----------------------------------------------------------------------------------------
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # depth, hidden, heads
VARIANTS = ("VDTcat", "VDTcatlong")  # v1; v1 + memory bank (its own temporal table `long_temp_embed`)
PATCHES = {"VDTcat": (2, 4, 8), "VDTcatlong": (1, 2, 4)}  # the released model names' patch sizes
TOKENS = ("act_batch", None, "act_len", "act_embed")  # [B, F, P, D]


@dataclasses.dataclass(frozen=True)
class LetsTalkConfig(ModelConfig):
    """Sizes and numerics of a LetsTalk backbone. Defaults: VDTcat-B/2 at 256 px (latent 32), 16 frames."""

    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "precision", "remat", "attention",
                                                 "scan_unroll")

    variant: str = "VDTcat"
    depth: int = 12
    hidden: int = 768
    num_heads: int = 12
    patch_size: int = 2
    in_channels: int = 4
    learn_sigma: bool = True  # output 2C channels (ε, v)
    # what the C (or first C) output channels predict: "epsilon" (released, the ddpm objective) or "flow" (the
    # velocity ε − x0 of flow matching, with learn_sigma=False: configs/letstalk.py:lipsync-small)
    prediction: str = "epsilon"
    mlp_ratio: float = 4.0
    latent_size: int = 32  # the checkpoints' pos_embed grid (latent side); any H, W divisible by p runs
    num_frames: int = 16  # clip length the temporal table was made for (checkpoint shape only; any F runs)
    memory_frames: int = 0  # M: memory-bank latent frames (VDTcatlong only; released sampling uses 2)
    freq_dim: int = 256
    audio_dim: int = 768  # width of the audio tokens (cross-attention context_dim)
    audio_in_layers: int = 12  # wav2vec2-base hidden states per frame
    audio_in_dim: int = 768
    audio_window: int = 2  # ± frames (audio_margin)
    audio_hidden: int = 512
    audio_tokens: int = 32
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    precision: str = "auto"
    remat: str = "none"
    attention: str = "xla"
    scan_unroll: int = 1

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"model.variant={self.variant!r}: expected one of {VARIANTS}")
        small = [f"model.{k}={getattr(self, k)}" for k in ("depth", "hidden", "num_heads", "patch_size",
                                                          "in_channels", "latent_size", "num_frames", "freq_dim",
                                                          "audio_dim", "audio_in_layers", "audio_in_dim",
                                                          "audio_hidden", "audio_tokens") if getattr(self, k) < 1]
        if small:
            raise ValueError(f"{', '.join(small)}: must be >= 1")
        if self.prediction not in ("epsilon", "flow") or (self.prediction == "flow" and self.learn_sigma):
            raise ValueError(f"model.prediction={self.prediction!r}: expected 'epsilon' or 'flow' (flow with "
                             f"learn_sigma=False; got learn_sigma={self.learn_sigma})")
        if self.hidden % self.num_heads:
            raise ValueError(f"model.hidden={self.hidden} is not divisible by num_heads={self.num_heads}")
        if self.hidden % 4:
            raise ValueError(f"model.hidden={self.hidden}: the 2D sin-cos table needs a multiple of 4")
        if self.latent_size % self.patch_size:
            raise ValueError(f"model.latent_size={self.latent_size} is not divisible by patch_size={self.patch_size}")
        if self.memory_frames < 0 or (self.memory_frames and self.variant != "VDTcatlong"):
            raise ValueError(f"model.memory_frames={self.memory_frames}: the memory bank is the VDTcatlong variant's "
                             "(memory_frames >= 0)")
        check_execution(self)

    @classmethod
    def named(cls, name: str, **kw) -> "LetsTalkConfig":
        """A released model name: ``VDTcat-B/2`` (/2, /4, /8), ``VDTcatlong-B`` (patch 1) or ``VDTcatlong-L/2``,
        or ``tiny`` (tests)."""
        if name == "tiny":
            return cls(**{**TINY, **kw})
        variant, _, size = name.partition("-")
        size, _, patch = size.partition("/")
        patch = int(patch) if patch else 1
        if variant not in VARIANTS or size not in SIZES or patch not in PATCHES[variant]:
            raise ValueError(f"unknown LetsTalk model {name!r}: expected VDTcat-{{S,B,L,XL}}/{{2,4,8}}, "
                             "VDTcatlong-{S,B,L,XL}[/2|/4] or tiny")
        depth, hidden, heads = SIZES[size]
        return cls(**{**dict(variant=variant, depth=depth, hidden=hidden, num_heads=heads, patch_size=patch), **kw})

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * self.mlp_ratio)


TINY = dict(variant="VDTcatlong", depth=2, hidden=128, num_heads=2, patch_size=2, latent_size=8, num_frames=4,
            memory_frames=2, audio_dim=32, audio_in_layers=2, audio_hidden=16, audio_tokens=4, dtype="float32")


# --- fixed positions ---------------------------------------------------------------------------------
def sincos_1d(dim: int, positions) -> np.ndarray:
    """[len(positions), dim] float64: [sin(p·ω) | cos(p·ω)], ω_i = 1 / 10000^(i / (dim/2))."""
    omega = np.arange(dim // 2, dtype=np.float64)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.asarray(positions, np.float64).reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, rows: int, cols: int) -> np.ndarray:
    """[rows·cols, dim] float32, tokens row-major: [1D table of the column | 1D table of the row] (MAE)."""
    r, c = np.meshgrid(np.arange(rows, dtype=np.float32), np.arange(cols, dtype=np.float32), indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, c), sincos_1d(dim // 2, r)], axis=1).astype(np.float32)


def temporal_table(dim: int, length: int) -> np.ndarray:
    """[length, dim] float32: the temporal table over frame indices 0..length-1 ([memory; clip])."""
    return sincos_1d(dim, np.arange(length)).astype(np.float32)


# --- layers ------------------------------------------------------------------------------------------
class SelfAttention(nnx.Module):
    """Multi-head softmax self-attention with a fused [q | k | v] projection (heads inside each part) and an
    output projection, both with biases (timm `Attention(qkv_bias=True)`)."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype, param_dtype, impl: str):
        self.qkv = Dense(dim, 3 * dim, ("embed", "heads"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.proj = Dense(dim, dim, ("heads", "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.num_heads, self.impl = num_heads, impl

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B', L, D] -> [B', L, D]: every row of B' attends within itself."""
        b, length, d = x.shape
        qkv = self.qkv(x).reshape(b, length, 3, self.num_heads, d // self.num_heads)  # [B', L, 3, N, K]
        q, k, v = (constrain(qkv[:, :, i], ("act_batch", None, "act_heads", None)) for i in range(3))
        return self.proj(dot_product_attention(q, k, v, self.impl).reshape(b, length, d))


class AudioAttention(nnx.Module):
    """Cross-attention of a frame's tokens over that frame's audio tokens: q, k, v without bias, out with."""

    def __init__(self, dim: int, num_heads: int, context_dim: int, *, rngs: nnx.Rngs, dtype, param_dtype, impl: str):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Dense(dim, dim, ("embed", "heads"), use_bias=False, **kw)
        self.k_proj = Dense(context_dim, dim, (None, "heads"), use_bias=False, **kw)
        self.v_proj = Dense(context_dim, dim, (None, "heads"), use_bias=False, **kw)
        self.proj = Dense(dim, dim, ("heads", "embed"), **kw)
        self.num_heads, self.impl = num_heads, impl

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x [B', L, D] queries, context [B', M, D_a] -> [B', L, D]."""
        b, length, d = x.shape
        n = self.num_heads
        q = constrain(self.q_proj(x).reshape(b, length, n, d // n), ("act_batch", None, "act_heads", None))
        k = self.k_proj(context).reshape(b, context.shape[1], n, d // n)
        v = self.v_proj(context).reshape(b, context.shape[1], n, d // n)
        return self.proj(dot_product_attention(q, k, v, self.impl).reshape(b, length, d))


class LetsTalkBlock(nnx.Module):
    """Temporal attention, audio cross-attention, spatial [x, reference] attention + MLP (adaLN-Zero)."""

    def __init__(self, cfg: LetsTalkConfig, *, rngs: nnx.Rngs):
        d, dtype, pdt = cfg.hidden, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=pdt, impl=cfg.attention)
        self.temporal_norm1 = LayerNorm(d, 1e-5, affine=True, axis_name="embed")  # torch default eps
        self.temporal_attn = SelfAttention(d, cfg.num_heads, **kw)
        self.temporal_fc = Dense(d, d, ("heads", "embed"), rngs=rngs, dtype=dtype, param_dtype=pdt)
        self.cross_norm = LayerNorm(d, 1e-6, affine=False)
        self.cross_attn = AudioAttention(d, cfg.num_heads, cfg.audio_dim, **kw)
        self.norm1 = LayerNorm(d, 1e-6, affine=False)
        self.attn = SelfAttention(d, cfg.num_heads, **kw)
        self.norm2 = LayerNorm(d, 1e-6, affine=False)
        self.mlp = MLP(d, cfg.mlp_hidden, d, gelu_tanh, axes_in=("embed", "mlp"), axes_out=("mlp", "embed"),
                       act_axes=("act_batch", None, None, "act_mlp"), rngs=rngs, dtype=dtype, param_dtype=pdt)
        # adaLN-Zero: SiLU(c) -> (shift, scale, gate) for attention, then for the MLP; float32
        self.modulation = Dense(d, 6 * d, ("embed", "mlp"), rngs=rngs, dtype=jnp.float32, param_dtype=pdt,
                                kernel_init=nnx.initializers.zeros_init())

    def temporal(self, x: jax.Array, memory: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        """x [B, F, P, D], memory [B, M, P, D] | None: attention along time per position over [memory; x]."""
        xm = x if memory is None else jnp.concatenate([memory, x], axis=1)
        b, t, p, d = xm.shape
        h = self.temporal_norm1(xm).astype(x.dtype).transpose(0, 2, 1, 3).reshape(b * p, t, d)  # [B·P, T, D]
        h = self.temporal_attn(h).reshape(b, p, t, d).transpose(0, 2, 1, 3)  # [B, T, P, D]
        xm = xm + self.temporal_fc(h)
        m = 0 if memory is None else memory.shape[1]
        return xm[:, m:], (xm[:, :m] if memory is not None else None)

    def audio(self, x: jax.Array, audio: jax.Array) -> jax.Array:
        """x [B, F, P, D] += attention of each frame's tokens over its audio tokens audio [B, F, K, D_a]."""
        b, f, p, d = x.shape
        h = self.cross_norm(x).astype(x.dtype).reshape(b * f, p, d)
        return x + self.cross_attn(h, audio.reshape(b * f, *audio.shape[2:])).reshape(b, f, p, d)

    def spatial(self, x: jax.Array, ref: jax.Array, mod: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[x, ref] ([B, F, P, D] each) joined per frame: adaLN-Zero attention and MLP over 2P tokens."""
        b, f, p, d = x.shape
        dtype = x.dtype
        shift, scale, gate, shift2, scale2, gate2 = (mod[:, i, None, None, :] for i in range(6))  # [B, 1, 1, D]
        xc = jnp.concatenate([x, ref], axis=2)  # [B, F, 2P, D]
        h = (self.norm1(xc) * (1 + scale) + shift).astype(dtype)
        a = self.attn(h.reshape(b * f, 2 * p, d)).reshape(b, f, 2 * p, d)
        xc = (xc.astype(jnp.float32) + gate * a.astype(jnp.float32)).astype(dtype)
        h = (self.norm2(xc) * (1 + scale2) + shift2).astype(dtype)
        xc = (xc.astype(jnp.float32) + gate2 * self.mlp(h).astype(jnp.float32)).astype(dtype)
        return xc[:, :, :p], xc[:, :, p:]

    def __call__(self, x, ref, memory, c, audio):
        """x, ref [B, F, P, D]; memory [B, M, P, D] | None; c [B, D] float32; audio [B, F, K, D_a]."""
        mod = self.modulation(jax.nn.silu(c)).reshape(c.shape[0], 6, -1)  # [B, 6, D] float32
        x, memory = self.temporal(x, memory)
        x = self.audio(x, audio)
        x, ref = self.spatial(x, ref, mod)
        return constrain(x, TOKENS), constrain(ref, TOKENS), memory


# --- model -------------------------------------------------------------------------------------------
class LetsTalk(nnx.Module):
    """The LetsTalk backbone with its audio projector.

    Call: ``model(latents, timesteps, reference, audio, *, memory=None)``
      latents [B, F, H, W, C] noisy latents; timesteps [B] (0..999, DDPM indices); reference [B, 1, H, W, C]
      (or [B, H, W, C]) the portrait's latent, repeated over the F frames; audio [B, F, 2w+1, layers, D_a]
      wav2vec2 windows per frame (`audio_windows`), or ready tokens [B, F, K, audio_dim] with
      ``audio_is_tokens=True``; memory [B, M, H, W, C] (VDTcatlong with M > 0): the previous clip's last
      latent frames (`memory_from_previous`), in training `regularize_memory` of the true ones.
    Returns [B, F, H, W, 2C] (ε, v) in the compute dtype.
    """

    def __init__(self, cfg: LetsTalkConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, dtype, pdt, f32 = cfg.hidden, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype], jnp.float32
        p = cfg.patch_size
        with nnx.use_eager_sharding(False):
            self.x_embedder = PatchEmbed((1, p, p), cfg.in_channels, d, rngs=rngs, dtype=dtype, param_dtype=pdt)
            self.t_embedder = MLP(cfg.freq_dim, d, d, jax.nn.silu, axes_in=(None, "embed"), axes_out=("embed", "mlp"),
                                  rngs=rngs, dtype=f32, param_dtype=f32)
            self.blocks = stacked(LetsTalkBlock, cfg.depth, rngs, cfg)
            self.final_norm = LayerNorm(d, 1e-6, affine=False)
            self.final_modulation = Dense(d, 2 * d, ("embed", "mlp"), rngs=rngs, dtype=f32, param_dtype=pdt,
                                          kernel_init=nnx.initializers.zeros_init())
            self.final_linear = Dense(d, p * p * cfg.out_channels, ("embed", None), rngs=rngs, dtype=dtype,
                                      param_dtype=pdt, kernel_init=nnx.initializers.zeros_init())
            self.audio_proj = AudioProjector(in_layers=cfg.audio_in_layers, in_dim=cfg.audio_in_dim,
                                             window=cfg.audio_window, hidden=cfg.audio_hidden, tokens=cfg.audio_tokens,
                                             out_dim=cfg.audio_dim, align="group", stride=1, rngs=rngs, dtype=dtype,
                                             param_dtype=pdt)

    def audio_tokens(self, windows: jax.Array) -> jax.Array:
        """wav2vec2 windows [B, F, 2w+1, layers, D_a] -> tokens [B, F, K, audio_dim] (AudioProjModel)."""
        cfg = self.cfg
        want = (2 * cfg.audio_window + 1, cfg.audio_in_layers, cfg.audio_in_dim)
        if windows.ndim != 5 or windows.shape[2:] != want:
            raise ValueError(f"audio has shape {tuple(windows.shape)}; expected [B, F, {', '.join(map(str, want))}] "
                             "(wav2vec2 windows per frame: `audio_windows`)")
        tokens = self.audio_proj.window_tokens(windows)
        return self.audio_proj.norm(tokens).astype(tokens.dtype)

    def embed(self, frames: jax.Array) -> jax.Array:
        """Latent frames [B, n, H, W, C] -> tokens [B, n, P, D] + the 2D table (float32 sum, then `dtype`)."""
        b, n, h, w, _ = frames.shape
        p = self.cfg.patch_size
        tokens = self.x_embedder(frames.astype(DTYPES[self.cfg.dtype])).astype(jnp.float32)
        tokens = tokens.reshape(b, n, (h // p) * (w // p), -1) + sincos_2d(self.cfg.hidden, h // p, w // p)
        return tokens

    def check_inputs(self, latents, timesteps, reference, audio, memory, audio_is_tokens):
        cfg = self.cfg
        if latents.ndim != 5 or latents.shape[-1] != cfg.in_channels:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected [B, F, H, W, {cfg.in_channels}] "
                             "(channels last)")
        b, f, h, w, c = latents.shape
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"latents {tuple(latents.shape)}: H, W must be divisible by patch {cfg.patch_size}")
        if timesteps.shape != (b,):
            raise ValueError(f"timesteps have shape {tuple(timesteps.shape)}; expected [{b}]")
        if reference.shape not in ((b, 1, h, w, c), (b, h, w, c)):
            raise ValueError(f"reference has shape {tuple(reference.shape)}; expected [{b}, 1, {h}, {w}, {c}] "
                             "(one latent frame)")
        want = (b, f, cfg.audio_tokens, cfg.audio_dim) if audio_is_tokens else (
            b, f, 2 * cfg.audio_window + 1, cfg.audio_in_layers, cfg.audio_in_dim)
        if tuple(audio.shape) != want:
            raise ValueError(f"audio has shape {tuple(audio.shape)}; expected {list(want)} "
                             + ("(audio tokens)" if audio_is_tokens else "(wav2vec2 windows per frame)"))
        m = cfg.memory_frames
        if m and (memory is None or tuple(memory.shape) != (b, m, h, w, c)):
            got = None if memory is None else tuple(memory.shape)
            raise ValueError(f"memory has shape {got}; this model's memory bank needs [{b}, {m}, {h}, {w}, {c}] "
                             f"(the last {m} latent frames before the clip)")
        if not m and memory is not None:
            raise ValueError("`memory` given but the model has no memory bank (memory_frames = 0)")

    def _run_blocks(self, x, ref, memory, c, audio):
        cfg = self.cfg
        graphdef, state = nnx.split(self.blocks)

        def layer(carry, st, c, audio):
            x, ref, memory = carry
            x = checkpoint_name(x, "layer_input")
            return nnx.merge(graphdef, st)(x, ref, memory, c, audio), None

        if cfg.remat != "none":
            layer = nnx.remat(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        scan = nnx.scan(layer, in_axes=(nnx.Carry, 0, None, None), out_axes=(nnx.Carry, 0),
                        unroll=min(cfg.scan_unroll, cfg.depth))
        (x, ref, memory), _ = scan((x, ref, memory), state, c, audio)
        return x

    @with_precision
    def __call__(self, latents, timesteps, reference, audio, *, memory=None, audio_is_tokens: bool = False):
        cfg = self.cfg
        dtype = DTYPES[cfg.dtype]
        self.check_inputs(latents, timesteps, reference, audio, memory, audio_is_tokens)
        b, f, h, w, _ = latents.shape
        p, m = cfg.patch_size, cfg.memory_frames
        times = temporal_table(cfg.hidden, m + f)  # [M + F, D]: memory frames first
        x = (self.embed(latents) + times[m:, None]).astype(dtype)  # [B, F, P, D]
        ref = self.embed(reference.reshape(b, 1, h, w, -1)).astype(dtype)  # no temporal position
        ref = jnp.broadcast_to(ref, x.shape)  # repeated over the frames
        mem = (self.embed(memory) + times[:m, None]).astype(dtype) if m else None
        x, ref = constrain(x, TOKENS), constrain(ref, TOKENS)
        tokens = audio.astype(dtype) if audio_is_tokens else self.audio_tokens(audio.astype(dtype))
        c = self.t_embedder(timestep_embedding(timesteps, cfg.freq_dim))  # [B, D] float32

        x = self._run_blocks(x, ref, mem, c, tokens)

        shift, scale = jnp.split(self.final_modulation(jax.nn.silu(c))[:, None, None], 2, axis=-1)  # [B, 1, 1, D]
        x = self.final_linear((self.final_norm(x) * (1 + scale) + shift).astype(dtype))  # [B, F, P, p·p·2C]
        x = x.reshape(b, f, h // p, w // p, p, p, cfg.out_channels)
        x = x.transpose(0, 1, 2, 4, 3, 5, 6)  # [B, F, H', p, W', p, 2C]
        return x.reshape(b, f, h, w, cfg.out_channels)


# --- inputs and the memory bank --------------------------------------------------------------------
def audio_windows(feats: jax.Array, start: int, frames: int, margin: int = 2) -> jax.Array:
    """The clip's wav2vec2 windows from the whole track's features [B, T, layers, D_a]: frames
    start..start+frames-1, each with ±margin neighbours clamped at the ends of the whole track (as the
    released data pipeline does, so a clip's edge frames see the audio beyond the clip)."""
    t = feats.shape[1]
    idx = np.clip(np.arange(start, start + frames)[:, None] + np.arange(-margin, margin + 1)[None, :], 0, t - 1)
    return feats[:, idx]  # [B, frames, 2·margin + 1, layers, D_a]


def memory_from_previous(previous: jax.Array | None, reference: jax.Array, m: int) -> jax.Array:
    """The memory bank for the next clip: the last m latent frames of the previous generated clip
    [B, F, H, W, C], or for the first clip m copies of the reference latent [B, 1, H, W, C] (released sampling)."""
    if previous is None:
        return jnp.repeat(reference.reshape(reference.shape[0], 1, *reference.shape[-3:]), m, axis=1)
    if previous.shape[1] < m:
        raise ValueError(f"previous clip has {previous.shape[1]} frames; the memory bank takes {m}")
    return previous[:, previous.shape[1] - m:]


def regularize_memory(rng: jax.Array, memory: jax.Array, *, max_t: int = 50, drop: float = 0.25) -> jax.Array:
    """The released training-time memory regularisation (`train_pl.py`): the memory latents [B, M, H, W, C]
    noised by the DDPM forward process at t ~ U{0..max_t-1} per sample, then zeroed where one spatial mask
    U(0,1) <= drop (shared over batch, frames and channels: about 25 % of the positions)."""
    k_t, k_noise, k_mask = jax.random.split(rng, 3)
    b, _, h, w, _ = memory.shape
    from hallojax.diffusion import alphas_cumprod  # the released DDPM process (linear betas 1e-4..0.02)

    abar = jnp.asarray(alphas_cumprod("ddpm"), memory.dtype)[jax.random.randint(k_t, (b,), 0, max_t)]
    abar = abar[:, None, None, None, None]
    noisy = jnp.sqrt(abar) * memory + jnp.sqrt(1 - abar) * jax.random.normal(k_noise, memory.shape, memory.dtype)
    keep = jax.random.uniform(k_mask, (h, w)) > drop
    return noisy * keep[None, None, :, :, None].astype(memory.dtype)


def build_model(cfg: LetsTalkConfig, seed: int = 0) -> LetsTalk:
    return LetsTalk(cfg, rngs=nnx.Rngs(seed))


def param_counts(cfg: LetsTalkConfig) -> dict[str, int]:
    """Trainable parameters from shapes alone: {"backbone", "audio_proj", "total"} (fixed tables excluded)."""
    state = nnx.state(nnx.eval_shape(lambda: LetsTalk(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    sizes = {".".join(map(str, k)): math.prod(v.shape) for k, v in nnx.to_flat_state(state)}
    audio = sum(n for k, n in sizes.items() if k.startswith("audio_proj."))
    total = sum(sizes.values())
    return {"backbone": total - audio, "audio_proj": audio, "total": total}
