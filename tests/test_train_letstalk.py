"""`hallojax train` on LetsTalk (hallojax.families, configs/letstalk.py): the tiny model (a memory bank of 2
regularised in the step) trains with the ddpm hybrid objective on 1 and 8 devices alike; loss finite and falling."""

import numpy as np
import pytest

from family_train import assert_same_step, leaves, one_and_eight
from hallojax import families
from hallojax.config import load_config

STEPS = 6


@pytest.fixture(scope="module")
def runs(devices):
    # Adam eps = 1: an update about lr·g, so the 1- vs 8-device deltas compare gradients; lr 3 with the released
    # clip 0.1: the loss on the fixed batch falls within a few steps (1.02 -> 0.56 in 6)
    return one_and_eight("configs/letstalk.py:tiny", ["--config.train.learning_rate=3.0", "--config.train.eps=1.0"],
                         devices, STEPS)


def test_released_recipe_and_batch():
    config = load_config("configs/letstalk.py:VDTcatlong-B,memory=2")
    t = config.train
    assert (t.objective, t.learning_rate, t.weight_decay, t.grad_clip, t.ema_decay, config.seed) == (
        "ddpm", 1e-4, 0.0, 0.1, 0.9999, 3407)
    cfg = families.model_config(config.model)
    shapes = {k: v.shape for k, v in families.example_batch(cfg, 1, 16, 32, 32, seed=None).items()}
    assert shapes == {"latents": (1, 16, 32, 32, 4), "reference": (1, 1, 32, 32, 4), "audio": (1, 16, 5, 12, 768),
                      "memory": (1, 2, 32, 32, 4)}


def test_step_on_1_and_8_devices(runs):
    _, _, one, eight = runs
    assert_same_step((one[0], one[1][:1]), eight)


def test_loss_finite_and_falls_audio_projector_frozen(runs):
    _, batch, (init, steps), _ = runs
    assert batch["memory"].shape == (8, 2, 8, 8, 4)
    losses = [s[0] for s in steps]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), losses
    p0, p1 = leaves(init["params"]), leaves(steps[-1][2]["params"])
    moved = {k for k in p0 if not np.array_equal(p0[k], p1[k])}
    assert moved and not any(k.startswith("['audio_proj']") for k in moved)
    assert "buffers" not in init
