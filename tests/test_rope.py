"""3D RoPE: the reference's tables, explicit coordinates, and the relative-position property."""

import numpy as np
import pytest
import torch

from hallojax.nn.rope import apply_rope, axis_dims, frame_coords, grid_coords, rope_cos_sin


def test_axis_split_matches_wan():
    assert axis_dims(128) == (44, 42, 42)
    assert axis_dims(16) == (8, 4, 4)


@pytest.mark.parametrize("head_dim", [16, 128])
def test_grid_tables_equal_diffusers(head_dim):
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    f, h, w = 3, 5, 7
    ref = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)
    cos_ref, sin_ref = ref(torch.zeros(1, 1, f, 2 * h, 2 * w))  # [1, L, 1, K], pairs repeated
    cos, sin = rope_cos_sin(grid_coords(f, h, w), head_dim)
    np.testing.assert_array_equal(np.asarray(cos), cos_ref[0, :, 0, 0::2].numpy())
    np.testing.assert_array_equal(np.asarray(sin), sin_ref[0, :, 0, 1::2].numpy())


def _scores(q, k, cq, ck, head_dim):
    cos_q, sin_q = rope_cos_sin(cq, head_dim)
    cos_k, sin_k = rope_cos_sin(ck, head_dim)
    rq = np.asarray(apply_rope(q, cos_q[None], sin_q[None]), np.float64)
    rk = np.asarray(apply_rope(k, cos_k[None], sin_k[None]), np.float64)
    return np.einsum("blnk,bmnk->bnlm", rq, rk)


def test_scores_depend_only_on_coordinate_differences():
    rng = np.random.default_rng(0)
    head_dim, n = 24, 6
    q = rng.standard_normal((1, n, 2, head_dim)).astype(np.float32)
    k = rng.standard_normal((1, n, 2, head_dim)).astype(np.float32)
    cq = rng.integers(-5, 20, (n, 3)).astype(np.int32)
    ck = rng.integers(-5, 20, (n, 3)).astype(np.int32)
    base = _scores(q, k, cq, ck, head_dim)
    for shift in ([1, 0, 0], [-7, 3, 11], [0, -4, 0]):
        moved = _scores(q, k, cq + np.int32(shift), ck + np.int32(shift), head_dim)
        np.testing.assert_allclose(moved, base, rtol=1e-4, atol=1e-4)
    # and it does depend on the difference: moving only the keys changes the scores
    changed = _scores(q, k, cq, ck + np.int32([1, 0, 0]), head_dim)
    assert np.abs(changed - base).max() > 1e-2


def test_rotation_preserves_norm_and_is_identity_at_zero():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 3, 16)).astype(np.float32)
    cos, sin = rope_cos_sin(np.zeros((4, 3), np.int32), 16)
    np.testing.assert_allclose(np.asarray(apply_rope(x, cos[None], sin[None])), x, rtol=0, atol=0)
    cos, sin = rope_cos_sin(grid_coords(1, 2, 2, t0=-1), 16)
    y = np.asarray(apply_rope(x, cos[None], sin[None]))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_identity_frame_offsets():
    base = frame_coords(2, 3)
    assert (base[:, 0] == -1).all()
    np.testing.assert_array_equal(base[:, 1:], grid_coords(1, 2, 3)[:, 1:])
    shifted = frame_coords(2, 3, offset="shift")
    np.testing.assert_array_equal(shifted[:, 1:], base[:, 1:] + np.array([2, 3]))
    per_token = np.arange(12).reshape(6, 2)
    np.testing.assert_array_equal(frame_coords(2, 3, offset=per_token)[:, 1:], base[:, 1:] + per_token)
    with pytest.raises(ValueError, match="shape"):
        frame_coords(2, 3, offset=np.zeros((5, 2)))
    with pytest.raises(ValueError, match="offset mode"):
        frame_coords(2, 3, offset="diagonal")


def test_out_of_range_coordinates_are_rejected():
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        rope_cos_sin(np.array([[0, 0, 1024]], np.int32), 16, max_pos=1024)
