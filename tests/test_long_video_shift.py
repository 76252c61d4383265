"""The time-aware position shift long-video plan (hallojax.sample.long_video.ShiftPlan) on hand-worked window
indices over >= 3 windows, and the HunyuanVideo-Avatar guidance preset against the released schedule
(research/hyavatar_letstalk.md B.7). Pure numpy: no model."""

import numpy as np
import pytest

from hallojax.sample.guidance import parse_guidance
from hallojax.sample.long_video import ShiftPlan, shift_plan


def test_released_sizing():
    p = shift_plan(300)  # 300 video frames of audio at 25 fps: n = 300 // 128 + 1 = 3 chunks
    assert (p.total_latent, p.audio_frames, p.num_windows) == (97, 3 * 128 + 4, 3)
    one = shift_plan(100)  # fits one window: no shift, ever
    assert (one.total_latent, one.num_windows) == (33, 1)
    for step in range(5):
        np.testing.assert_array_equal(one.latent_indices(step), [np.arange(33)])
        np.testing.assert_array_equal(one.audio_indices(step), [np.arange(129)])
    assert shift_plan(128).total_latent == 65  # exactly one chunk of audio still gets a second window


def test_window_indices_hand_worked():
    p = shift_plan(300)  # 97 latent frames, 3 windows of 33 (99 slots: 2 frames covered twice)
    # step 0: windows start at 0, 33, 66; the last wraps onto frames 0 and 1
    idx = p.latent_indices(0)
    np.testing.assert_array_equal(idx[0], np.arange(0, 33))
    np.testing.assert_array_equal(idx[1], np.arange(33, 66))
    np.testing.assert_array_equal(idx[2], np.r_[np.arange(66, 97), 0, 1])
    np.testing.assert_array_equal(p.counts(0), np.r_[2, 2, np.ones(95, int)])
    # step 1: shift 10 -> starts -10, 23, 56; window 0 wraps backwards from 87
    assert list(p.starts(1)) == [-10, 23, 56]
    idx = p.latent_indices(1)
    np.testing.assert_array_equal(idx[0], np.r_[np.arange(87, 97), np.arange(0, 23)])
    np.testing.assert_array_equal(idx[1], np.arange(23, 56))
    np.testing.assert_array_equal(idx[2], np.r_[np.arange(56, 89)])
    counts = p.counts(1)
    assert counts.sum() == 99 and set(np.flatnonzero(counts == 2)) == {87, 88}
    # audio: 4 video frames per latent frame, circular over the padded 388 frames
    aud = p.audio_indices(1)
    assert aud.shape == (3, 129)
    np.testing.assert_array_equal(aud[0], (np.arange(-40, 89)) % 388)
    np.testing.assert_array_equal(aud[1], np.arange(92, 221))
    # the shift advances by 10 per step modulo the window: 0, 10, 20, 30, 7, 17, ...
    assert [p.offset(i) for i in range(6)] == [0, 10, 20, 30, 7, 17]
    for step in range(40):  # every step covers every latent frame, no window is longer than 33
        assert p.counts(step).min() >= 1 and p.latent_indices(step).shape == (3, 33)


def test_four_windows_generic_sizes():
    """Any model: a 5-latent-frame window, stride 4, shift 2 over a buffer of 4 windows."""
    p = ShiftPlan(total_latent=17, audio_frames=68, window=5, shift=2, stride=4)
    assert p.num_windows == 4
    idx = p.latent_indices(3)  # shift 6 % 5 = 1: starts -1, 4, 9, 14
    np.testing.assert_array_equal(idx, [[16, 0, 1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11, 12, 13],
                                        [14, 15, 16, 0, 1]])
    np.testing.assert_array_equal(p.counts(3), np.r_[2, 2, np.ones(14, int), 2])


@pytest.mark.parametrize("xp_name", ["numpy", "jax"])
def test_merge_averages_overlaps(xp_name):
    xp = np if xp_name == "numpy" else __import__("jax.numpy", fromlist=["numpy"])
    p = shift_plan(300)
    idx = p.latent_indices(1)
    outs = np.broadcast_to(idx[..., None].astype(np.float32), (*idx.shape, 2)).copy()  # window k writes frame id
    outs[0] += 100.0  # window 0 disagrees by 100 on everything it writes
    merged = np.asarray(p.merge(1, xp.asarray(outs), xp=xp))
    want = np.arange(97, dtype=np.float32)[:, None].repeat(2, 1)
    want[idx[0]] += 100.0
    want[[87, 88]] -= 50.0  # shared by windows 0 and 2: the mean of (f + 100) and f
    np.testing.assert_allclose(merged, want)
    with pytest.raises(ValueError, match="cannot hold a window"):
        ShiftPlan(total_latent=20, audio_frames=200)


def test_hunyuan_avatar_guidance_is_the_released_schedule():
    """B.7: steps i < 10: v_u + w(v_c − v_u), w = 2 + (1 − i/N)(7.5 − 2), uncond = negative prompt + zero audio;
    steps i >= 10: w = 3.5 + (1 − i/N)(6.5 − 3.5), uncond = the prompt + zero audio (audio-only guidance)."""
    n = 50
    g = parse_guidance("hunyuan-avatar")
    assert g.spec == parse_guidance("hyavatar").spec
    assert g.branches() == [frozenset({"text", "audio"}), frozenset({"audio"}), frozenset()]
    w = g.weights(n)  # columns: ∅ (no text, no audio), text only, all
    i = np.arange(n)
    early, late = i < 10, i >= 10
    w_early = 2 + (1 - i / n) * (7.5 - 2)
    w_late = 3.5 + (1 - i / n) * (6.5 - 3.5)
    np.testing.assert_allclose(w[early], np.stack([1 - w_early, 0 * i, w_early], 1)[early], atol=1e-12)
    np.testing.assert_allclose(w[late], np.stack([0 * i, 1 - w_late, w_late], 1)[late], atol=1e-12)
    assert w[0, 2] == 7.5 and abs(w[9, 2] - 6.51) < 1e-9 and abs(w[10, 2] - 5.9) < 1e-9
    assert abs(w[49, 2] - 3.56) < 1e-9
    assert [(a, b, live) for a, b, live in g.phases(n)] == [(0, 10, (0, 2)), (10, 50, (1, 2))]  # 2 branches a step
