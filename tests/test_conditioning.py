"""Pure conditioning functions: mask patterns, motion frames, face masks, condition dropout, audio alignment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hallojax.nn.audio import AudioProjector, frame_windows, frames_to_latent, window_features
from hallojax.conditioning import (DropoutConfig, apply_keep, condition_dropout, face_mask_tokens, inpainting_input,
                                   latent_mask, masked_video, motion_channels, motion_from_clip, pixel_mask)


def test_pixel_mask_patterns():
    t, h, w = 9, 16, 24
    assert pixel_mask("t2v", t, h, w).min() == 1
    i2v = pixel_mask("i2v", t, h, w)
    assert i2v[0].max() == 0 and i2v[1:].min() == 1
    fl = pixel_mask("first_last", t, h, w)
    assert fl[0].max() == 0 and fl[-1].max() == 0 and fl[1:-1].min() == 1
    cont = pixel_mask("continuation", t, h, w, known_frames=5)
    assert cont[:5].max() == 0 and cont[5:].min() == 1
    region = pixel_mask("region", t, h, w, box=(8, 4, 16, 12))
    assert region[:, 4:12, 8:16].min() == 1 and region.sum() == t * 8 * 8
    with pytest.raises(ValueError, match="known_frames"):
        pixel_mask("continuation", t, h, w, known_frames=0)
    with pytest.raises(ValueError, match="outside"):
        pixel_mask("region", t, h, w, box=(8, 4, 30, 12))
    with pytest.raises(ValueError, match="expected one of"):
        pixel_mask("outpaint", t, h, w)


def test_latent_mask_groups_frames_and_inverts():
    # continuation with 5 known pixel frames = the first 2 latent frames known (1 + 4)
    m = latent_mask(pixel_mask("continuation", 9, 16, 24, known_frames=5))
    assert m.shape == (3, 2, 3, 4)
    assert m[:2].min() == 1 and m[2].max() == 0  # 1 = known
    # i2v: latent frame 0 is the first frame repeated 4 times -> all 4 channels known
    m = latent_mask(pixel_mask("i2v", 9, 16, 24))
    assert m[0].min() == 1 and m[1:].max() == 0
    # 2 known frames: latent frame 1 has its first pixel frame known, the other three generated
    m = latent_mask(pixel_mask("continuation", 9, 16, 24, known_frames=2))
    np.testing.assert_array_equal(m[1, 0, 0], [1, 0, 0, 0])
    # region: only the boxed latent cells are unknown
    m = latent_mask(pixel_mask("region", 5, 16, 24, box=(8, 0, 16, 8)))
    assert m[:, 0, 1].max() == 0 and m[:, 1].min() == 1 and m[:, 0, 0].min() == 1
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        latent_mask(np.ones((8, 16, 16), np.float32))


def test_masked_video_and_inpainting_input():
    video = np.full((5, 8, 8, 3), 0.5, np.float32)
    mv = masked_video(video, pixel_mask("i2v", 5, 8, 8))
    assert (mv[0] == 0.5).all() and (mv[1:] == 0).all()
    x = inpainting_input(jnp.ones((1, 2, 1, 1, 16)), jnp.zeros((1, 2, 1, 1, 4)), jnp.full((1, 2, 1, 1, 16), 2.0))
    assert x.shape[-1] == 36 and float(x[..., 16:20].sum()) == 0 and float(x[..., 20:].min()) == 2


def test_motion_frames():
    lat = jnp.arange(2 * 4 * 1 * 1 * 2, dtype=jnp.float32).reshape(2, 4, 1, 1, 2)
    ch = motion_channels(lat[:, :1], 4)
    assert ch.shape == lat.shape and float(jnp.abs(ch[:, 1:]).max()) == 0
    np.testing.assert_array_equal(ch[:, 0], lat[:, 0])
    noisy = motion_from_clip(jax.random.key(0), lat, 2)
    assert noisy.shape == (2, 2, 1, 1, 2)
    diff = np.abs(np.asarray(noisy - lat[:, :2]))
    assert 0 < diff.max() < 0.5  # sigma = exp(N(-3, 0.5)): small but nonzero noise
    with pytest.raises(ValueError, match="do not fit"):
        motion_channels(lat, 2)


def test_face_mask_tokens():
    m = face_mask_tokens((16, 16, 48, 48), 64, 64, (4, 4))
    np.testing.assert_array_equal(m, np.array([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]))
    assert face_mask_tokens((16, 16, 48, 48), 64, 64, (4, 4), scale=3.0).sum() == 16
    assert face_mask_tokens((16, 16, 32, 32), 64, 64, (4, 4)).sum() == 1  # only the centre 24 is inside


def test_condition_dropout_frequencies_match_probabilities():
    cfg = DropoutConfig(p_text=0.1, p_audio=0.3, p_ref=0.05)
    n = 40000
    keep = condition_dropout(jax.random.key(7), jnp.full((n,), 0.5), cfg)
    for name, p in (("text", 0.1), ("audio", 0.3), ("ref", 0.05)):
        rate = 1 - float(keep[name].mean())
        assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / n), (name, rate, p)
    again = condition_dropout(jax.random.key(7), jnp.full((n,), 0.5), cfg)
    assert all(np.array_equal(keep[k], again[k]) for k in keep)  # reproducible from the step RNG


def test_condition_dropout_phases():
    cfg = DropoutConfig(p_text=0.0, p_audio=0.0, p_ref=0.0, phases=True, early_sigma=0.8, late_sigma=0.2,
                        late_drop=0.5)
    n = 40000
    early = condition_dropout(jax.random.key(1), jnp.full((n,), 0.9), cfg)
    assert bool(early["text"].all()) and not bool(early["audio"].any()) and not bool(early["ref"].any())
    middle = condition_dropout(jax.random.key(1), jnp.full((n,), 0.5), cfg)
    assert all(bool(middle[k].all()) for k in middle)
    late = condition_dropout(jax.random.key(1), jnp.full((n,), 0.1), cfg)
    dropped = n * 3 - sum(int(late[k].sum()) for k in late)
    per_sample = 3 - (late["text"].astype(int) + late["audio"].astype(int) + late["ref"].astype(int))
    assert set(np.unique(per_sample)) == {0, 1, 2}  # never all three
    # expected dropped modalities per sample: 0.5 * (1 + 2) / 2 = 0.75
    assert abs(dropped / n - 0.75) < 0.03
    for k in late:  # symmetric over modalities: each dropped with probability 0.25
        assert abs(1 - float(late[k].mean()) - 0.25) < 0.02


def test_apply_keep_zeroes_dropped_samples():
    x = jnp.ones((3, 2, 2))
    y = apply_keep(x, jnp.array([True, False, True]))
    assert float(y[1].sum()) == 0 and float(y[0].sum()) == 4 and float(y[2].sum()) == 4


def test_audio_alignment_and_windows():
    assert frames_to_latent(1) == 1 and frames_to_latent(49) == 13
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        frames_to_latent(48)
    feats = jnp.arange(5, dtype=jnp.float32).reshape(1, 5, 1, 1)
    win = window_features(feats, 2)[0, :, :, 0, 0]
    np.testing.assert_array_equal(win[0], [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(win[4], [2, 3, 4, 4, 4])
    tokens = jnp.arange(3, dtype=jnp.float32).reshape(1, 3, 1, 1)  # one token per latent frame
    kv, valid = frame_windows(tokens, 1)
    np.testing.assert_array_equal(kv[0, :, :, 0], [[0, 0, 1], [0, 1, 2], [1, 2, 2]])
    np.testing.assert_array_equal(valid, [[False, True, True], [True, True, True], [True, True, False]])


@pytest.mark.parametrize("align,stride,tokens_per_latent", [("group", 4, 4 * 3), ("conv", 4, 3), ("group", 1, 3),
                                                              ("conv", 2, 3)])
def test_audio_projector_alignment(align, stride, tokens_per_latent):
    proj = AudioProjector(in_layers=2, in_dim=4, window=1, hidden=8, tokens=3, out_dim=6, align=align,
                          stride=stride, rngs=nnx.Rngs(0))
    feats = jax.random.normal(jax.random.key(0), (2, 9, 2, 4))
    out = proj(feats)
    assert out.shape == (2, 1 + 8 // stride, tokens_per_latent, 6)
    assert len(proj.convs) == (stride.bit_length() - 1 if align == "conv" else 0)
    # latent frame 0 = video frame 0 (its window: frames 0..1), latent frame 1 = video frames 1..stride:
    # zeroing frames 2 on leaves latent frame 0 as it is and changes frame 1
    cut = proj(feats.at[:, 2:].set(0.0))
    np.testing.assert_array_equal(cut[:, 0], out[:, 0])
    assert np.abs(cut[:, 1] - out[:, 1]).max() > 1e-3
    if align == "group" and stride == 4:
        # token by token, with a window of 0 (each video frame's tokens from that frame alone): latent frame 0
        # is video frame 0's tokens 4 times; latent frame 1 is video frames 1, 2, 3, 4's tokens in order
        own = AudioProjector(in_layers=2, in_dim=4, window=0, hidden=8, tokens=3, out_dim=6, align=align,
                             stride=stride, rngs=nnx.Rngs(0))
        out, cut = own(feats), own(feats.at[:, 2:].set(0.0))
        np.testing.assert_array_equal(out[:, 0], jnp.tile(out[:, 0, :3], (1, 4, 1)))
        np.testing.assert_array_equal(cut[:, 0], out[:, 0])
        np.testing.assert_array_equal(cut[:, 1, :3], out[:, 1, :3])  # video frame 1: kept
        changed = np.abs(np.asarray(cut[:, 1, 3:] - out[:, 1, 3:])).reshape(2, 3, 3, 6).max(axis=(0, 2, 3))
        assert (changed > 1e-3).all(), changed  # video frames 2, 3, 4: zeroed
    with pytest.raises(ValueError, match=r"expected \[B, T, 2, 4\]"):
        proj(feats[..., :3])
