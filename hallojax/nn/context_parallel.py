"""Context parallelism: self-attention over a token axis split across the mesh's ``context`` axis.

`model.context_parallel` chooses how attention sees a sequence whose tokens the rules split over
``context`` (``act_len``), composing with FSDP (batch) and TP (heads over ``tensor``) on the
(data, fsdp, context, tensor) mesh:

- ``none``: XLA's own partitioning: keys and values are all-gathered over ``context`` before attention,
  so every chip holds the whole sequence's K/V (fine for a few chips, quadratic memory with XLA attention).
- ``ulysses`` (DeepSpeed-Ulysses): an all-to-all re-shards q, k, v from [B, L/c, N, K] to [B, L, N/c, K]
  (every token, 1/c of the heads), any kernel (xla / cudnn / splash) attends locally, and a second
  all-to-all brings the output back. 4 all-to-alls of one activation each per layer, independent of c;
  needs the heads per tensor shard divisible by c.
- ``ring``: queries stay put; the c key/value blocks go round the ring with `ppermute` and merge by
  online softmax (their log-sum-exps). A custom VJP keeps only (out, lse) per chip; its backward pass
  sends each K/V block round again with its gradient accumulators and uses the flash backward with
  the global statistics (di = rowsum(dO·O) − d lse). Blocks are XLA einsums or the splash kernel
  (forward with its log-sum-exp residual; the backward calls the kernel's dkv/dq passes with our di,
  which are module-private in jax.experimental.pallas: pinned by setup.py's jax < 0.12 and tested in
  interpret mode). No head-count condition; c − 1 K/V transfers forward, 2c − 1 in the backward.

Both run inside one `jax.shard_map` over every mesh axis: batch over ``act_batch``, tokens over
``act_len``, heads over ``act_heads`` of the active rules. A token count that ``context`` does not
divide leaves the tokens unsplit (the rules' fallback) and the plain path runs.

Token-level conditioning stays exact (`gated_joint_attention`'s out = out_v + g·σ(lse_e − lse_v)·(out_e − out_v)):
the extra keys (identity frame, reference features, ...) enter every shard whole; with Ulysses the local
gated joint attention runs on the shard's heads; with the ring, the video part's (out_v, lse_v) come from
the ring and the extra keys form one more local block. Queries of the extra token stream attend over every
video key: with Ulysses on their heads; with the ring as per-shard partial softmaxes over the local keys,
merged by log-sum-exp outside the shard_map (the extra keys' block, identical on every shard, is counted
1/c times on each). Per-frame audio attention is plain XLA on the token-sharded activations (exact under
any split, even one that cuts a frame).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hallojax.nn import attention
from hallojax.nn.attention import (_logits, _splash_kernel, _to_kernel, dot_product_attention,
                                gated_joint_attention)
from hallojax.sharding import DEFAULT_RULES, current_rules, logical_to_spec, normalize_rules

MODES = ("none", "ulysses", "ring")
RING_IMPLS = ("xla", "splash")  # block kernels with a log-sum-exp (cuDNN's has none)
HEADS = ("act_batch", "act_len", "act_heads", None)


# --- blocks: (out, lse) forward and the flash backward with given statistics ---------------------------
def _xla_fwd(q, k, v):
    """q [B, L, N, K], k/v [B, M, N, K] -> out float32 [B, L, N, K], lse float32 [B, L, N]."""
    s = _logits(q, k)  # [B, N, L, M] float32
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None]).astype(v.dtype)
    out = jnp.einsum("bnlm,bmnk->blnk", p, v, preferred_element_type=jnp.float32)
    return out, jnp.moveaxis(lse, 1, 2)


def _xla_bwd(q, k, v, lse, do, di):
    """Gradients of one block given the softmax statistics of all keys: lse, di [B, L, N] float32."""
    s = _logits(q, k)
    p = jnp.exp(s - jnp.moveaxis(lse, 2, 1)[..., None])  # [B, N, L, M], normalised over all blocks
    do = do.astype(v.dtype)
    dv = jnp.einsum("bnlm,blnk->bmnk", p.astype(v.dtype), do, preferred_element_type=jnp.float32)
    dp = jnp.einsum("blnk,bmnk->bnlm", do, v, preferred_element_type=jnp.float32)
    ds = (p * (dp - jnp.moveaxis(di, 2, 1)[..., None]) * q.shape[-1] ** -0.5).astype(q.dtype)
    dq = jnp.einsum("bnlm,bmnk->blnk", ds, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bnlm,blnk->bmnk", ds, q, preferred_element_type=jnp.float32)
    return dq, dk, dv


def _splash_fwd(q, k, v, interpret):
    """The splash kernel with its log-sum-exp residual; layouts as `_xla_fwd` (out in the input dtype)."""
    b, nq, n, kd = q.shape
    kernel, lp, mp, seg = _splash_kernel(nq, k.shape[1], interpret, save_residuals=True)

    def one(q1, k1, v1):  # one (sample, head): [Lp, K]
        out, (lse,) = kernel(q1[None], k1[None], v1[None], seg)
        return out[0], lse[0]

    qt, kt, vt = _to_kernel(q * jnp.asarray(kd ** -0.5, q.dtype), lp), _to_kernel(k, mp), _to_kernel(v, mp)
    out, lse = jax.vmap(jax.vmap(one))(qt, kt, vt)  # [B, N, Lp, K], [B, N, Lp]
    return jnp.swapaxes(out[:, :, :nq], 1, 2), jnp.swapaxes(lse[:, :, :nq], 1, 2)


def _splash_bwd(q, k, v, lse, do, di, interpret):
    """The splash kernel's dkv and dq passes with the given lse and di (global over all blocks)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, nq, n, kd = q.shape
    kernel, lp, mp, seg = _splash_kernel(nq, k.shape[1], interpret)
    kw, bs = kernel.kwargs, kernel.kwargs["block_sizes"]
    common = dict(is_mqa=False, mask_value=kw["mask_value"], attn_logits_soft_cap=kw["attn_logits_soft_cap"],
                  q_layout=bs.q_layout, k_layout=bs.k_layout, v_layout=bs.v_layout,
                  mask_function=kw["mask_function"], interpret=kw["interpret"])

    def one(q1, k1, v1, lse1, do1, di1):
        args = (q1[None], k1[None], v1[None], seg, None, lse1[None], do1[None], di1[None])
        dq, dk, dv = sk._splash_attention_bwd_dkv(
            *args, bq=bs.block_q_dkv, bkv=bs.block_kv_dkv, bkv_compute=bs.block_kv_dkv_compute,
            mask_info=kernel.dkv_mask_info, use_fused_bwd_kernel=bs.use_fused_bwd_kernel, **common)
        if dq is None:
            dq = sk._splash_attention_bwd_dq(*args, bq=bs.block_q_dq, bkv=bs.block_kv_dq,
                                             mask_info=kernel.dq_mask_info, **common)
        return dq[0], dk[0], dv[0]

    scale = kd ** -0.5
    stat = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, lp - nq)))  # noqa: E731  [B, N, Lp]
    qt, kt, vt = _to_kernel(q * jnp.asarray(scale, q.dtype), lp), _to_kernel(k, mp), _to_kernel(v, mp)
    dq, dk, dv = jax.vmap(jax.vmap(one))(qt, kt, vt, stat(lse), _to_kernel(do.astype(q.dtype), lp), stat(di))
    back = lambda x, n_: jnp.swapaxes(x[:, :, :n_], 1, 2).astype(jnp.float32)  # noqa: E731
    return back(dq, nq) * scale, back(dk, k.shape[1]), back(dv, k.shape[1])


def _merge(o1, l1, o2, l2):
    """Two partial softmax attentions (outputs normalised over their own keys) as one over both."""
    lse = jnp.logaddexp(l1, l2)
    return (o1.astype(jnp.float32) * jnp.exp(l1 - lse)[..., None]
            + o2.astype(jnp.float32) * jnp.exp(l2 - lse)[..., None]), lse


# --- the ring (size 1: one block with a differentiable lse) ---------------------------------------------
def ring_attention(impl: str, axes, size: int, interpret: bool = False):
    """(q, k, v) -> (out float32, lse float32) over the keys of all `size` shards of `axes` (inside a
    shard_map): K/V blocks go round with ppermute. size 1: attention over the local keys, with an lse
    that has a gradient. Differentiable in both outputs (custom VJP: only q, k, v, out, lse are kept)."""
    if impl == "xla":
        fwd_block, bwd_block = _xla_fwd, _xla_bwd
    elif impl == "splash":
        fwd_block = lambda q, k, v: _splash_fwd(q, k, v, interpret)  # noqa: E731
        bwd_block = lambda *a: _splash_bwd(*a, interpret)  # noqa: E731
    else:
        raise ValueError(f"ring attention blocks: expected one of {RING_IMPLS}, got {impl!r}")
    perm = [(i, (i + 1) % size) for i in range(size)]

    def shift(tree):  # device i sends to i + 1: after s shifts device i holds block i - s
        return jax.tree.map(lambda x: jax.lax.ppermute(x, axes, perm), tree)

    def forward(q, k, v):
        out = lse = None
        for step in range(size):
            nxt = shift((k, v)) if step < size - 1 else None  # issued before this block's compute
            o, s = fwd_block(q, k, v)
            out, lse = (o.astype(jnp.float32), s) if out is None else _merge(out, lse, o, s)
            if nxt is not None:
                k, v = nxt
        return out, lse

    @jax.custom_vjp
    def attend(q, k, v):
        return forward(q, k, v)

    def attend_fwd(q, k, v):
        out, lse = forward(q, k, v)
        return (out, lse), (q, k, v, out, lse)

    def attend_bwd(res, cts):
        q, k, v, out, lse = res
        do, dlse = cts
        di = jnp.sum(out * do, axis=-1) - dlse  # [B, L, N]: the flash backward's D, minus the lse's own cotangent
        dq = jnp.zeros(q.shape, jnp.float32)
        kb, vb = k, v
        dk = dv = jnp.zeros(k.shape, jnp.float32)
        for step in range(size):
            if step:  # the block moves on with the gradient it has gathered so far
                kb, vb, dk, dv = shift((kb, vb, dk, dv))
            gq, gk, gv = bwd_block(q, kb, vb, lse, do, di)
            dq, dk, dv = dq + gq, dk + gk, dv + gv
        if size > 1:  # device i holds block i + 1's accumulators: one more step takes each home
            dk, dv = shift((dk, dv))
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    attend.defvjp(attend_fwd, attend_bwd)
    return attend


# --- layout -------------------------------------------------------------------------------------------
def _layout(q_shape, mode: str):
    """(mesh axes sizes, q spec, token mesh axes, their size) when `mode` applies to a q of this shape
    under the active mesh and rules; None for the plain path (no mesh, or the tokens are not split)."""
    if mode == "none":
        return None
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes:
        return None
    mesh_shape = dict(mesh.shape)
    rules = current_rules() or normalize_rules(DEFAULT_RULES)
    spec = logical_to_spec(HEADS, q_shape, rules, mesh_shape)
    seq = spec[1]
    axes = () if seq is None else (seq,) if isinstance(seq, str) else tuple(seq)
    if not axes:
        return None
    return mesh_shape, spec, axes, math.prod(mesh_shape[a] for a in axes)


def _axis(axes):
    return axes[0] if len(axes) == 1 else axes


def _heads_spec(spec, axes):
    """The heads entry of a spec after Ulysses' all-to-all: tensor shards, each split over the token axes."""
    h = spec[2]
    h = () if h is None else (h,) if isinstance(h, str) else tuple(h)
    return (*h, *axes)


def self_attention(q, k, v, impl: str = "xla", mode: str = "none", *, k_x=None, v_x=None, gate=None,
                   q_x=None, interpret: bool | None = None):
    """Self-attention of tokens q, k, v [B, L, N, K] (split over ``context`` by the rules), optionally with
    extra keys/values k_x, v_x [B, E, N, K] joined through `gated_joint_attention` (scalar `gate`) and extra
    queries q_x [B, E', N, K] attending over [k; k_x]. Returns (out [B, L, N, K], out_x [B, E', N, K] | None).
    `mode`: none | ulysses | ring (see the module docstring); the plain path when it does not apply."""
    if mode not in MODES:
        raise ValueError(f"context parallelism {mode!r}: expected one of {MODES}")
    layout = _layout(q.shape, mode)
    if layout is None:
        return _plain(q, k, v, impl, k_x, v_x, gate, q_x)
    mesh_shape, spec, axes, size = layout
    if interpret is None:
        interpret = attention.SPLASH_INTERPRET  # read at call time: tests switch it on
    full = P(spec[0], None, spec[2], None)  # extra tokens: whole on every token shard
    names = ["q", "k", "v"] + [n for n, x in (("k_x", k_x), ("v_x", v_x), ("gate", gate), ("q_x", q_x))
                               if x is not None]
    args = dict(q=q, k=k, v=v, k_x=k_x, v_x=v_x, gate=None if gate is None else jnp.asarray(gate, jnp.float32),
                q_x=q_x)
    if args["gate"] is not None and args["gate"].ndim:
        raise ValueError("context-parallel gated attention takes a scalar gate")
    in_specs = tuple({"q": spec, "k": spec, "v": spec, "gate": P()}.get(n, full) for n in names)
    dtype = v.dtype

    if mode == "ulysses":
        local_heads = q.shape[2] // math.prod(mesh_shape[a] for a in _heads_spec(spec, ()))
        if local_heads % size:
            raise ValueError(f"model.context_parallel='ulysses' splits each shard's {local_heads} heads over "
                             f"{size} context shards: they must divide (or use 'ring')")
        body, out_x_spec = _ulysses_body(impl, axes, size), P(spec[0], None, _heads_spec(spec, axes), None)
    else:
        if impl not in RING_IMPLS:
            raise ValueError(f"model.context_parallel='ring' needs attention in {RING_IMPLS}, not {impl!r}")
        body, out_x_spec = _ring_body(impl, axes, size, interpret), (
            P(spec[1], spec[0], None, spec[2], None), P(spec[1], spec[0], None, spec[2]))
    out_specs = (spec, out_x_spec if q_x is not None else None)

    def run(*xs):
        return body(**dict(zip(names, xs)))

    # every mesh axis manual (Mosaic kernels need it); check_vma=False: pallas_call outputs carry no
    # varying-axes type. The transpose sums the cotangents of the whole-length extra keys over token shards.
    out, out_x = jax.shard_map(run, in_specs=in_specs, out_specs=out_specs, axis_names=frozenset(mesh_shape),
                               check_vma=False)(*(args[n] for n in names))
    if mode == "ring" and q_x is not None:  # per-shard partial softmaxes of the extra queries: merge them
        parts, lses = out_x
        lse = jax.nn.logsumexp(lses, axis=0)
        out_x = jnp.sum(parts * jnp.exp(lses - lse)[..., None], axis=0)
    return out.astype(dtype), None if out_x is None else out_x.astype(dtype)


def _plain(q, k, v, impl, k_x, v_x, gate, q_x):
    """No context parallelism: the kernels as they are (XLA partitions them under a mesh)."""
    if k_x is None:
        out = dot_product_attention(q, k, v, impl)
    else:
        out = gated_joint_attention(q, k, v, k_x, v_x, gate, impl)
    out_x = None
    if q_x is not None:
        keys = k if k_x is None else jnp.concatenate([k, k_x], axis=1)
        values = v if v_x is None else jnp.concatenate([v, v_x], axis=1)
        out_x = dot_product_attention(q_x, keys, values, impl)
    return out, out_x


def _ulysses_body(impl, axes, size):
    axis = _axis(axes)

    def body(q, k, v, k_x=None, v_x=None, gate=None, q_x=None):
        to_heads = lambda x: jax.lax.all_to_all(x, axis, 2, 1, tiled=True)  # noqa: E731  [B, L/c, n, K] -> [B, L, n/c, K]
        q, k, v = to_heads(q), to_heads(k), to_heads(v)
        n = q.shape[2]
        first = jax.lax.axis_index(axis) * n
        mine = lambda x: None if x is None else jax.lax.dynamic_slice_in_dim(x, first, n, axis=2)  # noqa: E731
        out, out_x = _plain(q, k, v, impl, mine(k_x), mine(v_x), gate, mine(q_x))
        return jax.lax.all_to_all(out, axis, 1, 2, tiled=True), out_x

    return body


def _ring_body(impl, axes, size, interpret):
    axis = _axis(axes)
    ring, local = ring_attention(impl, axis, size, interpret), ring_attention(impl, axis, 1, interpret)

    def body(q, k, v, k_x=None, v_x=None, gate=None, q_x=None):
        out, lse = ring(q, k, v)
        if k_x is not None:  # gated joint attention: the extra keys are one more block, kept apart
            out_e, lse_e = local(q, k_x, v_x)
            out = out + gate * jax.nn.sigmoid(lse_e - lse)[..., None] * (out_e - out)
        out_x = None
        if q_x is not None:  # this shard's keys (and 1/c of the extra keys' block, identical on every shard)
            o, s = local(q_x, k, v)
            if k_x is not None:
                oe, se = local(q_x, k_x, v_x)
                o, s = _merge(o, s, oe, se - math.log(size))
            out_x = (o[None], s[None])
        return out, out_x

    return body
