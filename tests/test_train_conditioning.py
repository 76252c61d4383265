"""The trainer's objective with the portrait mechanisms: loss over generated frames only, per-sample
tasks, condition dropout, every style preset's train step on 1 and 8 devices, face masks from records."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hallojax.config import load_config
from hallojax.data import example_batch, make_dataset
from hallojax.models.wan import DiTConfig, WanDiT
from hallojax.flow import loss_weight, masked_mse
from hallojax.sharding import batch_sharding, make_mesh, normalize_rules, use_rules
from hallojax.train import create_state, flow_loss, jit_train_step, known_frames, step_randomness

STYLES = ["hallo3-style", "hyavatar-style", "echomimic-style", "letstalk-style"]
# every style's conditioning parameters (what the backbone lacks), by mechanism: each must exist, and an
# update must reach the mechanism (its zero-initialised output projection at least: behind it, nothing
# gets a gradient at the first step)
MECHANISM_PARAMS = {
    "hallo3-style": {"audio": ("audio_proj", "audio_adapters"), "reference net": ("reference_embedding",
                                                                                  "reference_blocks", "extra_gate")},
    "hyavatar-style": {"audio": ("audio_proj", "audio_adapters"), "identity tokens": ("extra_gate",),
                       "additive identity": ("identity_embedding", "identity_proj")},
    "echomimic-style": {"decoupled audio": ("audio_proj", "audio_k_proj", "audio_v_proj", "norm_audio_k")},
    "letstalk-style": {"audio": ("audio_proj", "audio_adapters"), "symbiotic": ("extra_gate",)},
}


def test_masked_mse_covers_generated_frames_per_sample():
    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((2, 2, 3, 4, 5, 6)).astype(np.float32)
    gen = np.array([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]], np.float32)
    loss = float(masked_mse(pred, target, gen))
    per = ((pred - target) ** 2).reshape(2, 3, -1)
    np.testing.assert_allclose(loss, (per[0, 1:].mean() + per[1].mean()) / 2, rtol=1e-6)
    # known frames do not count, whatever the prediction there
    pred2 = pred.copy()
    pred2[0, 0] += 100.0
    assert float(masked_mse(pred2, target, gen)) == pytest.approx(loss, rel=1e-6)
    # no per-batch normalisation: a batch's loss is the mean of its samples' losses (batch 1 included)
    singles = [float(masked_mse(pred[i:i + 1], target[i:i + 1], gen[i:i + 1])) for i in range(2)]
    assert loss == pytest.approx(np.mean(singles), rel=1e-6)
    w = np.array([2.0, 0.5], np.float32)
    assert float(masked_mse(pred, target, gen, w)) == pytest.approx(2.0 * singles[0] / 2 + 0.5 * singles[1] / 2,
                                                                     rel=1e-6)
    # a sample with every frame known contributes 0, not NaN
    assert float(masked_mse(pred, target, np.zeros_like(gen))) == 0.0
    s = jnp.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(loss_weight(s, "sigma_sqrt"), 1 / np.array([0.1, 0.5, 0.9]) ** 2, rtol=1e-5)
    np.testing.assert_allclose(loss_weight(s, "cosmap"), 2 / (np.pi * (1 - 2 * s + 2 * s**2)), rtol=1e-6)
    with pytest.raises(ValueError, match="loss weighting"):
        loss_weight(s, "snr")


def test_known_frame_tasks_and_motion_frames():
    t = load_config("configs/wan.py:echomimic-style").train
    t.mask_tasks = [["t2v", 0.25], ["i2v", 0.25], ["first_last", 0.25], ["continuation", 0.25]]
    known = np.asarray(known_frames(jax.random.key(0), t, 4000, 6, 0))
    patterns = {tuple(row) for row in known.astype(int)}
    assert (0,) * 6 in patterns and (1, 0, 0, 0, 0, 0) in patterns and (1, 0, 0, 0, 0, 1) in patterns
    assert (1, 1, 1, 0, 0, 0) in patterns  # continuation of 3 frames
    assert all(r[0] == 1 or not any(r) for r in patterns)  # every task but t2v keeps frame 0
    assert not any(all(r) for r in patterns)  # something is always generated
    frac_t2v = np.mean(known.sum(1) == 0)
    assert 0.2 < frac_t2v < 0.3
    # motion frames are always known, whatever the task
    t.mask_tasks = []
    assert np.all(np.asarray(known_frames(jax.random.key(1), t, 8, 5, 2)) == np.array([1, 1, 0, 0, 0]))
    t.mask_tasks = [["inpaint_everything", 1.0]]
    with pytest.raises(ValueError, match="inpaint_everything"):
        known_frames(jax.random.key(0), t, 2, 3, 0)


def _setup(style, **train):
    config = load_config(f"configs/wan.py:{style},dtype=float32")
    for k, v in train.items():
        config.train[k] = v
    cfg = DiTConfig.from_dict(config.model)
    return config, cfg, example_batch(cfg, 4, 3, 4, 6, text_len=5)


@pytest.mark.parametrize("style", STYLES)
def test_condition_dropout_zeroes_the_dropped_inputs(style):
    from flax import nnx

    config, cfg, batch = _setup(style, dropout=dict(p_text=1.0, p_audio=1.0, p_ref=1.0))
    model = WanDiT(cfg, rngs=nnx.Rngs(0))
    # zero-initialised gates and outputs would hide the conditions: move every parameter off its init
    nnx.update(model, jax.tree.map(lambda a: a + 0.02, nnx.state(model, nnx.Param)))
    b = {**batch, **step_randomness(cfg, config.train, batch, jax.random.key(3))}
    assert not any(np.asarray(b[k]).any() for k in ("keep_text", "keep_audio", "keep_ref"))
    dropped = float(flow_loss(model, cfg, config.train, b))
    zeros = {k: np.zeros_like(b[k]) for k in ("context", "reference", "audio", "image_context") if k in b}
    ones = {k: np.ones_like(b[k]) for k in ("keep_text", "keep_audio", "keep_ref")}
    assert float(flow_loss(model, cfg, config.train, {**b, **zeros, **ones})) == dropped
    kept = float(flow_loss(model, cfg, config.train, {**b, **ones}))
    assert kept != dropped


def step_on_1_and_8_devices(config, cfg, batch, devices):
    """One real train step from the same initial state on one device and FSDP×TP over 8:
    [(loss, grad norm, parameter deltas)] for each."""
    rules = normalize_rules(config.rules)
    results = []
    for shape in (dict(fsdp=1), dict(fsdp=4, tensor=2)):
        mesh = make_mesh(shape, devices[:1] if shape["fsdp"] == 1 else devices)
        graphdef, state, shardings, _ = create_state(cfg, config.train, 0, mesh, rules)
        init = jax.device_get(state["params"])
        step = jit_train_step(graphdef, cfg, config.train, 0, shardings)
        with jax.set_mesh(mesh), use_rules(rules):
            b = {k: jax.device_put(v, batch_sharding(mesh, v.shape, rules)) for k, v in batch.items()}
            state, metrics = step(state, b)
        deltas = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), jax.device_get(state["params"]), init)
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), deltas))
    return results


@pytest.mark.parametrize("style", STYLES)
def test_style_train_steps_on_1_and_8_devices(style, devices):
    """Each style preset's real train step (its conditioning, dropout, tasks, AdamW, clipping, EMA) on one
    device and FSDP×TP over 8. Adam with eps = 1 and lr = 1 makes the first update c·g / (c·|g| + 1)
    elementwise (c: the clipping factor), so the parameter deltas compare the gradients themselves; the
    gates start open so every mechanism's parameters receive gradient."""
    config, cfg, batch = _setup(style, learning_rate=1.0, eps=1.0)
    config.model.extra_gate_init = 0.5
    cfg = DiTConfig.from_dict(config.model)
    (l1, g1, d1), (l8, g8, d8) = step_on_1_and_8_devices(config, cfg, batch, devices)
    assert np.isfinite(l1) and g1 > 0
    np.testing.assert_allclose([l8, g8], [l1, g1], rtol=1e-5)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(d1)}
    assert all(np.isfinite(v).all() for v in flat.values())
    for mechanism, names in MECHANISM_PARAMS[style].items():
        params = {name: [k for k in flat if f"['{name}']" in k] for name in names}
        assert all(params.values()), f"{style}: no parameter named {[n for n, v in params.items() if not v]}"
        moved = [k for v in params.values() for k in v if np.abs(flat[k]).max() > 0]
        assert moved, f"{style}: no update reaches the {mechanism} ({names})"
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(d8), jax.tree.leaves(d1)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_records_give_face_masks_on_the_token_grid(tmp_path):
    from hallojax.data import prepare_synthetic

    config = load_config("configs/wan.py:demo", ["--config.data.num_videos=1", f"--config.data.workdir={tmp_path}"])
    config.data.prepared = str(prepare_synthetic(config.data, 0))
    config.data.face_scale = 1.0  # the box itself (3x, HunyuanVideo-Avatar's, covers a 32-pixel frame)
    cfg = DiTConfig.from_dict(config.model).replace(audio_face_mask=True)
    batch = next(iter(make_dataset(config.data, 2, 0, cfg)))
    f, h, w = batch["latents"].shape[1:4]
    mask = batch["face_mask"]
    assert mask.shape == (2, f, h // 2, w // 2)
    assert 0 < mask.mean() < 1 and np.all(mask[:, 0] == mask[:, -1])  # the box, the same in every frame
