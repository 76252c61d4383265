"""Model behaviour beyond parity: remat policies, dtypes, explicit RoPE coordinates, one trace per shape,
input validation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hallojax.config import load_config
from hallojax.models.wan import REMAT_POLICIES, DiTConfig, WanDiT
from hallojax.flow import flow_matching_loss
from hallojax.nn.rope import grid_coords

TINY = DiTConfig.from_dict(load_config("configs/wan.py:tiny,dtype=float32").model)


def _inputs(cfg=TINY, b=2, f=2, h=4, w=6, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, f, h, w, cfg.in_channels)).astype(np.float32),
            np.array([100.0, 800.0][:b], np.float32),
            rng.standard_normal((b, 5, cfg.text_dim)).astype(np.float32))


def _loss_and_grads(cfg, batch):
    model = WanDiT(cfg, rngs=nnx.Rngs(0))
    x0, _, ctx = batch
    return nnx.jit(nnx.value_and_grad(lambda m: flow_matching_loss(m, x0, ctx, jax.random.key(1))))(model)


@pytest.mark.parametrize("policy", sorted(set(REMAT_POLICIES) - {"none"}))
def test_remat_policies_do_not_change_loss_or_gradients(policy):
    batch = _inputs()
    loss0, g0 = _loss_and_grads(TINY, batch)
    loss1, g1 = _loss_and_grads(TINY.replace(remat=policy), batch)
    np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
                 nnx.to_pure_dict(g1), nnx.to_pure_dict(g0))


def test_full_remat_recomputes_in_the_backward_pass():
    x0, _, ctx = _inputs()

    def jaxpr_text(cfg):
        model = WanDiT(cfg, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        f = lambda s: flow_matching_loss(nnx.merge(graphdef, s), x0, ctx, jax.random.key(1))
        return str(jax.make_jaxpr(jax.grad(f))(state))

    assert "remat" not in jaxpr_text(TINY) and "remat" in jaxpr_text(TINY.replace(remat="full"))


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32_output():
    x, t, c = _inputs()
    ref = np.asarray(WanDiT(TINY, rngs=nnx.Rngs(0))(x, t, c))
    assert np.abs(ref).max() > 0.1
    model = WanDiT(TINY.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert model.blocks.attn1.to_q.kernel.get_value().dtype == jnp.float32
    out = model(x, t, c)
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
    assert err < 5e-2, err  # bf16 matmuls: a few bits of mantissa, not a parity claim


def test_param_dtype_bf16_keeps_norms_and_modulation_fp32():
    model = WanDiT(TINY.replace(param_dtype="bfloat16", dtype="bfloat16"), rngs=nnx.Rngs(0))
    dtypes = {".".join(map(str, p)): v.get_value().dtype for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    fp32 = {k for k, d in dtypes.items() if d == jnp.float32}
    assert fp32 == {k for k in dtypes if "norm" in k or "scale_shift_table" in k or k.startswith("time_embedder")}
    assert dtypes["blocks.ffn.fc1.kernel"] == dtypes["time_proj.kernel"] == jnp.bfloat16
    assert np.isfinite(np.asarray(model(*_inputs()), np.float32)).all()


def test_rope_coordinates_are_explicit_and_only_differences_matter():
    x, t, c = _inputs()
    model = WanDiT(TINY, rngs=nnx.Rngs(0))
    base = np.asarray(model(x, t, c))
    grid = grid_coords(2, 2, 3)
    np.testing.assert_array_equal(np.asarray(model(x, t, c, coords=grid)), base)
    # moving every token by the same offset (to t = -1, shifted h/w) leaves attention unchanged
    moved = np.asarray(model(x, t, c, coords=grid + np.array([-1, 5, 7], np.int32)))
    np.testing.assert_allclose(moved, base, rtol=1e-5, atol=1e-5)
    # per-sample coordinates [B, L, 3]; changing relative positions changes the output
    per_sample = np.stack([grid, grid[::-1]])
    out = np.asarray(model(x, t, c, coords=per_sample))
    np.testing.assert_allclose(out[0], base[0], rtol=1e-5, atol=1e-5)
    assert np.abs(out[1] - base[1]).max() > 1e-3


def test_one_trace_per_shape():
    model = WanDiT(TINY, rngs=nnx.Rngs(0))

    @nnx.jit
    @chex.assert_max_traces(n=1)
    def fwd(m, x, t, c):
        return m(x, t, c)

    x, t, c = _inputs()
    for k in range(3):
        fwd(model, x + k, t * (k + 1) / 3, c)


def test_bad_inputs_name_the_shape():
    model = WanDiT(TINY, rngs=nnx.Rngs(0))
    x, t, c = _inputs()
    with pytest.raises(ValueError, match=r"latents have shape \(2, 2, 4, 6, 3\); expected \[B, F, H, W, 16\]"):
        model(x[..., :3], t, c)
    with pytest.raises(ValueError, match="H=3 is not divisible by patch 2"):
        model(x[:, :, :3], t, c)
    with pytest.raises(ValueError, match=r"timesteps have shape \(3,\)"):
        model(x, np.zeros(3, np.float32), c)
    with pytest.raises(ValueError, match=r"context has shape \(2, 5, 7\)"):
        model(x, t, c[..., :7])
    with pytest.raises(ValueError, match="T2V config"):
        model(x, t, c, image_context=np.zeros((2, 4, 8), np.float32))
    with pytest.raises(ValueError, match=r"coords have shape \(5, 3\); expected \[12, 3\]"):
        model(x, t, c, coords=np.zeros((5, 3), np.int32))


def test_rope_coordinates_out_of_range():
    model = WanDiT(TINY, rngs=nnx.Rngs(0))
    x, t, c = _inputs()
    far = grid_coords(2, 2, 3) + np.array([0, 0, 1020], np.int32)  # w reaches 1022 < 1024: fine
    assert np.isfinite(np.asarray(model(x, t, c, coords=far))).all()
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        model(x, t, c, coords=far + np.array([0, 0, 2], np.int32))
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        model(x, t, c, coords=grid_coords(2, 2, 3) - np.array([1025, 0, 0], np.int32))
    # inside jit the values are unknown: out-of-range positions turn into NaN, never another row
    out = nnx.jit(lambda m, k: m(x, t, c, coords=k))(model, jnp.asarray(far + np.array([0, 0, 2], np.int32)))
    assert np.isnan(np.asarray(out)).any()


@pytest.mark.parametrize("bad,match", [
    (dict(patch_size=(2, 2)), "three positive ints"),
    (dict(pos_embed_seq_len=10), "needs the image path"),
    (dict(attention="cudnn", dtype="float32"), "cudnn"),
    (dict(image_dim=8), "set together"),
    (dict(head_dim=5), "even"),
])
def test_invalid_model_configs_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**bad)
