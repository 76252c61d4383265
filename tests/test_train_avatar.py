"""`hallojax train` on HunyuanVideo-Avatar (hallojax.families, configs/hunyuan_avatar.py): the tiny step on 1 and 8
devices equal, the random batch's shapes, the loss finite and falling."""

import numpy as np
import pytest

from family_train import assert_same_step, one_and_eight
from hallojax import families
from hallojax.config import load_config

STEPS = 4
TINY = ["--config.train.learning_rate=1.0", "--config.train.eps=1.0"]  # as test_train_hallo3: updates ≈ lr·g


@pytest.fixture(scope="module")
def runs(devices):
    return one_and_eight("configs/hunyuan_avatar.py:tiny", TINY, devices, STEPS)


def test_batch_shapes_and_optimizer():
    config = load_config("configs/hunyuan_avatar.py:hunyuan-avatar")
    t = config.train
    assert (t.objective, t.learning_rate, t.weight_decay, t.frames, t.height, t.width) == ("flow", 1e-5, 0.01, 33,
                                                                                          88, 88)
    cfg = families.model_config(config.model)
    shapes = {k: v.shape for k, v in families.example_batch(cfg, 1, 33, 88, 88, text_len=832, seed=None).items()}
    assert shapes == {"latents": (1, 33, 88, 88, 16), "ref_latents": (1, 33, 88, 88, 16), "text": (1, 832, 4096),
                      "pooled": (1, 768), "audio": (1, 129, 10, 5, 384), "face_mask": (1, 33 * 44 * 44)}


def test_step_on_1_and_8_devices(runs):
    _, batch, one, eight = runs
    assert set(batch) >= {"latents", "ref_latents", "audio", "face_mask", "text", "pooled"}
    assert_same_step((one[0], one[1][:1]), eight)
    losses = [loss for loss, _, _ in one[1]]
    print("avatar train losses", losses)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
