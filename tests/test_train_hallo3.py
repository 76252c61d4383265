"""`hallojax train` on Hallo3 (hallojax.families, configs/hallo3.py): the tiny stage-2 step on 1 and 8 devices,
the frozen set (everything but the audio modules) and the Buffers bitwise unchanged, the loss finite and falling."""

import jax
import numpy as np
import pytest

from family_train import assert_same_step, leaves, one_and_eight
from hallojax import families
from hallojax.config import load_config

STEPS = 6
# Adam eps = 1 makes an update about lr·g (the 1- vs 8-device deltas compare gradients); lr 1 with the released
# clip 0.1 moves the tiny model enough in a few steps for the loss on the fixed batch to fall
TINY = ["--config.train.learning_rate=1.0", "--config.train.eps=1.0"]


@pytest.fixture(scope="module")
def runs(devices):
    return one_and_eight("configs/hallo3.py:stage2,size=tiny", TINY, devices, STEPS)


def test_batch_and_released_optimizer():
    config = load_config("configs/hallo3.py:stage2")
    t = config.train
    assert (t.learning_rate, t.b1, t.b2, t.grad_clip, t.objective, t.p_concat) == (1e-5, 0.9, 0.95, 0.1, "v", 0.05)
    assert (t.dropout.p_text, t.dropout.p_audio, t.dropout.p_ref) == (0.1, 0.05, 0.05)
    assert (t.frames, t.height, t.width) == (13, 60, 90)  # 49 frames at 480x720
    cfg = families.model_config(config.model)
    shapes = {k: v.shape for k, v in families.example_batch(cfg, 1, 13, 60, 90, seed=None).items()}
    assert shapes == {"latents": (1, 13, 60, 90, 16), "image_latent": (1, 1, 60, 90, 16),
                      "reference": (1, 1, 60, 90, 16), "face": (1, 512), "audio": (1, 49, 5, 12, 768),
                      "context": (1, 226, 4096)}
    # the trainable sets as released (shared/research/hallo3.md §4-5): stage 2 the audio modules, stage 1 both nets'
    # qkv, dense and post-attention LayerNorm (37,767,168 a layer) + the face modules
    from hallojax.registry import abstract
    from hallojax.train import trainable_mask

    params = nnx_params(abstract(cfg))
    sizes = leaves(jax.tree.map(lambda x: int(np.prod(x.shape)), params))
    for stage, count in (("stage2", 2_236_127_744), ("stage1", 2 * 42 * 37_767_168 + 1_059_842_048)):
        mask = leaves(trainable_mask(params, load_config(f"configs/hallo3.py:{stage}").train.trainable))
        assert sum(int(sizes[k]) for k, m in mask.items() if m) == count, stage


def nnx_params(model):
    from flax import nnx

    from hallojax.train import split_model

    return nnx.to_pure_dict(split_model(model)[1])


def test_stage2_step_on_1_and_8_devices(runs):
    _, _, one, eight = runs
    assert_same_step((one[0], one[1][:1]), eight)


def test_frozen_parameters_and_buffers_stay_bitwise(runs):
    _, _, (init, steps), _ = runs
    p0, p1 = leaves(init["params"]), leaves(steps[-1][2]["params"])
    moved = {k for k in p0 if not np.array_equal(p0[k], p1[k])}
    audio = {k for k in p0 if k.startswith(("['audio_proj']", "['cross']['audio']"))}
    assert moved == audio, (sorted(moved - audio), sorted(audio - moved))
    b0, b1 = leaves(init["buffers"]), leaves(steps[-1][2]["buffers"])
    assert len(b0) == 6 and all(np.array_equal(b0[k], b1[k]) for k in b0)
    assert not any("buffers" in k for k in p0)  # never in the optimizer's or the EMA's trees


def test_loss_finite_and_falls(runs):
    _, _, (_, steps), _ = runs
    losses = [s[0] for s in steps]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), losses


def test_hallojax_train_runs_and_checkpoints_the_buffers(runs, tmp_path):
    """`run` (what `hallojax train` calls) on the fixture's config and batch: the same first loss, and the
    checkpoint holds the Buffers beside the parameters (the step itself comes from the compilation cache)."""
    from hallojax.checkpoint import restore_numpy
    from hallojax.train import run

    _, _, (init, steps), _ = runs
    config = load_config("configs/hallo3.py:stage2,size=tiny", TINY + [
        "--config.train.steps=1", "--config.checkpoint.async_save=False"])
    result = run(config, tmp_path)
    np.testing.assert_allclose(result["losses"], [steps[0][0]], rtol=1e-5)
    saved = restore_numpy(tmp_path / "checkpoints" / "1" / "state")
    assert sorted(saved) == ["buffers", "ema", "opt_state", "params", "step"]
    b0, b1 = leaves(init["buffers"]), leaves(saved["buffers"])
    assert b0.keys() == b1.keys() and all(np.array_equal(b0[k], b1[k]) for k in b0)


def test_flops_match_xla():
    """The analytic count (families.hallo3_flops: denoiser, reference net on one frame, cross-attentions,
    projectors) within 10 % of XLA's cost analysis of the lowered forward pass (one layer: XLA counts a loop
    body once; widths where matmuls dominate). Measured: 13.52 vs 14.17 MFLOP."""
    from flax import nnx

    from hallojax.models.hallo3 import Hallo3, preset

    cfg = preset("tiny", num_layers=1, dtype="float32", num_heads=4, head_dim=16, text_dim=64, face_in=64,
                 face_dim=64, audio_in_dim=32, audio_hidden=64, audio_dim=64)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Hallo3(cfg, rngs=nnx.Rngs(0))))
    b = families.example_batch(cfg, 2, 3, 4, 6, seed=None)
    x = jax.ShapeDtypeStruct((2, 3, 4, 6, 2 * cfg.out_channels), np.float32)
    t = jax.ShapeDtypeStruct((2,), np.float32)

    def forward(s, x, t, b):
        return nnx.merge(graphdef, s)(x, t, b["context"], face=b["face"], audio=b["audio"], reference=b["reference"])

    cost = jax.jit(forward).lower(state, x, t, b).cost_analysis()
    xla = (cost if isinstance(cost, dict) else cost[0])["flops"]
    ours = families.hallo3_flops(cfg, batch=2, frames=3, height=4, width=6)
    assert abs(ours - xla) <= 0.1 * xla, (ours, xla)
    assert families.train_flops(cfg, batch=2, frames=3, height=4, width=6) == 3 * ours
