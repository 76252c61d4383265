"""Pieces shared by the audio and text encoders: activations by transformers name, attention with an
additive bias and a key-padding mask, a channels-last 1-D convolution, and config (de)serialisation helpers."""

from __future__ import annotations


import jax
import jax.numpy as jnp



# transformers ACT2FN names -> functions (evaluated in float32 by the callers)
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, bias: jax.Array | None = None,
              key_mask: jax.Array | None = None) -> jax.Array:
    """softmax(scale·q·kᵀ + bias)·v with padded keys excluded.

    q [B, L, N, K], k/v [B, M, N, K]; bias broadcastable to [B, N, L, M] (float32); key_mask [B, M]
    (True = a real token). Logits and softmax in float32, as transformers' eager/SDPA paths do in fp32.
    """
    logits = jnp.einsum("blnk,bmnk->bnlm", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnlm,bmnk->blnk", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)


def conv1d(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 0, groups: int = 1) -> jax.Array:
    """x [B, T, I], kernel [K, I/groups, O] (torch Conv1d weight [O, I, K] transposed) -> [B, T', O] in float32."""
    return jax.lax.conv_general_dilated(x, kernel, window_strides=(stride,), padding=[(padding, padding)],
                                        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups,
                                        preferred_element_type=jnp.float32)
