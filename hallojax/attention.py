"""Attention: the kernel dispatch and Wan's self/cross-attention module.

Layout is [B, L, N, K] throughout. `dot_product_attention` picks the kernel by name:
``xla`` (portable einsum + float32 softmax, the CPU/TPU default) or ``cudnn`` (fused cuDNN flash
attention through `jax.nn.dot_product_attention`, GPU only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hallojax.layers import Dense, RMSNorm
from hallojax.rope import apply_rope
from hallojax.sharding import constrain

ATTENTION_IMPLS = ("xla", "cudnn")


def _logits(q, k):
    return jnp.einsum("blnk,bmnk->bnlm", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "xla") -> jax.Array:
    """softmax(q·kᵀ/√K)·v for q [B, L, N, K], k/v [B, M, N, K] -> [B, L, N, K]; no mask."""
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if impl != "xla":
        raise ValueError(f"attention impl {impl!r}: expected one of {ATTENTION_IMPLS}")
    probs = jax.nn.softmax(_logits(q, k), axis=-1).astype(v.dtype)
    return jnp.einsum("bnlm,bmnk->blnk", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)


def logsumexp_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """log Σ_m exp(q·k_m/√K): float32 [B, L, N], the softmax normaliser of `dot_product_attention`."""
    return jnp.moveaxis(jax.nn.logsumexp(_logits(q, k), axis=-1), 1, 2)


def gated_joint_attention(q, k, v, k_extra, v_extra, gate: jax.Array, impl: str = "xla") -> jax.Array:
    """Attention of q over [k; k_extra] whose extra share is scaled by `gate`.

    With both attentions normalised separately, joint softmax attention over the concatenated keys is
    out = out_v + w·(out_e − out_v), w = σ(lse_e − lse_v). We use out_v + gate·w·(out_e − out_v):
    gate = 1 is exactly joint attention; gate = 0 returns out_v computed exactly as without extra tokens
    (bitwise), while the gate still receives a gradient: the zero-init rule for token-level conditioning.
    """
    out_v = dot_product_attention(q, k, v, impl)
    out_e = dot_product_attention(q, k_extra, v_extra, impl)
    w = jax.nn.sigmoid(logsumexp_scores(q, k_extra) - logsumexp_scores(q, k))[..., None]  # [B, L, N, 1]
    delta = (gate * w) * (out_e.astype(jnp.float32) - out_v.astype(jnp.float32))
    return (out_v.astype(jnp.float32) + delta).astype(out_v.dtype)


class Attention(nnx.Module):
    """Wan attention: q/k/v projections, RMSNorm over all heads on q and k, optional RoPE, and for
    I2V cross-attention an added K/V path over image tokens summed before the output projection."""

    def __init__(self, dim: int, num_heads: int, *, eps: float, added_kv_dim: int | None = None,
                 audio_dim: int | None = None, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 impl: str = "xla"):
        inner = dim  # Wan: heads * head_dim == dim
        self.num_heads = num_heads
        self.impl = impl
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
        if audio_dim is not None:  # EchoMimicV3 decoupled audio K/V: bias-free, V zero-initialised
            self.audio_k_proj = Dense(audio_dim, inner, (None, "heads"), use_bias=False, **kw)
            self.audio_v_proj = Dense(audio_dim, inner, (None, "heads"), use_bias=False,
                                      kernel_init=nnx.initializers.zeros_init(), **kw)
            self.norm_audio_k = RMSNorm(inner, eps, axis_name="heads")
        else:
            self.audio_k_proj = self.audio_v_proj = self.norm_audio_k = None

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
        from hallojax.audio import frame_windows, local_attention  # audio imports this module

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
        out = gated_joint_attention(q, k, v, k_x, v_x, gate, self.impl)
        out = self.to_out(out.reshape(*out.shape[:2], -1))
        out_e = None
        if extra is not None:
            oe = dot_product_attention(qe, jnp.concatenate([k, k_x], axis=1), jnp.concatenate([v, v_x], axis=1),
                                       self.impl)
            out_e = self.to_out(oe.reshape(*oe.shape[:2], -1))
        return out, out_e
