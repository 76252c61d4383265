"""The Pallas TPU splash-attention path (`attention="splash"`): in Pallas interpret mode on CPU it equals
the XLA attention (forward and gradients, unaligned lengths, with and without a mesh, gated joint
attention), and a small model's training step with it compiles ahead of time for a TPU topology."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh, NamedSharding

from hallojax.nn import attention
from hallojax.nn.attention import dot_product_attention, gated_joint_attention
from hallojax.config import load_config
from hallojax.models.wan import DiTConfig, WanDiT
from hallojax.flow import flow_matching_loss
from hallojax.sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    batch_sharding,
    logical_to_spec,
    make_mesh,
    normalize_rules,
    state_shardings,
    use_rules,
)

RULES = normalize_rules(DEFAULT_RULES)
HEADS = ("act_batch", "act_len", "act_heads", None)


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setattr(attention, "SPLASH_INTERPRET", True)


def _qkv(b, l, m, n=2, kd=64, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, l, n, kd), (b, m, n, kd), (b, m, n, kd)))


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and np.isfinite(a).all()
    err = np.abs(a - b).max() / np.abs(b).max()
    assert err < rtol, err


def _value_and_grads(impl):
    def loss(q, k, v):
        return jnp.sum(jnp.sin(dot_product_attention(q, k, v, impl)))  # non-uniform output cotangent
    return jax.jit(lambda q, k, v: (dot_product_attention(q, k, v, impl), jax.grad(loss, (0, 1, 2))(q, k, v)))


@pytest.mark.parametrize("l,m", [(200, 150), (130, 256)])  # both padded / only the queries padded
def test_splash_equals_xla_forward_and_gradients(interpret, l, m):
    q, k, v = _qkv(2, l, m)
    out, grads = _value_and_grads("splash")(q, k, v)
    ref, ref_grads = _value_and_grads("xla")(q, k, v)
    assert out.dtype == v.dtype
    _close(out, ref)
    for g, r in zip(grads, ref_grads):
        _close(g, r)


@pytest.mark.parametrize("shape", [{"fsdp": 4, "tensor": 2}, {"fsdp": 2, "context": 2, "tensor": 2},
                                   {"data": 2, "tensor": 4}])  # the last: 2 heads do not split over 4
def test_sharded_splash_equals_single_device(interpret, devices, shape):
    q, k, v = _qkv(4, 200, 150, seed=1)
    out1, grads1 = _value_and_grads("splash")(q, k, v)
    mesh = make_mesh(shape)
    place = lambda x: jax.device_put(x, NamedSharding(mesh, logical_to_spec(HEADS, x.shape, RULES, dict(mesh.shape))))
    with jax.set_mesh(mesh), use_rules(RULES):
        out, grads = _value_and_grads("splash")(place(q), place(k), place(v))
    want = NamedSharding(mesh, logical_to_spec(HEADS, q.shape, RULES, dict(mesh.shape)))
    assert out.sharding.is_equivalent_to(want, 4), (out.sharding, want)
    _close(out, out1)
    for g, r in zip(grads, grads1):
        _close(g, r)


def test_gated_joint_attention_splash_equals_xla(interpret, devices):
    q, k, v = _qkv(2, 200, 200, seed=2)
    _, ke, ve = _qkv(2, 1, 40, seed=3)
    gate = jnp.asarray([[0.7], [-0.4]], jnp.float32)  # per head, broadcast like the model's extra_gate

    def run(impl):
        def loss(*a):
            return jnp.sum(jnp.sin(gated_joint_attention(*a, impl)))
        f = lambda *a: (gated_joint_attention(*a, impl), jax.grad(loss, range(6))(*a))
        return jax.jit(f)(q, k, v, ke, ve, gate)

    (out, grads), (ref, ref_grads) = run("splash"), run("xla")
    _close(out, ref)
    for g, r in zip(grads, ref_grads):
        _close(g, r)
    # gate 0: exactly the plain splash attention over the video keys
    zero = jax.jit(lambda *a: gated_joint_attention(*a, impl="splash"))(q, k, v, ke, ve, jnp.float32(0))
    assert np.array_equal(np.asarray(zero), np.asarray(jax.jit(attention.splash_attention)(q, k, v)))
    with jax.set_mesh(make_mesh({"fsdp": 2, "context": 2, "tensor": 2})), use_rules(RULES):
        _close(jax.jit(lambda *a: gated_joint_attention(*a, impl="splash"))(q, k, v, ke, ve, gate), ref)


@pytest.fixture
def no_cache_writes():
    """Keep TPU executables out of the persistent (CPU) compilation cache: they cannot be read back."""
    key = "jax_persistent_cache_min_compile_time_secs"
    old = getattr(jax.config, key)
    jax.config.update(key, 1e9)
    yield
    jax.config.update(key, old)


@pytest.mark.parametrize("layout", [(1, 2, 1, 2), (2, 1, 2, 1)])  # (data, fsdp, context, tensor)
def test_model_train_step_with_splash_compiles_for_tpu(no_cache_writes, layout):
    """Forward + backward of a small identity-token model (so gated joint attention is in it) lowers with
    the real Mosaic kernels and compiles for a v5p:2x2x1 topology on this CPU host."""
    topo = topologies.get_topology_desc("v5p:2x2x1", "tpu")
    mesh = Mesh(np.array(topo.devices).reshape(layout), MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    cfg = DiTConfig.from_dict(load_config("configs/wan.py:tiny,dtype=bfloat16").model).replace(
        attention="splash", identity_tokens=True, extra_gate_init=1.0)
    graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))
    shardings = state_shardings(abs_state, mesh, RULES)
    state = jax.tree.map(lambda a, s: a.replace(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)),
                         abs_state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    b, f, h, w = 4, 2, 4, 6
    sds = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sharding(mesh, shape, RULES))
    x0, ctx, ref = sds((b, f, h, w, cfg.in_channels)), sds((b, 5, cfg.text_dim)), sds((b, 1, h, w, cfg.out_channels))

    def step(state, x0, ctx, ref):
        loss = lambda s: flow_matching_loss(nnx.merge(graphdef, s), x0, ctx, jax.random.key(0), reference=ref)
        return jax.value_and_grad(loss)(state)

    assert not attention.SPLASH_INTERPRET
    # the bf16 model's own precision ("auto" -> "default"): Mosaic rejects "highest" on bf16 operands
    with jax.set_mesh(mesh), use_rules(RULES):
        lowered = jax.jit(step).lower(state, x0, ctx, ref)
    assert "splash_mha_fwd" in lowered.as_text() and "splash_mha_dkv" in lowered.as_text()
    compiled = lowered.compile()
    assert "tpu_custom_call" in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_long_sequences_use_large_blocks_and_compile_for_tpu(no_cache_writes):
    """14B at 720p x 81 frames is 75,600 tokens. Padded to 128-token blocks (591 of them) the kernels'
    per-block metadata overflowed the core's 1 MiB SMEM; the block is now chosen first (1024 here) and
    the sequence padded to it. Forward and backward compile for one v5p chip."""
    sizes = {n: attention._splash_block_size(n) for n in (200, 4000, 32760, 75600)}
    assert sizes == {200: 128, 4000: 128, 32760: 512, 75600: 1024}
    for n, b in sizes.items():  # padding wastes at most 1/64 of the tokens (or less than one 128 block)
        assert (-n) % b <= max(n // 64, 127)
    topo = topologies.get_topology_desc("v5p:2x2x1", "tpu")
    one = NamedSharding(Mesh(np.array(topo.devices[:1]), ("x",)), jax.sharding.PartitionSpec())
    qkv = jax.ShapeDtypeStruct((1, 75600, 4, 128), jnp.bfloat16, sharding=one)
    loss = lambda q, k, v: attention.splash_attention(q, k, v).astype(jnp.float32).sum()
    assert not attention.SPLASH_INTERPRET
    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(qkv, qkv, qkv).compile()
    assert "tpu_custom_call" in compiled.as_text()
