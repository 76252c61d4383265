"""The Wan-family video DiT in Flax NNX, op for op the diffusers `WanTransformer3DModel`.

Latents are channels-last [B, F, H, W, C]. Tokens are ordered (f, h, w) after a (pt, ph, pw) patch
embedding. Blocks are created stacked (`nnx.vmap`) and run with `nnx.scan`, so compile time does not
grow with depth and the stacked parameters carry a leading ``layers`` axis. Parameters are kept in
`param_dtype` (float32 by default); matmuls run in `dtype` (bfloat16 by default). As in the reference
(diffusers' `_keep_in_fp32_modules`), norms, the timestep MLP and the modulation tables are float32
parameters computed in float32 whatever `param_dtype` is; the timestep embedding is rounded to `dtype`
before the 6-way projection, which runs in `dtype`, and modulation is applied in float32.
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

from hallojax.nn.attention import ATTENTION_IMPLS, dot_product_attention
from hallojax.nn.audio import AudioCrossAttention, AudioProjector, frame_windows, local_attention
from hallojax.nn.context_parallel import MODES as CONTEXT_PARALLEL, RING_IMPLS, self_attention
from hallojax.models.echomimic import PROJECTORS, FlashProjector, PreviewProjector
from hallojax.modelconfig import DTYPES, ModelConfig, check_dtypes, with_precision
from hallojax.nn.layers import (  # noqa: F401  (REMAT_POLICIES, PatchEmbed: re-exported)
    MLP, REMAT_POLICIES, Dense, LayerNorm, PatchEmbed, RMSNorm, gelu_erf, gelu_tanh, stacked, timestep_embedding)
from hallojax.nn.rope import apply_rope, frame_coords, grid_coords, rope_cos_sin
from hallojax.sharding import constrain

PREDICTIONS = ("flow", "v", "epsilon")


@dataclasses.dataclass(frozen=True)
class DiTConfig(ModelConfig):
    """Sizes and numerics of a Wan-family DiT. Defaults are Wan2.1-T2V-1.3B (diffusers config names
    in brackets where ours differ)."""

    # fields that change numerics but no parameter shape (safe to override when loading)
    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "precision", "remat", "attention",
                                                 "scan_unroll", "context_parallel")

    num_layers: int = 30
    num_heads: int = 12  # [num_attention_heads]
    head_dim: int = 128  # [attention_head_dim]
    ffn_dim: int = 8960
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    image_dim: int | None = None  # I2V: CLIP image-embedding width (1280)
    added_kv_proj_dim: int | None = None  # I2V: width of the added K/V input (= dim)
    pos_embed_seq_len: int | None = None  # FLF2V: learned position embedding over image tokens
    rope_theta: float = 10000.0
    rope_max_seq_len: int = 1024
    param_dtype: str = "float32"
    dtype: str = "bfloat16"  # compute dtype of matmuls and the residual stream
    precision: str = "auto"  # matmul precision: auto (highest for float32 compute) | default | high | highest
    remat: str = "none"  # one of REMAT_POLICIES
    attention: str = "xla"  # one of ATTENTION_IMPLS
    context_parallel: str = "none"  # self-attention over tokens split on `context`: none | ulysses | ring
    scan_unroll: int = 1  # layers per step of the layer scan (num_layers: no loop; XLA's cost analysis counts
    # a loop body once, so `hallojax.flops` is checked against an unrolled program)

    # --- portrait conditioning: every mechanism off by default; see README "Conditioning" ---
    # extra tokens in self-attention, merged by gated_joint_attention (gate 0 = base output unchanged)
    identity_tokens: bool = False  # HunyuanVideo-Avatar: reference frame tokens at RoPE t = -1, every block
    identity_offset: str = "none"  # "none" | "shift" (h, w + grid size); per-token offsets: call argument
    identity_additive: bool = False  # HunyuanVideo-Avatar: reference through its own patch embed + Linear, added
    reference_net: bool = False  # Hallo3: a second stack of layers on the reference, features joined per layer
    symbiotic: bool = False  # LetsTalk: reference tokens concatenated beside every frame
    motion_frames: int = 0  # latent motion frames from the previous clip (Hallo3, LetsTalk)
    motion_mode: str = "channels"  # "channels": zero-padded and concatenated to the input; "prefix": frames at t < 0
    extra_gate_init: float = 0.0  # initial gate of the extra tokens' attention share (1 = plain joint attention)
    # audio: "none" | "cross_attn" (own attention after the text cross-attention; Hallo3, HunyuanVideo-Avatar,
    # LetsTalk) | "decoupled" (audio K/V inside the text cross-attention, shared query; EchoMimicV3)
    audio: str = "none"
    audio_every: int = 1  # cross_attn: adapters in blocks 0, k, 2k, ...
    audio_in_layers: int = 12  # wav2vec2 hidden states per video frame
    audio_in_dim: int = 768
    audio_window: int = 2  # ± video frames per projection window
    audio_hidden: int = 512
    audio_tokens: int = 32  # tokens per video frame
    audio_dim: int = 768  # width of audio tokens
    audio_align: str = "conv"  # "conv" (K tokens per latent frame) | "group" (4K)
    audio_neighbors: int = 0  # latent frames f ± e of audio context for frame f
    audio_stride: int = 4  # the codec's temporal stride: video frames per latent frame (4: Wan VAE, 1: pixel)
    audio_face_mask: bool = False  # multiply the audio output by a face mask (face-aware adapter)
    audio_scale: float = 1.0
    # "window_mlp" (the window MLP above) | "echomimic_preview" | "echomimic_flash" (EchoMimicV3's released
    # projectors, hallojax.models.echomimic; decoupled audio only)
    audio_projector: str = "window_mlp"
    audio_kv_bias: bool = False  # decoupled audio K/V with biases + the released Flash q_audio (kept, never applied)
    # the 6-way time projection in float32 on the float32 embedding, its output (and the embedding) then
    # rounded to `dtype` (EchoMimicV3 / original Wan), instead of the input rounded first (diffusers)
    time_proj_float32: bool = False
    # what the output is (hallojax.diffusion, hallojax.sample): "flow" (velocity ε − x0, Wan), "v" (VP
    # v-prediction, CogVideoX / Hallo3) or "epsilon" (VP ε-prediction, LetsTalk); learned_variance doubles the
    # output channels to [prediction, learned-range variance] (guided-diffusion's learn_sigma, LetsTalk)
    prediction: str = "flow"
    learned_variance: bool = False

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        small = [f"model.{k}={getattr(self, k)}" for k in ("num_layers", "num_heads", "ffn_dim", "in_channels",
                                                          "out_channels", "text_dim", "freq_dim")
                 if getattr(self, k) < 1]
        if small:
            raise ValueError(f"{', '.join(small)}: must be >= 1")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"model.patch_size={self.patch_size}: expected three positive ints (t, h, w)")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        if self.scan_unroll < 1:
            raise ValueError(f"model.scan_unroll={self.scan_unroll}: expected >= 1 (layers per loop step)")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention={self.attention!r}: expected one of {ATTENTION_IMPLS}")
        check_dtypes(self, "model")
        if self.context_parallel not in CONTEXT_PARALLEL or (self.context_parallel == "ring"
                                                            and self.attention not in RING_IMPLS):
            raise ValueError(f"model.context_parallel={self.context_parallel!r}: expected one of {CONTEXT_PARALLEL}"
                             f" (ring with attention in {RING_IMPLS})")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"model.head_dim={self.head_dim}: must be even and >= 6 for 3D RoPE")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError("model.image_dim and model.added_kv_proj_dim must be set together (I2V)")
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            raise ValueError("model.pos_embed_seq_len needs the image path (model.image_dim)")
        if self.attention == "cudnn" and self.dtype == "float32":
            raise ValueError("model.attention='cudnn' needs dtype bfloat16 or float16 (cuDNN flash attention)")
        if self.identity_offset not in ("none", "shift"):
            raise ValueError(f"model.identity_offset={self.identity_offset!r}: expected 'none' or 'shift'")
        if self.motion_mode not in ("channels", "prefix") or self.motion_frames < 0:
            raise ValueError(f"model.motion_mode={self.motion_mode!r} / motion_frames={self.motion_frames}: "
                             "expected 'channels' or 'prefix' and motion_frames >= 0")
        if self.audio not in ("none", "cross_attn", "decoupled"):
            raise ValueError(f"model.audio={self.audio!r}: expected 'none', 'cross_attn' or 'decoupled'")
        if self.audio_align not in ("conv", "group"):
            raise ValueError(f"model.audio_align={self.audio_align!r}: expected 'conv' or 'group'")
        if self.audio_every < 1 or self.num_layers % self.audio_every:
            raise ValueError(f"model.audio_every={self.audio_every} must divide num_layers={self.num_layers}")
        if self.audio == "decoupled" and self.audio_every != 1:
            raise ValueError("model.audio='decoupled' puts audio K/V in every block: audio_every must be 1")
        if self.audio_face_mask and self.audio == "none":
            raise ValueError("model.audio_face_mask needs an audio mode")
        if self.audio_projector not in PROJECTORS:
            raise ValueError(f"model.audio_projector={self.audio_projector!r}: expected one of {PROJECTORS}")
        if self.audio_projector != "window_mlp" and (self.audio != "decoupled" or self.audio_neighbors
                                                     or self.audio_dim != self.dim or self.audio_stride < 2):
            raise ValueError(f"model.audio_projector={self.audio_projector!r} (EchoMimicV3) needs audio='decoupled', "
                             f"audio_neighbors=0, audio_dim = dim ({self.dim}) and audio_stride >= 2")
        if self.prediction not in PREDICTIONS or (self.learned_variance and self.prediction == "flow"):
            raise ValueError(f"model.prediction={self.prediction!r} / learned_variance={self.learned_variance}: "
                             f"expected one of {PREDICTIONS}; a learned variance needs a VP prediction (v, epsilon)")
        if self.audio_kv_bias and self.audio != "decoupled":
            raise ValueError("model.audio_kv_bias is a decoupled-audio (EchoMimicV3 Flash) option: "
                             "needs audio='decoupled'")

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def output_channels(self) -> int:
        """Channels of the model's output: out_channels, doubled with a learned variance."""
        return self.out_channels * (2 if self.learned_variance else 1)

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)

    @property
    def has_extra_tokens(self) -> bool:
        """Whether self-attention sees extra tokens (and blocks carry their attention gate)."""
        return (self.identity_tokens or self.symbiotic or self.reference_net
                or (self.motion_frames > 0 and self.motion_mode == "prefix"))

    @property
    def embed_channels(self) -> int:
        """Input channels of the patch embedding: latents, plus zero-padded motion latents in "channels" mode."""
        motion = self.out_channels if self.motion_frames > 0 and self.motion_mode == "channels" else 0
        return self.in_channels + motion


def check_video_inputs(latents, timesteps, context, coords, *, in_channels: int, patch, text_dim: int) -> None:
    """The DiTs' shared input checks: latents [B, F, H, W, in_channels] divisible by the (t, h, w) patch,
    timesteps [B], context [B, M, text_dim], coords None or [L, 3] / [B, L, 3] (one per video token)."""
    if latents.ndim != 5 or latents.shape[-1] != in_channels:
        raise ValueError(f"latents have shape {tuple(latents.shape)}; expected [B, F, H, W, "
                         f"{in_channels}] (channels last)")
    b, f, h, w, _ = latents.shape
    for name, n, p in zip("FHW", (f, h, w), patch):
        if n % p:
            raise ValueError(f"latents {tuple(latents.shape)}: {name}={n} is not divisible by patch {p}")
    if timesteps.shape != (b,):
        raise ValueError(f"timesteps have shape {tuple(timesteps.shape)}; expected [{b}]")
    if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != text_dim:
        raise ValueError(f"context has shape {tuple(context.shape)}; expected [{b}, M, {text_dim}]")
    if coords is not None:
        want = f * h * w // math.prod(patch)
        if np.ndim(coords) not in (2, 3) or np.shape(coords)[-2:] != (want, 3) or (
                np.ndim(coords) == 3 and np.shape(coords)[0] != b):
            raise ValueError(f"coords have shape {tuple(np.shape(coords))}; expected [{want}, 3] or "
                             f"[{b}, {want}, 3] (one (t, h, w) per video token)")


class ImageEmbedder(nnx.Module):
    """I2V image-token embedder: LayerNorm -> FeedForward(mult 1, erf GELU) -> LayerNorm (eps 1e-5)."""

    def __init__(self, image_dim: int, dim: int, pos_embed_seq_len: int | None, *, rngs, dtype, param_dtype):
        self.norm1 = LayerNorm(image_dim, 1e-5, affine=True)
        self.ff = MLP(image_dim, image_dim, dim, gelu_erf, axes_in=("embed", "mlp"), axes_out=("mlp", "embed"),
                      rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm2 = LayerNorm(dim, 1e-5, affine=True, axis_name="embed")
        self.pos_embed = (nnx.Param(jnp.zeros((1, pos_embed_seq_len, image_dim), param_dtype),
                                    out_sharding=(None, None, None), eager_sharding=False)
                          if pos_embed_seq_len is not None else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pos_embed is not None:
            if x.shape[1] != self.pos_embed.shape[1]:
                raise ValueError(f"image context has {x.shape[1]} tokens; this model's position embedding "
                                 f"expects {self.pos_embed.shape[1]} (both frames' tokens concatenated)")
            x = x + self.pos_embed[...].astype(x.dtype)
        h = self.norm1(x).astype(self.dtype)
        h = self.ff(h)
        return self.norm2(h).astype(self.dtype)


class Attention(nnx.Module):
    """Wan attention: q/k/v projections, RMSNorm over all heads on q and k, optional RoPE, and for
    I2V cross-attention an added K/V path over image tokens summed before the output projection."""

    def __init__(self, dim: int, num_heads: int, *, eps: float, added_kv_dim: int | None = None,
                 audio_dim: int | None = None, audio_bias: bool = False, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32, impl: str = "xla", context_parallel: str = "none"):
        inner = dim  # Wan: heads * head_dim == dim
        self.num_heads = num_heads
        self.impl = impl
        self.context_parallel = context_parallel  # self-attention only (hallojax.nn.context_parallel)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.to_q = Dense(dim, inner, ("embed", "heads"), **kw)
        self.to_k = Dense(dim, inner, ("embed", "heads"), **kw)
        self.to_v = Dense(dim, inner, ("embed", "heads"), **kw)
        self.to_out = Dense(inner, dim, ("heads", "embed"), **kw)
        self.norm_q = RMSNorm(inner, eps, axis_name="heads")
        self.norm_k = RMSNorm(inner, eps, axis_name="heads")
        if added_kv_dim is not None:
            self.add_k_proj = Dense(added_kv_dim, inner, ("embed", "heads"), **kw)
            self.add_v_proj = Dense(added_kv_dim, inner, ("embed", "heads"), **kw)
            self.norm_added_k = RMSNorm(inner, eps, axis_name="heads")
        else:
            self.add_k_proj = self.add_v_proj = self.norm_added_k = None
        if audio_dim is not None:  # EchoMimicV3 decoupled audio K/V: bias-free (Flash: biased), V zero-initialised
            # input dim sharded by FSDP as the image K/V's (replicated at 1.3B: 2.1 GiB of fp32 state on every chip)
            self.audio_k_proj = Dense(audio_dim, inner, ("embed", "heads"), use_bias=audio_bias, **kw)
            self.audio_v_proj = Dense(audio_dim, inner, ("embed", "heads"), use_bias=audio_bias,
                                      kernel_init=nnx.initializers.zeros_init(), **kw)
            self.norm_audio_k = RMSNorm(inner, eps, axis_name="heads")
        else:
            self.audio_k_proj = self.audio_v_proj = self.norm_audio_k = None
        # EchoMimicV3 Flash's q_audio: its released forward computes it and then uses the shared query
        # instead, so it is kept (checkpoints round-trip, parameter counts match) and never applied
        self.audio_q_proj = (Dense(inner, inner, ("heads", "embed"), **kw) if audio_dim is not None and audio_bias
                             else None)

    def _heads(self, x: jax.Array) -> jax.Array:
        x = x.reshape(*x.shape[:-1], self.num_heads, -1)  # [B, L, N, K]
        return constrain(x, ("act_batch", "act_len", "act_heads", None))

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
                 rope: tuple[jax.Array, jax.Array] | None = None,
                 added_context: jax.Array | None = None, audio: dict | None = None) -> jax.Array:
        """x [B, L, D]; context [B, M, D] (None: self-attention); rope (cos, sin) [B|1, L, K/2];
        added_context [B, M', D_img] for the I2V image path; audio (decoupled mode) a dict with
        tokens [B, F, M_a, D_a], frames, neighbors, scale and face_mask [B, L] | None."""
        kv_in = x if context is None else context
        q = self._heads(self.norm_q(self.to_q(x)))
        k = self._heads(self.norm_k(self.to_k(kv_in)))
        v = self._heads(self.to_v(kv_in))
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        if context is None:
            out, _ = self_attention(q, k, v, self.impl, self.context_parallel)
        else:
            out = dot_product_attention(q, k, v, self.impl)
        if added_context is not None:
            if self.add_k_proj is None:
                raise ValueError("image context given but the model has no added K/V projections "
                                 "(added_kv_proj_dim is None)")
            k_img = self._heads(self.norm_added_k(self.add_k_proj(added_context)))
            v_img = self._heads(self.add_v_proj(added_context))
            out = out + dot_product_attention(q, k_img, v_img, self.impl)
        if audio is not None:
            out = out + self._decoupled_audio(q, audio)
        out = out.reshape(*out.shape[:2], -1)  # [B, L, N·K]
        return self.to_out(out)

    def _decoupled_audio(self, q: jax.Array, audio: dict) -> jax.Array:
        """audio_scale · face_mask ⊙ (per-latent-frame attention of the shared query over audio K/V)."""
        if self.audio_k_proj is None:
            raise ValueError("audio given to cross-attention without decoupled audio projections")
        b, l, n, kd = q.shape
        frames = audio["frames"]
        kv, valid = frame_windows(audio["tokens"], audio["neighbors"])
        k = self.norm_audio_k(self.audio_k_proj(kv)).reshape(*kv.shape[:3], n, kd)
        v = self.audio_v_proj(kv).reshape(*kv.shape[:3], n, kd)
        out = local_attention(q.reshape(b, frames, l // frames, n, kd), k, v, valid).reshape(b, l, n, kd)
        out = out * jnp.asarray(audio["scale"], out.dtype)
        if audio.get("face_mask") is not None:
            out = out * audio["face_mask"][:, :, None, None].astype(out.dtype)
        return out

    def _qkv(self, x: jax.Array, rope) -> tuple[jax.Array, jax.Array, jax.Array]:
        q = self._heads(self.norm_q(self.to_q(x)))
        k = self._heads(self.norm_k(self.to_k(x)))
        v = self._heads(self.to_v(x))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def self_attention_with_extras(self, x: jax.Array, rope, gate: jax.Array, *, extra: jax.Array | None = None,
                                   extra_rope=None, ref: jax.Array | None = None):
        """Self-attention of the video tokens x [B, L, D] that also sees extra tokens through
        `gated_joint_attention`: a token stream `extra` [B, E, D] (identity frame, per-frame reference
        copies, prefix motion frames; RoPE `extra_rope`), which also forms queries over everything, and
        reference-network features `ref` [B, R, D] (keys and values only, no RoPE; Hallo3).
        Returns (video output [B, L, D], extra-stream output [B, E, D] | None)."""
        q, k, v = self._qkv(x, rope)
        ks, vs = [], []
        if extra is not None:
            qe, ke, ve = self._qkv(extra, extra_rope)
            ks.append(ke)
            vs.append(ve)
        if ref is not None:
            ks.append(self._heads(self.norm_k(self.to_k(ref))))
            vs.append(self._heads(self.to_v(ref)))
        k_x, v_x = jnp.concatenate(ks, axis=1), jnp.concatenate(vs, axis=1)
        out, oe = self_attention(q, k, v, self.impl, self.context_parallel, k_x=k_x, v_x=v_x, gate=gate,
                                 q_x=qe if extra is not None else None)
        out = self.to_out(out.reshape(*out.shape[:2], -1))
        out_e = None if oe is None else self.to_out(oe.reshape(*oe.shape[:2], -1))
        return out, out_e


class WanBlock(nnx.Module):
    """adaLN-modulated self-attention (3D RoPE), cross-attention, [audio], GELU-tanh FFN.

    With extra tokens the self-attention also sees them (gated; `Attention.self_attention_with_extras`)
    and the extra token stream goes through the same block ops, never mixed into the video tokens'
    arithmetic, so with the gate at 0 the video output is bit for bit the base model's.
    """

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        dim, dtype, pdt = cfg.dim, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=pdt, impl=cfg.attention, context_parallel=cfg.context_parallel)
        self.scale_shift_table = nnx.Param(  # float32 whatever param_dtype: it is the modulation
            jax.random.normal(rngs.params(), (1, 6, dim), jnp.float32) / dim**0.5,
            out_sharding=(None, None, "embed"), eager_sharding=False)
        self.norm1 = LayerNorm(dim, cfg.eps, affine=False)
        self.attn1 = Attention(dim, cfg.num_heads, eps=cfg.eps, **kw)
        self.norm2 = LayerNorm(dim, cfg.eps, affine=True, axis_name="embed") if cfg.cross_attn_norm else None
        self.attn2 = Attention(dim, cfg.num_heads, eps=cfg.eps, added_kv_dim=cfg.added_kv_proj_dim,
                               audio_dim=cfg.audio_dim if cfg.audio == "decoupled" else None,
                               audio_bias=cfg.audio_kv_bias, **kw)
        self.norm3 = LayerNorm(dim, cfg.eps, affine=False)
        self.ffn = MLP(dim, cfg.ffn_dim, dim, gelu_tanh, axes_in=("embed", "mlp"), axes_out=("mlp", "embed"),
                       act_axes=("act_batch", "act_len", "act_mlp"), rngs=rngs, dtype=dtype, param_dtype=pdt)
        self.extra_gate = (nnx.Param(jnp.full((), cfg.extra_gate_init, jnp.float32))
                           if cfg.has_extra_tokens else None)

    def attn_input(self, x, temb6):
        """The normalised, modulated self-attention input (what Hallo3's reference layers hand over)."""
        mod = self.scale_shift_table[...].astype(jnp.float32) + temb6.astype(jnp.float32)
        return (self.norm1(x) * (1 + mod[:, 1:2]) + mod[:, 0:1]).astype(x.dtype)

    def __call__(self, x, temb6, context, rope, image_context=None, *, extra=None, extra_rope=None, ref=None,
                 audio=None, audio_adapter=None, audio_on=None):
        """x [B, L, D]; temb6 [B, 6, D]; context [B, M, D]; rope (cos, sin).

        extra [B, E, D] / extra_rope: extra token stream; ref [B, R, D]: this layer's reference-network
        features; audio: dict(tokens [B, F, M, D_a], frames, neighbors, scale, face_mask [B, L] | None);
        audio_adapter: this layer's `AudioCrossAttention` (cross_attn mode), or None; audio_on: a traced
        bool choosing whether it applies in this layer (every k-th layer), None = always.
        Returns (x, extra)."""
        dtype = x.dtype
        mod = self.scale_shift_table[...].astype(jnp.float32) + temb6.astype(jnp.float32)  # [B, 6, D]
        shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, i : i + 1] for i in range(6))

        def modulated(t, sh, sc):
            return (self.norm1(t) * (1 + sc) + sh).astype(dtype)

        def gated_residual(t, a, g):
            return (t.astype(jnp.float32) + a.astype(jnp.float32) * g).astype(dtype)

        h = modulated(x, shift, scale)
        if extra is None and ref is None:
            a, ae = self.attn1(h, rope=rope), None
        else:
            he = modulated(extra, shift, scale) if extra is not None else None
            a, ae = self.attn1.self_attention_with_extras(h, rope, self.extra_gate[...], extra=he,
                                                          extra_rope=extra_rope, ref=ref)
        a = checkpoint_name(a, "attn_out")
        x = constrain(gated_residual(x, a, gate), ("act_batch", "act_len", "act_embed"))
        if extra is not None:
            extra = gated_residual(extra, ae, gate)

        def cross(t, audio_kw=None):
            hh = self.norm2(t).astype(dtype) if self.norm2 is not None else t
            return t + self.attn2(hh, context, added_context=image_context, audio=audio_kw).astype(dtype)

        x = cross(x, audio if (audio is not None and self.attn2.audio_k_proj is not None) else None)
        if extra is not None:
            extra = cross(extra)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        if audio_adapter is not None:
            def add_audio(t):
                t = t + audio_adapter(t, audio["tokens"], frames=audio["frames"], neighbors=audio["neighbors"],
                                      face_mask=audio.get("face_mask")).astype(dtype)
                # pin the residual stream's layout: the partitioner must not re-plan the rest of the
                # block around the adapter (another reduction order would break the bitwise zero-init rule)
                return constrain(t, ("act_batch", "act_len", "act_embed"))

            if audio_on is None:
                x = add_audio(x)
            else:
                keep = lambda t: constrain(t, ("act_batch", "act_len", "act_embed"))  # noqa: E731
                x = keep(jax.lax.cond(audio_on, add_audio, keep, x))

        def ffn(t):
            hh = (self.norm3(t) * (1 + c_scale) + c_shift).astype(dtype)
            return (t.astype(jnp.float32) + self.ffn(hh).astype(jnp.float32) * c_gate).astype(dtype)

        x = constrain(ffn(x), ("act_batch", "act_len", "act_embed"))
        return x, (ffn(extra) if extra is not None else None)


def _audio_projector(cfg: DiTConfig, kw: dict) -> nnx.Module:
    """The configured audio projector: features per video frame -> tokens per latent frame [B, F, M, D_a]."""
    if cfg.audio_projector == "echomimic_preview":
        return PreviewProjector(in_dim=cfg.audio_in_dim, out_dim=cfg.audio_dim, tokens_per_frame=cfg.audio_in_layers,
                                stride=cfg.audio_stride, **kw)
    if cfg.audio_projector == "echomimic_flash":
        return FlashProjector(in_layers=cfg.audio_in_layers, in_dim=cfg.audio_in_dim, window=cfg.audio_window,
                              hidden=cfg.audio_hidden, tokens=cfg.audio_tokens, out_dim=cfg.audio_dim,
                              stride=cfg.audio_stride, **kw)
    return AudioProjector(in_layers=cfg.audio_in_layers, in_dim=cfg.audio_in_dim, window=cfg.audio_window,
                          hidden=cfg.audio_hidden, tokens=cfg.audio_tokens, out_dim=cfg.audio_dim,
                          align=cfg.audio_align, stride=cfg.audio_stride, **kw)


@dataclasses.dataclass(frozen=True)
class ReferenceCache:
    """Per-layer reference-network features [L, B, R, D] (Hallo3). Computed once per reference by
    `WanDiT.encode_reference` and reused for every sampling step and every CFG branch."""

    features: jax.Array


jax.tree_util.register_dataclass(ReferenceCache, data_fields=["features"], meta_fields=[])


class WanDiT(nnx.Module):
    """Wan2.1 T2V / I2V transformer with the portrait-conditioning mechanisms as config choices.

    Call: ``model(latents, timesteps, context, *, image_context=None, coords=None, reference=None,
    reference_cache=None, identity_offsets=None, audio=None, face_mask=None, motion=None)``
      latents [B, F, H, W, C_in], timesteps [B] (0..1000, float or int), context [B, M, text_dim]
      (umT5 states; the Wan pipeline zero-pads to 512), image_context [B, 257, image_dim] (I2V only),
      coords: optional int [L, 3] or [B, L, 3] RoPE (t, h, w) coordinates of the video tokens
      (default: the grid, from 0).
      Conditioning (each needed only when its mechanism is on): reference [B, 1, H, W, C_ref] reference
      latent frame (C_ref <= embed channels, zero-padded); reference_cache from `encode_reference`;
      identity_offsets int [H'·W', 2] per-token RoPE offsets of the identity frame; audio
      [B, T, audio_in_layers, audio_in_dim] per video frame (T = 1 + 4(F − 1)); face_mask [B, F, H', W']
      or [B, L] on the token grid; motion [B, n, H, W, C_out] latents of the previous clip's last frames.
    Returns [B, F, H, W, C_out] in the compute dtype (extra tokens are dropped before the head).
    """

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dim, dtype, pdt = cfg.dim, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        f32 = jnp.float32
        with nnx.use_eager_sharding(False):
            extra_in = cfg.embed_channels if cfg.embed_channels != cfg.in_channels else None
            self.patch_embedding = PatchEmbed(cfg.patch_size, cfg.embed_channels, dim, rngs=rngs, dtype=dtype,
                                              param_dtype=pdt, zero_from=cfg.in_channels if extra_in else None)
            # every large weight names one axis for fsdp and one for tensor, so FSDP+TP splits it fully
            self.time_embedder = MLP(cfg.freq_dim, dim, dim, jax.nn.silu, axes_in=(None, "embed"),
                                     axes_out=("embed", "mlp"), rngs=rngs, dtype=f32, param_dtype=f32)
            self.time_proj = Dense(dim, 6 * dim, ("embed", "mlp"), rngs=rngs, param_dtype=pdt,
                                   dtype=f32 if cfg.time_proj_float32 else dtype)
            self.text_embedder = MLP(cfg.text_dim, dim, dim, gelu_tanh, axes_in=("mlp", "embed"),
                                     axes_out=("embed", "mlp"), rngs=rngs, dtype=dtype, param_dtype=pdt)
            self.image_embedder = (ImageEmbedder(cfg.image_dim, dim, cfg.pos_embed_seq_len, rngs=rngs,
                                                 dtype=dtype, param_dtype=pdt)
                                   if cfg.image_dim is not None else None)
            self.blocks = stacked(WanBlock, cfg.num_layers, rngs, cfg)
            self.norm_out = LayerNorm(dim, cfg.eps, affine=False)
            self.proj_out = Dense(dim, cfg.output_channels * cfg.patch_volume, ("embed", "mlp"), rngs=rngs,
                                  dtype=dtype, param_dtype=pdt)
            self.scale_shift_table = nnx.Param(
                jax.random.normal(rngs.params(), (1, 2, dim), f32) / dim**0.5,
                out_sharding=(None, None, "embed"), eager_sharding=False)

            # --- conditioning modules (None unless configured) ---
            kw = dict(rngs=rngs, dtype=dtype, param_dtype=pdt)
            additive = cfg.identity_additive
            self.identity_embedding = (PatchEmbed(cfg.patch_size, cfg.out_channels, dim, **kw) if additive else None)
            self.identity_proj = (Dense(dim, dim, ("embed", "mlp"), kernel_init=nnx.initializers.zeros_init(), **kw)
                                  if additive else None)  # zero-init: no change at the start
            self.reference_embedding = (PatchEmbed(cfg.patch_size, cfg.embed_channels, dim, **kw)
                                        if cfg.reference_net else None)
            self.reference_blocks = (stacked(WanBlock, cfg.num_layers, rngs, cfg.replace(
                reference_net=False, identity_tokens=False, symbiotic=False, motion_mode="channels", audio="none",
                audio_face_mask=False)) if cfg.reference_net else None)
            self.audio_proj = _audio_projector(cfg, kw) if cfg.audio != "none" else None
            self.audio_adapters = (stacked(AudioCrossAttention, cfg.num_layers // cfg.audio_every, rngs, dim,
                                            cfg.num_heads, cfg.audio_dim, eps=cfg.eps, dtype=dtype, param_dtype=pdt)
                                   if cfg.audio == "cross_attn" else None)

    # ---------------------------------------------------------------------------------------------
    def check_inputs(self, latents, timesteps, context, image_context, coords=None):
        cfg = self.cfg
        check_video_inputs(latents, timesteps, context, coords, in_channels=cfg.in_channels, patch=cfg.patch_size,
                           text_dim=cfg.text_dim)
        b = latents.shape[0]
        if image_context is not None:
            if cfg.image_dim is None:
                raise ValueError("image_context given to a model without an image embedder (T2V config)")
            if image_context.ndim != 3 or image_context.shape[0] != b or image_context.shape[-1] != cfg.image_dim:
                raise ValueError(f"image_context has shape {tuple(image_context.shape)}; expected "
                                 f"[{b}, M', {cfg.image_dim}]")

    def _require(self, name, value, needed: bool, shape_hint: str):
        if needed and value is None:
            raise ValueError(f"this model's config needs `{name}` {shape_hint}")
        if not needed and value is not None:
            raise ValueError(f"`{name}` given but no configured mechanism uses it")

    def _embed_frames(self, embed: PatchEmbed, lat: jax.Array, channels: int, what: str) -> jax.Array:
        """Latent frames [B, n, H, W, C <= channels] through a patch embedding (channels zero-padded)."""
        if lat.ndim != 5 or lat.shape[-1] > channels:
            raise ValueError(f"{what} has shape {tuple(lat.shape)}; expected [B, n, H, W, C] with C <= {channels}")
        lat = jnp.pad(lat, ((0, 0),) * 4 + ((0, channels - lat.shape[-1]),))
        return embed(lat)

    def _timestep(self, timesteps, b):
        # float32 MLP, then rounded to the compute dtype as the reference does (`temb.type_as(...)`)
        dtype = DTYPES[self.cfg.dtype]
        temb = self.time_embedder(timestep_embedding(timesteps, self.cfg.freq_dim))  # [B, D] float32
        if self.cfg.time_proj_float32:  # EchoMimicV3: projection in float32, e and e0 rounded after it
            temb6 = self.time_proj(jax.nn.silu(temb)).astype(dtype).reshape(b, 6, self.cfg.dim)
            return temb.astype(dtype), temb6
        temb = temb.astype(dtype)
        temb6 = self.time_proj(jax.nn.silu(temb.astype(jnp.float32)).astype(dtype)).reshape(b, 6, self.cfg.dim)
        return temb, temb6

    def _run_blocks(self, blocks, x, temb6, ctx, rope, img, *, extra=None, extra_rope=None, ref=None,
                    audio=None, collect: bool = False):
        """Scan `blocks` (stacked) over layers, one layer per step; audio adapters in blocks 0, k, 2k, ...
        (k = audio_every): layer i uses adapter i // k, behind a `lax.cond` when k > 1, so the loop body
        has the same shape with or without adapters (a converted base model's numerics stay exact).
        collect: also return every layer's self-attention input [L, B, L_tokens, D] (reference net)."""
        cfg = self.cfg
        graphdef, state = nnx.split(blocks)
        xs = {"blocks": state, "layer": jnp.arange(cfg.num_layers)}
        use_audio = self.audio_adapters is not None and not collect
        k = cfg.audio_every
        adapters = None
        if use_audio:
            adapter_def, adapter_state = nnx.split(self.audio_adapters)
            if k == 1:
                xs["audio"] = adapter_state  # one adapter per layer: scanned alongside the blocks
            else:
                adapters = adapter_state  # [L / k, ...]: indexed by layer // k
        if ref is not None:
            xs["ref"] = ref

        # static settings (ints, floats) reach the body by closure; only arrays go through the scan
        audio_static = {n: v for n, v in (audio or {}).items() if n in ("frames", "neighbors", "scale")}
        audio_arrays = {n: v for n, v in (audio or {}).items() if n not in audio_static} if audio else None

        def layer(carry, xs, temb6, ctx, cos, sin, img, extra_rope, audio_arrays, adapters):
            x, extra = carry
            x = checkpoint_name(x, "layer_input")
            if extra is not None:
                extra = checkpoint_name(extra, "layer_input")
            audio = {**audio_arrays, **audio_static} if audio_arrays is not None else None
            block = nnx.merge(graphdef, xs["blocks"])
            adapter = audio_on = None
            if use_audio and k == 1:
                adapter = nnx.merge(adapter_def, xs["audio"])
            elif use_audio:
                i = xs["layer"]
                adapter = nnx.merge(adapter_def, jax.tree.map(
                    lambda a: jax.lax.dynamic_index_in_dim(a, i // k, keepdims=False), adapters))
                audio_on = i % k == 0
            attn_in = block.attn_input(x, temb6) if collect else None
            x, extra = block(x, temb6, ctx, (cos, sin), img, extra=extra, extra_rope=extra_rope, ref=xs.get("ref"),
                             audio=audio, audio_adapter=adapter, audio_on=audio_on)
            return (x, extra), attn_in

        if cfg.remat != "none":
            layer = nnx.remat(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        scan = nnx.scan(layer, in_axes=(nnx.Carry, 0, None, None, None, None, None, None, None, None),
                        out_axes=(nnx.Carry, 0), unroll=min(cfg.scan_unroll, cfg.num_layers))
        (x, extra), collected = scan((x, extra), xs, temb6, ctx, rope[0], rope[1], img, extra_rope, audio_arrays,
                                     adapters)
        return x, extra, collected

    # ---------------------------------------------------------------------------------------------
    @with_precision
    def encode_reference(self, reference: jax.Array) -> ReferenceCache:
        """Hallo3's reference network on the reference latent [B, 1, H, W, C] at timestep 0, with no
        text (so one cache serves every sampling step and both CFG branches): per-layer features."""
        cfg = self.cfg
        if self.reference_blocks is None:
            raise ValueError("encode_reference needs model.reference_net=True")
        dtype = DTYPES[cfg.dtype]
        b, _, h, w, _ = reference.shape
        x = self._embed_frames(self.reference_embedding, reference.astype(dtype), cfg.embed_channels, "reference")
        _, temb6 = self._timestep(jnp.zeros((b,), jnp.float32), b)
        ctx = self.text_embedder(jnp.zeros((b, 1, cfg.text_dim), dtype))  # the null prompt
        pt, ph, pw = cfg.patch_size
        cos, sin = rope_cos_sin(grid_coords(1, h // ph, w // pw), cfg.head_dim, cfg.rope_theta, cfg.rope_max_seq_len)
        _, _, feats = self._run_blocks(self.reference_blocks, x, temb6, ctx, (cos[None], sin[None]), None,
                                       collect=True)
        return ReferenceCache(feats)

    def extra_streams(self, reference, motion, identity_offsets, grid) -> tuple[jax.Array | None, np.ndarray | None]:
        """The extra token stream [B, E, D] and its RoPE coordinates [E, 3]: the identity frame at t = −1
        (spatial offsets: none / shift by the grid size / per-token), reference copies beside every frame
        (symbiotic: same t, w shifted by the grid width), prefix motion frames at t = −n..−1."""
        cfg = self.cfg
        dtype = DTYPES[cfg.dtype]
        gf, gh, gw = grid
        streams, coords = [], []
        if reference is not None and (cfg.identity_tokens or cfg.symbiotic):
            if reference.shape[1:4] != (1, gh * cfg.patch_size[1], gw * cfg.patch_size[2]):
                raise ValueError(f"reference has shape {tuple(reference.shape)}; expected [B, 1, "
                                 f"{gh * cfg.patch_size[1]}, {gw * cfg.patch_size[2]}, C] (one latent frame)")
            ref_tokens = self._embed_frames(self.patch_embedding, reference.astype(dtype), cfg.embed_channels,
                                            "reference")  # [B, P, D]
            if cfg.identity_tokens:
                offset = identity_offsets if identity_offsets is not None else cfg.identity_offset
                streams.append(ref_tokens)
                coords.append(frame_coords(gh, gw, t=-1, offset=offset))
            if cfg.symbiotic:
                streams.append(jnp.tile(ref_tokens, (1, gf, 1)))
                coords.append(grid_coords(gf, gh, gw, w0=gw))
        if cfg.motion_frames > 0 and cfg.motion_mode == "prefix":
            n = cfg.motion_frames // cfg.patch_size[0]
            streams.append(self._embed_frames(self.patch_embedding, motion.astype(dtype), cfg.embed_channels,
                                              "motion"))
            coords.append(grid_coords(n, gh, gw, t0=-n))
        if not streams:
            return None, None
        traced = any(isinstance(c, jax.Array) for c in coords)
        return jnp.concatenate(streams, axis=1), (jnp.concatenate if traced else np.concatenate)(coords)

    @with_precision
    def __call__(self, latents, timesteps, context, *, image_context=None, coords=None, reference=None,
                 reference_cache=None, identity_offsets=None, audio=None, face_mask=None, motion=None):
        cfg = self.cfg
        dtype = DTYPES[cfg.dtype]
        self.check_inputs(latents, timesteps, context, image_context, coords)
        b, f, h, w, _ = latents.shape
        pt, ph, pw = cfg.patch_size
        gf, gh, gw = f // pt, h // ph, w // pw
        needs_ref = cfg.identity_tokens or cfg.identity_additive or cfg.symbiotic
        self._require("reference", reference, needs_ref or (cfg.reference_net and reference_cache is None),
                      "[B, 1, H, W, C]")
        self._require("audio", audio, cfg.audio != "none", "[B, T, layers, D]")
        self._require("motion", motion, cfg.motion_frames > 0, f"[B, {cfg.motion_frames}, H, W, C]")
        self._require("face_mask", face_mask, cfg.audio_face_mask, "[B, F, H', W'] on the token grid")
        if identity_offsets is not None and not cfg.identity_tokens:
            raise ValueError("`identity_offsets` given but model.identity_tokens is off")
        if reference_cache is not None and not cfg.reference_net:
            raise ValueError("`reference_cache` given but model.reference_net is off")
        if motion is not None and motion.shape[1] != cfg.motion_frames:
            raise ValueError(f"motion has {motion.shape[1]} frames; model.motion_frames = {cfg.motion_frames}")

        x_in = latents.astype(dtype)
        if cfg.embed_channels != cfg.in_channels:  # motion frames as zero-padded extra channels
            from hallojax.conditioning import motion_channels

            x_in = jnp.concatenate([x_in, motion_channels(motion.astype(dtype), f)], axis=-1)
        x = self.patch_embedding(x_in)  # [B, L, D]
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        if coords is None:
            coords = grid_coords(gf, gh, gw)
        cos, sin = rope_cos_sin(coords, cfg.head_dim, cfg.rope_theta, cfg.rope_max_seq_len)
        if cos.ndim == 2:
            cos, sin = cos[None], sin[None]  # [1, L, K/2]

        extra, extra_coords = self.extra_streams(reference, motion, identity_offsets, (gf, gh, gw))
        extra_rope = None
        if extra is not None:
            ce, se = rope_cos_sin(extra_coords, cfg.head_dim, cfg.rope_theta, cfg.rope_max_seq_len)
            extra_rope = (ce[None], se[None])
        if cfg.identity_additive:
            add = self.identity_proj(self._embed_frames(self.identity_embedding, reference.astype(dtype),
                                                        cfg.out_channels, "reference"))  # [B, P, D]
            x = x + jnp.tile(add, (1, gf, 1)).astype(dtype)

        temb, temb6 = self._timestep(timesteps, b)
        ctx = self.text_embedder(context.astype(dtype))  # [B, M, D]
        img = self.image_embedder(image_context.astype(dtype)) if image_context is not None else None

        ref_feats = None
        if cfg.reference_net:
            cache = reference_cache if reference_cache is not None else self.encode_reference(reference)
            ref_feats = cache.features  # [L, B, R, D]

        audio_kw = None
        if audio is not None:
            tokens = self.audio_proj(audio.astype(dtype))  # [B, F', M, D_a]
            if tokens.shape[1] != gf:
                raise ValueError(f"audio covers {audio.shape[1]} video frames = {tokens.shape[1]} latent frames; "
                                 f"the latents have {gf}")
            mask = None
            if face_mask is not None:
                mask = face_mask.reshape(b, -1)
                if mask.shape[1] != gf * gh * gw:
                    raise ValueError(f"face_mask has shape {tuple(face_mask.shape)}; expected [{b}, {gf}, {gh}, {gw}]")
            audio_kw = dict(tokens=tokens, frames=gf, neighbors=cfg.audio_neighbors, scale=cfg.audio_scale,
                            face_mask=mask)

        x, _, _ = self._run_blocks(self.blocks, x, temb6, ctx, (cos, sin), img, extra=extra, extra_rope=extra_rope,
                                   ref=ref_feats, audio=audio_kw)

        mod = self.scale_shift_table[...].astype(jnp.float32) + temb[:, None].astype(jnp.float32)  # [B, 2, D]
        shift, scale = mod[:, 0:1], mod[:, 1:2]
        x = (self.norm_out(x) * (1 + scale) + shift).astype(dtype)
        x = self.proj_out(x)  # [B, L, pt·ph·pw·C]
        x = x.reshape(b, gf, gh, gw, pt, ph, pw, cfg.output_channels)
        x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)  # [B, F', pt, H', ph, W', pw, C]
        return x.reshape(b, f, h, w, cfg.output_channels)


def build_model(cfg: DiTConfig, seed: int = 0) -> WanDiT:
    return WanDiT(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: DiTConfig) -> WanDiT:
    """The model with ShapeDtypeStruct leaves: free, even at 14B."""
    return nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0)))


def param_count(model_or_state) -> int:
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
