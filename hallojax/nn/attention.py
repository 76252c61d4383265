"""Attention kernels: the dispatch by name and the gated joint attention (Wan's attention module, which
uses them, is `hallojax.models.wan.Attention`).

Layout is [B, L, N, K] throughout. `dot_product_attention` picks the kernel by name:
``xla`` (portable einsum + float32 softmax, the CPU/TPU default), ``cudnn`` (fused cuDNN flash
attention through `jax.nn.dot_product_attention`, GPU only) or ``splash`` (the Pallas TPU splash-attention
kernel: flash-style, never materialises the [L, M] logits, so e.g. the 1.3B Wan model at 480x832x81
(32,760 tokens) fits 4 samples per chip instead of 1).

Splash details: query and key lengths are zero-padded separately to a multiple of their block size
(`_splash_block_size`: 128 to 1024, the largest that wastes at most 1/64 of the tokens); padded keys
get segment id 1 (real tokens 0, every query 0) so no query attends to them, and padded query rows are
sliced off. Under a mesh (`jax.set_mesh`) the kernel runs inside `jax.shard_map` with the
activation layout of the active logical rules (default `DEFAULT_RULES`): batch over the ``act_batch``
mesh axes, heads over ``act_heads`` (tensor), queries over ``act_len`` (context); keys/values enter
every shard with their full length (shard_map all-gathers them over the query-sequence axes and
reduces their gradients back). Axes that do not divide a dimension leave it unsharded. Set
`SPLASH_INTERPRET = True` (or pass ``interpret=True``) to run the kernel in Pallas interpret mode on
CPU (tests). The kernel's dots follow the model's matmul precision (`DiTConfig.precision`): "highest"
with bfloat16 inputs fails to compile in Mosaic, which "auto" (-> "default" for bfloat16) avoids.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hallojax.sharding import (
    DEFAULT_RULES,
    current_rules,
    logical_to_spec,
    normalize_rules,
)

ATTENTION_IMPLS = ("xla", "cudnn", "splash")

SPLASH_BLOCK = 128  # the smallest splash block; q and kv lengths are padded to a multiple of their block
SPLASH_INTERPRET = False  # run the splash kernel in Pallas interpret mode (CPU tests); see `splash_attention`


def _logits(q, k):
    return jnp.einsum("blnk,bmnk->bnlm", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5


def _splash_block_size(n: int) -> int:
    """Block size for a sequence of n tokens; the sequence is padded to a multiple of it.

    The kernel keeps per-block metadata in the core's 1 MiB SMEM, quadratic in the block count: at 128-token
    blocks 75,600 tokens (14B at 720p, padded to 75,648 = 591 blocks) need 1.08 MiB and fail to compile.
    So: the largest of 1024 (from 64k tokens), 512, 256 whose padding wastes at most 1/64 of n, else 128.
    """
    sizes = (1024, 512, 256) if n >= 65536 else (512, 256)
    return next((b for b in sizes if (-n) % b <= n // 64), SPLASH_BLOCK)


def _splash_kernel(nq: int, m: int, interpret: bool, save_residuals: bool = False):
    """The splash kernel for nq queries and m keys: (kernel, padded nq, padded m, segment ids or None)."""
    # the Pallas TPU module, imported on first use only
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    bq, bkv = _splash_block_size(nq), _splash_block_size(m)
    lp, mp = -(-nq // bq) * bq, -(-m // bkv) * bkv
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    # one head's mask, the kernel vmapped over heads: the mask metadata (in the core's small SMEM) stays one
    # head's size whatever the head count
    mask = sa.MultiHeadMask((sa.FullMask((lp, mp)),))
    kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret,
                                save_residuals=save_residuals)
    segment_ids = None
    if mp != m:  # padded keys form their own segment; all queries (padded ones too) are segment 0
        segment_ids = sa.SegmentIds(q=jnp.zeros((lp,), jnp.int32), kv=(jnp.arange(mp) >= m).astype(jnp.int32))
    return kernel, lp, mp, segment_ids


def _to_kernel(x: jax.Array, length: int) -> jax.Array:
    """[B, L, N, K] -> the kernel's [B, N, length, K], zero-padded."""
    return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, length - x.shape[1]), (0, 0)))


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool) -> jax.Array:
    """Splash attention on one device: pad, transpose to the kernel's [N, L, K], vmap over batch."""
    _, l, n, kd = q.shape
    kernel, lp, mp, segment_ids = _splash_kernel(l, k.shape[1], interpret)
    per_head = jax.vmap(lambda q1, k1, v1, seg: kernel(q1[None], k1[None], v1[None], seg)[0],
                        in_axes=(0, 0, 0, None))
    qt = _to_kernel(q * jnp.asarray(kd ** -0.5, q.dtype), lp)
    out = jax.vmap(per_head, in_axes=(0, 0, 0, None))(qt, _to_kernel(k, mp), _to_kernel(v, mp), segment_ids)
    return jnp.swapaxes(out[:, :, :l], 1, 2).astype(v.dtype)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool | None = None) -> jax.Array:
    """Non-causal multi-head splash attention (TPU Pallas) for q [B, L, N, K], k/v [B, M, N, K].

    Without a mesh (or on a single device) the kernel is called directly; under `jax.set_mesh` it runs in
    `jax.shard_map`: batch over the ``act_batch`` mesh axes, heads over ``act_heads``, queries over
    ``act_len`` of the active rules (`DEFAULT_RULES` when none are active), keys/values gathered to their
    full length on every shard. `interpret` (default `SPLASH_INTERPRET`) selects Pallas interpret mode.
    """
    interpret = SPLASH_INTERPRET if interpret is None else interpret
    mesh = jax.sharding.get_abstract_mesh()
    manual = set() if mesh.empty else set(mesh.manual_axes)
    mesh_shape = {} if mesh.empty else {a: s for a, s in mesh.shape.items() if a not in manual}
    if math.prod(mesh_shape.values()) == 1:
        return _splash_local(q, k, v, interpret)
    rules = current_rules() or normalize_rules(DEFAULT_RULES)
    q_spec = logical_to_spec(("act_batch", "act_len", "act_heads", None), q.shape, rules, mesh_shape)
    kv_spec = P(q_spec[0], None, q_spec[2], None)
    # Mosaic kernels must run with every mesh axis manual (size-1 axes too), hence all axes in axis_names.
    # check_vma=False: pallas_call outputs carry no varying-axes type; the shard_map transpose then still
    # sums the key/value cotangents over the query-sequence shards (tested against one device).
    fn = jax.shard_map(lambda q_, k_, v_: _splash_local(q_, k_, v_, interpret), in_specs=(q_spec, kv_spec, kv_spec),
                       out_specs=q_spec, axis_names=frozenset(mesh_shape), check_vma=False)
    return fn(q, k, v)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "xla", *,
                          mask: jax.Array | None = None) -> jax.Array:
    """softmax(q·kᵀ/√K)·v for q [B, L, N, K], k/v [B, M, N, K] -> [B, L, N, K].

    mask: optional bool, broadcastable to [B, N, L, M]; False drops the key for that query (as torch's
    boolean SDPA mask). Every query must keep at least one key. Not available with ``splash``.
    """
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    if impl == "splash":
        if mask is not None:
            raise ValueError("attention impl 'splash' takes no mask (padded text): use 'xla' or 'cudnn'")
        return splash_attention(q, k, v)
    if impl != "xla":
        raise ValueError(f"attention impl {impl!r}: expected one of {ATTENTION_IMPLS}")
    logits = _logits(q, k)
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    return _attend(logits, v)


def _attend(logits: jax.Array, v: jax.Array) -> jax.Array:
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
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

    With ``splash`` the log-sum-exps are not available differentiably (the kernel's `save_residuals`
    output has no VJP) and materialising the [L, M] logits is what splash avoids, so we use the same
    identity the other way round: w·(out_e − out_v) = out_joint − out_v with out_joint the splash attention
    over the concatenated keys [k; k_extra], i.e. out = out_v + gate·(out_joint − out_v). Same math (equal
    to float32 rounding); in bfloat16 the difference carries about one ulp of |out| absolute error.
    """
    if impl == "splash":
        out_v = splash_attention(q, k, v)
        out_j = splash_attention(q, jnp.concatenate([k, k_extra], axis=1), jnp.concatenate([v, v_extra], axis=1))
        delta = gate * (out_j.astype(jnp.float32) - out_v.astype(jnp.float32))
        return (out_v.astype(jnp.float32) + delta).astype(out_v.dtype)
    if impl == "xla":  # one logits tensor per key set, read by both the softmax and the log-sum-exp, so the
        # backward pass also multiplies by q and k once (two [L, M] products would cost ~15 % more FLOPs)
        logits_v, logits_e = _logits(q, k), _logits(q, k_extra)
        out_v, out_e = _attend(logits_v, v), _attend(logits_e, v_extra)
        lse_v, lse_e = (jnp.moveaxis(jax.nn.logsumexp(x, axis=-1), 1, 2) for x in (logits_v, logits_e))
    else:
        out_v = dot_product_attention(q, k, v, impl)
        out_e = dot_product_attention(q, k_extra, v_extra, impl)
        lse_v, lse_e = logsumexp_scores(q, k), logsumexp_scores(q, k_extra)
    w = jax.nn.sigmoid(lse_e - lse_v)[..., None]  # [B, L, N, 1]
    delta = (gate * w) * (out_e.astype(jnp.float32) - out_v.astype(jnp.float32))
    return (out_v.astype(jnp.float32) + delta).astype(out_v.dtype)
