"""HunyuanVideo VAE parity with diffusers' AutoencoderKLHunyuanVideo (fp32, CPU), through the real converter.

Tolerance: max |ours - diffusers| <= 1e-4 * max(1, max |diffusers|), on non-square odd-frame clips. The tiny
reference has the real block structure (4 blocks of ResNets, strides (4, 8, 8), mid-block attention
with its causal frame mask) with every GroupNorm weight and bias perturbed. diffusers' defaults tile long
clips in time (framewise encode above 16 frames, decode above 4 latent frames): both paths are compared.
"""

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from hallojax.codec import get_codec
from hallojax.convert.hunyuan_vae import config_to_diffusers, convert_hunyuan_vae
from hallojax.convert.table import ConversionError
from hallojax.models.hunyuan_vae import PRESETS, HunyuanVAEConfig, compile_decode
from hallojax.models.wan import param_count
from hallojax.nn.vae_blocks import single_head_attention
from hallojax.registry import abstract
from test_sd_vae import (_broken_from, assert_bitwise_round_trip, assert_sharded_equals_single_device, converted_pair,
                         diffusers_param_count)
from test_vae import _cf, _cl, assert_close

TINY = dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4, latent_channels=4)
SCALE = 0.476986


@pytest.fixture(scope="module")
def vae_pair(tmp_path_factory):
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(0)
    return converted_pair(AutoencoderKLHunyuanVideo(**TINY).eval(), tmp_path_factory.mktemp("hyvae"), "hunyuan-vae")


def test_tiny_preset_is_the_test_model(vae_pair):
    assert vae_pair[2] == PRESETS["tiny"]
    assert (vae_pair[2].temporal_stride, vae_pair[2].spatial_stride) == (4, 8)


def test_encode_matches_diffusers(vae_pair):
    ref, ours, _, _ = vae_pair
    video = np.random.default_rng(0).uniform(-1, 1, (2, 9, 24, 40, 3)).astype(np.float32)  # odd frames, non-square
    with torch.no_grad():
        dist = ref.encode(_cf(video)).latent_dist
    (mean, logvar), scaled = jax.jit(lambda v: (ours.encode_moments(v), ours.encode(v)))(video)
    assert mean.shape == (2, 3, 3, 5, 4)
    assert_close(mean, _cl(dist.mean), "posterior mean")
    assert_close(logvar, _cl(dist.logvar), "posterior logvar")
    assert_close(scaled, _cl(dist.mean) * SCALE, "scaled latents")


def test_framewise_encode_matches_diffusers(vae_pair):
    """21 frames > 16: diffusers encodes frames 0-16 and 12-20 and blends them; so do we."""
    ref, ours, _, _ = vae_pair
    video = np.random.default_rng(1).uniform(-1, 1, (1, 21, 16, 24, 3)).astype(np.float32)
    with torch.no_grad():
        expected = _cl(ref.encode(_cf(video)).latent_dist.mean)
        ref.use_framewise_encoding = False
        whole = _cl(ref.encode(_cf(video)).latent_dist.mean)
        ref.use_framewise_encoding = True
    assert np.abs(whole - expected).max() > 1e-3  # the tiling really changes the computation
    assert_close(jax.jit(lambda v: ours.encode_moments(v)[0])(video), expected, "framewise encode")


def test_decode_matches_diffusers(vae_pair):
    ref, ours, _, _ = vae_pair
    latents = np.random.default_rng(2).standard_normal((2, 3, 3, 5, 4)).astype(np.float32)  # -> 9 frames 24x40
    with torch.no_grad():
        expected = _cl(ref.decode(_cf(latents / SCALE)).sample)
    assert expected.shape == (2, 9, 24, 40, 3)
    raw, clamped = jax.jit(lambda z: (ours.decode(z, clamp=False), ours.decode(z)))(latents)
    assert_close(raw, expected, "decode")
    assert_close(clamped, np.clip(expected, -1, 1), "decode, clamped")


def test_framewise_decode_matches_diffusers_in_bounded_memory(vae_pair):
    """7 latent frames > 4: diffusers decodes latents 0-4 and 3-6 (6 alone is a tail it drops) and blends
    them; so do we, the full-length tiles under lax.map. The compiled program's temporaries grow with the
    output only: 13 latent frames (3 full tiles) need about what 7 (one) need, plus output-sized buffers."""
    ref, ours, _, _ = vae_pair
    z = np.random.default_rng(3).standard_normal((1, 7, 2, 3, 4)).astype(np.float32)
    with torch.no_grad():
        expected = _cl(ref.decode(_cf(z / SCALE)).sample)
        ref.use_framewise_decoding = False
        whole = _cl(ref.decode(_cf(z / SCALE)).sample)
        ref.use_framewise_decoding = True
    assert expected.shape == (1, 25, 16, 24, 3) and np.abs(whole - expected).max() > 1e-3
    compiled = compile_decode(ours, z.shape, clamp=False)
    assert_close(compiled(nnx.state(ours), z), expected, "framewise decode")
    small = compiled.memory_analysis()
    large = compile_decode(ours, (1, 13, 2, 3, 4), clamp=False).memory_analysis()
    out_growth = large.output_size_in_bytes - small.output_size_in_bytes
    # measured: 2.56 MB, 1.64 MB; decoding the 13 frames whole (frames=None) plans 4.54 MB
    assert large.temp_size_in_bytes < small.temp_size_in_bytes + 2 * out_growth


def test_spatially_tiled_decode_matches_diffusers(vae_pair):
    ref, ours, _, _ = vae_pair
    # 3 tiles across, blended: the two of full width run under one lax.map
    z = np.random.default_rng(4).standard_normal((1, 2, 2, 9, 4)).astype(np.float32)
    ref.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                      tile_sample_stride_width=24)
    try:
        with torch.no_grad():
            expected = _cl(ref.decode(_cf(z / SCALE)).sample)
    finally:
        ref.use_tiling = False
    assert expected.shape == (1, 5, 16, 72, 3)
    assert_close(jax.jit(lambda z: ours.decode(z, clamp=False, tile=32, tile_stride=24))(z), expected, "tiled decode")


def test_attention_in_query_blocks_equals_whole():
    """The mid-block attention over 3 frames of 10 positions, queries 7 at a time (5 blocks, the last
    padded): the same as all at once; a query never sees a later frame."""
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((2, 30, 8)).astype(np.float32) for _ in range(3))
    whole = np.asarray(single_head_attention(q, k, v, frames=3))
    np.testing.assert_allclose(single_head_attention(q, k, v, frames=3, block=7), whole, rtol=1e-6, atol=1e-6)
    later = k.copy()
    later[:, 20:] = 0.0
    changed = np.asarray(single_head_attention(q, later, v, frames=3, block=7))
    np.testing.assert_array_equal(changed[:, :20], whole[:, :20])
    assert np.abs(changed[:, 20:] - whole[:, 20:]).max() > 1e-3


def test_batch_sharded_equals_single_device(vae_pair, devices):
    assert_sharded_equals_single_device(vae_pair[1], np.random.default_rng(5).uniform(-1, 1, (8, 5, 16, 24, 3)))


def test_codec_spec(vae_pair):
    _, _, _, tmp = vae_pair
    codec = get_codec(f"hunyuan-vae:{tmp / 'ours'}")
    assert (codec.temporal_stride, codec.spatial_stride, codec.latent_channels) == (4, 8, 4)
    assert codec.name == f"hunyuan-vae:{tmp / 'ours'}"
    with pytest.raises(ValueError, match="holds a HunyuanVAE, not a SD VAE"):
        get_codec(f"sd-vae:{tmp / 'ours'}")


def test_round_trip_is_bitwise(vae_pair):
    assert_bitwise_round_trip(vae_pair[0], vae_pair[3], "hunyuan-vae")


def test_full_size_parameter_count_equals_diffusers():
    from diffusers import AutoencoderKLHunyuanVideo

    cfg = PRESETS["hunyuan"]
    n = diffusers_param_count(AutoencoderKLHunyuanVideo, config_to_diffusers(cfg))
    assert param_count(abstract(cfg)) == n == 246_478_803


def test_bad_checkpoints_and_inputs(vae_pair, tmp_path):
    _, ours, _, tmp = vae_pair

    def edit(t):
        del t["encoder.mid_block.attentions.0.to_q.weight"]
        t["decoder.up_blocks.1.upsamplers.0.conv.conv.weight"] = np.zeros((16, 16, 3, 3, 2), np.float32)
        t["decoder.extra.bias"] = np.zeros((2,), np.float32)

    src = _broken_from(tmp, tmp_path, "broken", edit)
    with pytest.raises(ConversionError) as err:
        convert_hunyuan_vae(src, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "encoder.mid_block.attentions.0.to_q.weight (expected (16, 16))" in msg
    assert "decoder.up_blocks.1.upsamplers.0.conv.conv.weight: (16, 16, 3, 3, 2)" in msg
    assert "decoder.extra.bias (2,)" in msg
    assert not (tmp_path / "out").exists()
    src = _broken_from(tmp, tmp_path, "t8", edit_config=lambda c: c.update(temporal_compression_ratio=8))
    with pytest.raises(ConversionError, match="t8/config.json: hunyuan-vae.temporal_compression_ratio=8: only 4"):
        convert_hunyuan_vae(src, tmp_path / "out", progress=False)
    src = _broken_from(tmp, tmp_path, "noattn", edit_config=lambda c: c.update(mid_block_add_attention=False))
    with pytest.raises(ConversionError, match="not supported: mid_block_add_attention=False"):
        convert_hunyuan_vae(src, tmp_path / "out", progress=False)
    (src / "config.json").write_text(json.dumps(dict(json.loads((src / "config.json").read_text()),
                                                     _class_name="AutoencoderKL")))
    with pytest.raises(ConversionError, match="_class_name is 'AutoencoderKL'"):
        convert_hunyuan_vae(src, tmp_path / "out", progress=False)

    with pytest.raises(ValueError, match="T must be 1 \\+ 4k"):
        ours.encode(np.zeros((1, 8, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected \[B, T, H, W, 3\]"):
        ours.encode(np.zeros((1, 5, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"latents have shape"):
        ours.decode(np.zeros((1, 2, 2, 2, 16), np.float32))
    with pytest.raises(ValueError, match="multiple of norm_num_groups"):
        HunyuanVAEConfig(block_out_channels=(8, 12), norm_num_groups=8)
