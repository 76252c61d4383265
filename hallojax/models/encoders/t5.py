"""T5 / umT5 text encoder in Flax NNX, op for op transformers' `T5EncoderModel` / `UMT5EncoderModel`.

    model, cfg = load_pretrained("ckpt/umt5-xxl")                     # see `hallojax convert umt5`
    tokenizer = load_tokenizer("Wan2.1-T2V-1.3B-Diffusers/tokenizer")
    context = encode_text(model, tokenizer, ["a cat"], max_length=512)  # [B, 512, 4096], the DiT's context

RMSNorm without mean subtraction (float32), no biases, attention without 1/√d scaling plus a learned
relative-position bias (bidirectional log buckets): T5 has one table, in layer 0, shared by all layers;
umT5 has one per layer. Feed-forward: gated (``wi_0``, ``wi_1``, ``wo``: act(x·wi_0) ⊙ x·wi_1 -> wo,
"gated-gelu" = tanh GELU) or plain (``wi``, ``wo``: act(x·wi) -> wo, original T5's ReLU).

Numerics: matmuls run in `dtype` with float32 accumulation; the residual stream, the norms, ``wo``
(transformers keeps it in float32: ``_keep_in_fp32_modules``) and the softmax are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import math
import re
from typing import ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hallojax.models.encoders.common import activation, attention
from hallojax.modelconfig import DTYPES, ModelConfig, check_dtypes, with_precision
from hallojax.nn.layers import Dense, RMSNorm, stacked
from hallojax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig(ModelConfig):
    """Sizes of a T5-family encoder. Defaults are the umT5-XXL encoder of Wan 2.1 (transformers config
    names in brackets)."""

    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "precision")

    vocab_size: int = 256384
    dim: int = 4096  # [d_model]
    head_dim: int = 64  # [d_kv]
    num_heads: int = 64
    ffn_dim: int = 10240  # [d_ff]
    num_layers: int = 24
    num_buckets: int = 32  # [relative_attention_num_buckets]
    max_distance: int = 128  # [relative_attention_max_distance]
    eps: float = 1e-6  # [layer_norm_epsilon]
    act: str = "gelu_new"  # [dense_act_fn]
    gated: bool = True  # [is_gated_act]; feed_forward_proj = "gated-{act}" or "{act}"
    per_layer_bias: bool = True  # umT5: a position-bias table in every layer; T5: only layer 0's, shared
    param_dtype: str = "float32"
    dtype: str = "bfloat16"  # matmul dtype (Wan runs umT5 in bfloat16)
    precision: str = "auto"  # matmul precision (hallojax.modelconfig): auto = highest for float32

    def __post_init__(self):
        activation(self.act)
        check_dtypes(self, "t5")
        for name in ("vocab_size", "dim", "head_dim", "num_heads", "ffn_dim", "num_layers", "num_buckets"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"t5 {name}={getattr(self, name)}: must be positive")
        if self.num_buckets < 4 or self.max_distance <= self.num_buckets // 4:
            raise ValueError(f"t5 num_buckets={self.num_buckets}, max_distance={self.max_distance}: need "
                             "num_buckets >= 4 and max_distance > num_buckets / 4")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def variant(self) -> str:
        return "umt5" if self.per_layer_bias else "t5"



class T5Output(NamedTuple):
    last_hidden_state: jax.Array  # [B, M, D] after the final norm
    hidden_states: jax.Array | None  # [num_layers + 1, B, M, D]: embeddings, then each layer's output


@functools.lru_cache(maxsize=64)
def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets of (key - query) positions, [q_len, k_len] int32.

    Half the buckets for each sign; within a half, exact for |d| < n/4, then logarithmic up to
    `max_distance`. Computed on the host in float32 in transformers' order (log, divide, scale, truncate)
    so bucket edges fall where they fall there.
    """
    rel = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        ratio = np.log(rel.astype(np.float32) / np.float32(max_exact))
    ratio = ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = max_exact + np.where(np.isfinite(ratio), ratio, 0).astype(np.int64)  # truncation toward zero
    large = np.minimum(large, half - 1)
    out = (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)
    out.setflags(write=False)
    return out


class PositionBias(nnx.Module):
    """A [num_buckets, heads] table -> additive bias [1, heads, L, M]."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int, *, rngs: nnx.Rngs, param_dtype):
        self.table = nnx.Param(jax.random.normal(rngs.params(), (num_buckets, num_heads), param_dtype),
                               out_sharding=(None, "heads"))
        self.num_buckets, self.max_distance = num_buckets, max_distance

    def __call__(self, q_len: int, k_len: int) -> jax.Array:
        idx = relative_position_buckets(q_len, k_len, self.num_buckets, self.max_distance)
        values = jnp.take(self.table[...].astype(jnp.float32), jnp.asarray(idx), axis=0)  # [L, M, H]
        return jnp.transpose(values, (2, 0, 1))[None]


class T5Attention(nnx.Module):
    def __init__(self, cfg: T5EncoderConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=False)
        d, inner = cfg.dim, cfg.inner_dim
        self.q = Dense(d, inner, ("embed", "heads"), **kw)
        self.k = Dense(d, inner, ("embed", "heads"), **kw)
        self.v = Dense(d, inner, ("embed", "heads"), **kw)
        self.o = Dense(inner, d, ("heads", "embed"), **kw)
        self.num_heads = cfg.num_heads
        self.position_bias = (PositionBias(cfg.num_buckets, cfg.num_heads, cfg.max_distance, rngs=rngs,
                                           param_dtype=param_dtype) if cfg.per_layer_bias else None)

    def _heads(self, x):
        x = x.reshape(*x.shape[:-1], self.num_heads, -1)
        return constrain(x, ("act_batch", "act_len", "act_heads", None))

    def __call__(self, x, key_mask, shared_bias):
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        n = x.shape[1]
        bias = self.position_bias(n, n) if self.position_bias is not None else shared_bias
        o = attention(q, k, v, scale=1.0, bias=bias, key_mask=key_mask)  # T5: no 1/sqrt(d) scaling
        return self.o(o.reshape(*o.shape[:2], -1))


class T5FeedForward(nnx.Module):
    def __init__(self, cfg: T5EncoderConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=False)
        if cfg.gated:
            self.wi_0 = Dense(cfg.dim, cfg.ffn_dim, ("embed", "mlp"), **kw)
            self.wi_1 = Dense(cfg.dim, cfg.ffn_dim, ("embed", "mlp"), **kw)
            self.wi = None
        else:
            self.wi = Dense(cfg.dim, cfg.ffn_dim, ("embed", "mlp"), **kw)
            self.wi_0 = self.wi_1 = None
        # transformers keeps `wo` in float32 whatever the model dtype (_keep_in_fp32_modules)
        self.wo = Dense(cfg.ffn_dim, cfg.dim, ("mlp", "embed"), rngs=rngs, dtype=jnp.float32,
                        param_dtype=jnp.float32, use_bias=False)
        self.act = activation(cfg.act)
        self.dtype = dtype

    def __call__(self, x):
        if self.wi is not None:
            h = self.wi(x)
            h = self.act(h.astype(jnp.float32)).astype(h.dtype)
        else:
            g = self.wi_0(x)
            h = self.act(g.astype(jnp.float32)).astype(g.dtype) * self.wi_1(x)
        h = constrain(h, ("act_batch", "act_len", "act_mlp"))
        return self.wo(h.astype(jnp.float32))


class T5Block(nnx.Module):
    def __init__(self, cfg: T5EncoderConfig, *, rngs: nnx.Rngs):
        dtype, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        self.attn_norm = RMSNorm(cfg.dim, cfg.eps, axis_name="embed")
        self.attn = T5Attention(cfg, rngs=rngs, dtype=dtype, param_dtype=pdt)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.eps, axis_name="embed")
        self.ffn = T5FeedForward(cfg, rngs=rngs, dtype=dtype, param_dtype=pdt)
        self.dtype = dtype

    def __call__(self, x, key_mask, shared_bias):  # x float32 [B, M, D]
        x = x + self.attn(self.attn_norm(x).astype(self.dtype), key_mask, shared_bias).astype(jnp.float32)
        x = x + self.ffn(self.ffn_norm(x).astype(self.dtype)).astype(jnp.float32)
        return constrain(x, ("act_batch", "act_len", "act_embed"))


class T5Encoder(nnx.Module):
    """T5 / umT5 encoder stack.

    Call: ``model(input_ids, attention_mask=None, *, output_hidden_states=False) -> T5Output``
      input_ids [B, M] int; attention_mask [B, M] (1 = token, 0 = padding).
    Returns float32 states (the final norm's output is what the DiT consumes).
    """

    def __init__(self, cfg: T5EncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = DTYPES[cfg.param_dtype]
        with nnx.use_eager_sharding(False):
            self.embedding = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.dim), pdt),
                                       out_sharding=(None, "embed"))
            self.position_bias = (None if cfg.per_layer_bias else
                                  PositionBias(cfg.num_buckets, cfg.num_heads, cfg.max_distance, rngs=rngs,
                                               param_dtype=pdt))

            self.blocks = stacked(T5Block, cfg.num_layers, rngs, cfg)
            self.final_norm = RMSNorm(cfg.dim, cfg.eps, axis_name="embed")

    def check_inputs(self, input_ids, attention_mask):
        if np.ndim(input_ids) != 2:
            raise ValueError(f"input_ids have shape {tuple(np.shape(input_ids))}; expected [B, tokens]")
        if not jnp.issubdtype(jnp.asarray(input_ids).dtype, jnp.integer):
            raise ValueError(f"input_ids have dtype {jnp.asarray(input_ids).dtype}; expected integers")
        if attention_mask is not None and tuple(np.shape(attention_mask)) != tuple(np.shape(input_ids)):
            raise ValueError(f"attention_mask has shape {tuple(np.shape(attention_mask))}; expected "
                             f"{tuple(np.shape(input_ids))}")

    @with_precision
    def __call__(self, input_ids, attention_mask=None, *, output_hidden_states: bool = False) -> T5Output:
        cfg = self.cfg
        dtype = DTYPES[cfg.dtype]
        self.check_inputs(input_ids, attention_mask)
        ids = jnp.asarray(input_ids)
        # embeddings in the compute dtype, as a bf16 torch embedding gives them, then a float32 residual
        x = jnp.take(self.embedding[...], ids, axis=0).astype(dtype).astype(jnp.float32)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        key_mask = None if attention_mask is None else jnp.asarray(attention_mask) > 0
        n = ids.shape[1]
        shared_bias = self.position_bias(n, n) if self.position_bias is not None else None

        @nnx.scan(in_axes=(nnx.Carry, 0, None, None), out_axes=(nnx.Carry, 0))
        def run(x, block, key_mask, shared_bias):
            x = block(x, key_mask, shared_bias)
            return x, (x if output_hidden_states else None)

        last, per_layer = run(x, self.blocks, key_mask, shared_bias)
        out = self.final_norm(last)
        hidden = jnp.concatenate([x[None], per_layer], axis=0) if output_hidden_states else None
        return T5Output(out, hidden)


def load_tokenizer(path):
    """A transformers tokenizer from local files only (e.g. the ``tokenizer`` folder of a Wan pipeline)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot load a tokenizer from it ({e})") from e


def prompt_clean(text: str) -> str:
    """The Wan pipeline's prompt cleaning: ftfy (when installed), HTML unescaping, whitespace collapsing."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@nnx.jit
def _encode(model: T5Encoder, ids, mask):
    return model(ids, mask).last_hidden_state


def encode_text(model: T5Encoder, tokenizer, prompts: str | Sequence[str], max_length: int = 512, *,
                clean: bool = True, bucket: int = 64) -> jax.Array:
    """Text context for the DiT, as the Wan pipeline computes it: [B, max_length, D] float32.

    Prompts are tokenised with padding to `max_length` and truncation (special tokens added: the
    closing ``</s>``); the encoder runs with the padding mask; the states after each prompt's true
    length are zero. The encoder only runs over the longest prompt rounded up to a multiple of
    `bucket` tokens (padding is masked out of attention, so the states of real tokens do not depend on
    it); the rest is the zero padding.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    if max_length < 1:
        raise ValueError(f"max_length={max_length}: must be positive")
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise ValueError(f"tokenizer pads on the {tokenizer.padding_side}; encode_text needs right padding "
                         "(set tokenizer.padding_side = 'right')")
    if clean:
        prompts = [prompt_clean(p) for p in prompts]
    enc = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                    return_attention_mask=True, return_tensors="np")
    ids, mask = np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])
    if ids.shape != (len(prompts), max_length):
        raise ValueError(f"tokenizer returned input_ids of shape {ids.shape}; expected ({len(prompts)}, {max_length})")
    if ids.min() < 0 or ids.max() >= model.cfg.vocab_size:
        raise ValueError(f"tokenizer produced ids in [{ids.min()}, {ids.max()}]; the model's vocabulary has "
                         f"{model.cfg.vocab_size} entries (wrong tokenizer for this encoder?)")
    seq_lens = (mask > 0).sum(axis=1)
    run_len = min(max_length, max(1, -(-int(seq_lens.max()) // bucket) * bucket))
    states = _encode(model, ids[:, :run_len], mask[:, :run_len])
    keep = jnp.arange(run_len)[None, :, None] < jnp.asarray(seq_lens)[:, None, None]  # Wan: u[:seq_len]
    states = jnp.where(keep, states, 0.0)
    return jnp.pad(states, ((0, 0), (0, max_length - run_len), (0, 0)))
