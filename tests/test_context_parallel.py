"""Context parallelism (`model.context_parallel`: ulysses / ring) on 8 simulated devices equals one device:
the attention with extra tokens (gated joint attention, the extra stream's queries) forward and gradients on
meshes with context 2 and 4 composed with FSDP and TP, the splash kernel inside (Pallas interpret mode), a
ring that skips a block or a Ulysses that skips its all-to-all fails them, and a model with identity tokens
and per-frame audio cross-attention (token splits that cut frames) gives one device's output and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from hallojax.nn import attention, context_parallel
from hallojax.config import load_config
from hallojax.nn.context_parallel import HEADS, self_attention
from hallojax.models.wan import DiTConfig, WanDiT
from hallojax.data import example_batch
from hallojax.sharding import (DEFAULT_RULES, batch_sharding, create_sharded, logical_to_spec, make_mesh,
                               normalize_rules, state_shardings, use_rules)

RULES = normalize_rules(DEFAULT_RULES)
# (mode, mesh): context 4 with FSDP, context 2 with FSDP and TP (2 heads per tensor shard split over 2)
MESHES = {4: {"fsdp": 2, "context": 4}, 2: {"fsdp": 2, "context": 2, "tensor": 2}}
CASES = [(mode, c) for mode in ("ulysses", "ring") for c in (2, 4)]


def _close(a, b, rtol, scale=None, what=""):
    """max |a - b| within rtol of max |b| (or of `scale`: the gradients' overall size, for leaves whose
    gradient is zero in exact arithmetic, such as a key bias under softmax)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and np.isfinite(a).all(), what
    err = np.abs(a - b).max() / (np.abs(b).max() if scale is None else scale)
    assert err < rtol, (what, err)


def _inputs(kd=16, seed=0):
    """Video q/k/v [2, 24, 4, kd], 11 extra keys (an identity frame + reference features), 6 extra queries."""
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return dict(q=f(2, 24, 4, kd), k=f(2, 24, 4, kd), v=f(2, 24, 4, kd), k_x=f(2, 11, 4, kd), v_x=f(2, 11, 4, kd),
                gate=jnp.float32(0.7), q_x=f(2, 6, 4, kd))


def _grads(impl, mode):
    """(out, out_x) and the gradients of a loss of both w.r.t. every input (gate included)."""
    def loss(x):
        out, out_x = self_attention(x["q"], x["k"], x["v"], impl, mode, k_x=x["k_x"], v_x=x["v_x"],
                                    gate=x["gate"], q_x=x["q_x"])
        return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(1.3 * out_x)), (out, out_x)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _sharded(fn, x, context):
    mesh = make_mesh(MESHES[context])
    spec = lambda a: logical_to_spec(HEADS, a.shape, RULES, dict(mesh.shape))  # noqa: E731
    placed = {k: jax.device_put(a, NamedSharding(mesh, spec(a))) if a.ndim == 4 else a for k, a in x.items()}
    with jax.set_mesh(mesh), use_rules(RULES):
        compiled = fn.lower(placed).compile()
        return compiled(placed), compiled.as_text()


@pytest.fixture(scope="module")
def one_device_attention():
    x = _inputs()
    return x, _grads("xla", "none")(x)


@pytest.mark.parametrize("mode,context", CASES)
def test_attention_with_extra_tokens_equals_one_device(one_device_attention, mode, context, devices):
    x, ((_, ref), ref_grads) = one_device_attention
    ((_, out), grads), hlo = _sharded(_grads("xla", mode), x, context)
    # the mode really ran: all-to-all (Ulysses) or ring transfers, and no gather of the token axis
    assert ("all-to-all" in hlo) == (mode == "ulysses") and ("collective-permute" in hlo) == (mode == "ring")
    for a, b in zip(out, ref):
        _close(a, b, 1e-5)
    for name in x:
        _close(grads[name], ref_grads[name], 1e-5)


def test_splash_inside_equals_one_device(devices, monkeypatch):
    """Splash blocks in Pallas interpret mode: Ulysses at context 4, the ring (with the kernel's own dkv/dq
    passes fed the ring's statistics) at context 2 with TP."""
    monkeypatch.setattr(attention, "SPLASH_INTERPRET", True)
    x = _inputs(kd=64, seed=1)
    (_, ref), ref_grads = _grads("splash", "none")(x)
    for mode, context in (("ulysses", 4), ("ring", 2)):
        ((_, out), grads), _ = _sharded(_grads("splash", mode), x, context)
        for a, b in zip(out, ref):
            _close(a, b, 1e-5)
        for name in x:
            _close(grads[name], ref_grads[name], 1e-5)


def test_a_broken_ring_or_ulysses_fails_the_comparison(one_device_attention, devices, monkeypatch):
    """The equality above is not vacuous: a ring whose last block is never merged, and a Ulysses whose
    shards all take the first shard's heads of the extra keys, give other numbers."""
    x, ((_, ref), _) = one_device_attention
    real_ring = context_parallel.ring_attention
    monkeypatch.setattr(context_parallel, "ring_attention",
                        lambda impl, axes, size, interpret=False: real_ring(impl, axes, max(size - 1, 1), interpret)
                        if size > 1 else real_ring(impl, axes, size, interpret))
    ((_, out), _), _ = _sharded(_grads("xla", "ring"), x, 4)
    assert np.abs(np.asarray(out[0]) - np.asarray(ref[0])).max() > 1e-2
    monkeypatch.undo()
    monkeypatch.setattr(jax.lax, "axis_index", lambda axis: 0)  # every shard takes the first shard's extra heads
    ((_, out), _), _ = _sharded(_grads("xla", "ulysses"), x, 4)
    assert np.abs(np.asarray(out[0]) - np.asarray(ref[0])).max() > 1e-2


# --- the model: identity tokens (gated joint attention + their own queries) and per-frame audio ---------------
# hyavatar-style (identity frame as extra tokens, face-masked per-frame audio cross-attention) in one layer
CFG = DiTConfig.from_dict(load_config("configs/wan.py:hyavatar-style,dtype=float32").model).replace(
    num_layers=1, audio_every=1, extra_gate_init=0.5, audio_neighbors=1)
# 3 latent frames of 2x2 tokens: 12 tokens, split 6/6 (context 2) or 3/3/3/3 (context 4): splits that cut frames
BATCH = example_batch(CFG, 2, 3, 4, 4, text_len=5, seed=0)


def _model_grads(cfg, params, mesh, rules):
    """Output and parameter gradients of the model `cfg` with `params` placed on `mesh` by `rules`."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))
    state = jax.device_put(params, state_shardings(abstract, mesh, rules))

    def loss(params, b):
        # the audio adapter's output projection starts at zero: open it, so audio reaches the output
        out_kernel = params["audio_adapters"]["to_out"]["kernel"]
        params["audio_adapters"]["to_out"]["kernel"] = jax.random.normal(jax.random.key(1), out_kernel.shape) / 4
        m = nnx.merge(graphdef, params)
        out = m(b["latents"], jnp.array([300.0, 700.0]), b["context"], reference=b["reference"], audio=b["audio"],
                face_mask=b.get("face_mask"))
        return jnp.sum(jnp.sin(3.0 * out)), out

    with jax.set_mesh(mesh), use_rules(rules):
        b = {k: jax.device_put(v, batch_sharding(mesh, v.shape, rules)) for k, v in BATCH.items()}
        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(nnx.to_pure_dict(state), b)
    return out, grads


@pytest.fixture(scope="module")
def one_device():
    mesh = make_mesh({}, jax.devices()[:1])
    params = nnx.state(create_sharded(lambda: WanDiT(CFG, rngs=nnx.Rngs(0)), mesh, None))
    return params, _model_grads(CFG, params, mesh, None)


@pytest.mark.parametrize("mode,context", [("ulysses", 4), ("ring", 2), ("ring", 4)])
def test_model_with_identity_tokens_and_audio_equals_one_device(one_device, mode, context, devices):
    params, (ref_out, ref_grads) = one_device
    out, grads = _model_grads(CFG.replace(context_parallel=mode), params, make_mesh(MESHES[context]), RULES)
    _close(out, ref_out, 2e-5)
    flat, ref_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves_with_path(ref_grads)
    assert len(flat) == len(ref_flat) > 30
    scale = max(np.abs(np.asarray(r)).max() for _, r in ref_flat)
    for (path, g), (_, r) in zip(flat, ref_flat):  # every parameter, audio's and the gate's among them
        _close(g, r, 2e-5, scale, jax.tree_util.keystr(path))
    gate = [g for path, g in flat if "extra_gate" in jax.tree_util.keystr(path)]
    audio_q = [g for path, g in flat if "audio_adapters" in jax.tree_util.keystr(path) and "to_q" in
               jax.tree_util.keystr(path)]
    assert gate and np.abs(np.asarray(gate[0])).max() > 0 and np.abs(np.asarray(audio_q[0])).max() > 0
