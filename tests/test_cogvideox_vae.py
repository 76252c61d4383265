"""CogVideoX VAE parity with diffusers' AutoencoderKLCogVideoX (fp32, CPU), through the real converter.

Tolerance: max |ours - diffusers| <= 1e-4 * max(1, max |diffusers|). Clips are non-square and long enough
for diffusers' frame batching to run several chunks (25 frames = 9 + 8 + 8 encoded; 7 latents = 3 + 2 + 2
decoded), so the first chunk, the scanned chunks and the conv caches between them are all compared.
"""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

from hallojax import cli, load_pretrained
from hallojax.codec import get_codec, latent_frames
from hallojax.convert.cogvideox_vae import (config_from_diffusers, config_to_diffusers, convert_cogvideox_vae,
                                            export_cogvideox_vae)
from hallojax.convert.table import ConversionError
from hallojax.models.cogvideox_vae import CogVideoXVAE, CogVideoXVAEConfig
from hallojax.models.wan import param_count
from hallojax.registry import abstract
from hallojax.sharding import batch_sharding, make_mesh
from test_vae import _cf, _cl, assert_close, assert_export_bitwise

TINY = CogVideoXVAEConfig.preset("tiny", scaling_factor=0.7)


def _diffusers_kwargs(cfg):
    return {k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def vae_pair(tmp_path_factory):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    ref = AutoencoderKLCogVideoX(**_diffusers_kwargs(TINY)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # every GroupNorm scale away from 1
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):  # norm and conv biases away from 0
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    tmp = tmp_path_factory.mktemp("cogvae")
    ref.save_pretrained(tmp / "diffusers")
    assert cli.main(["convert", "cogvideox-vae", str(tmp / "diffusers"), str(tmp / "ours")]) == 0
    ours, cfg = load_pretrained(tmp / "ours")
    assert isinstance(ours, CogVideoXVAE) and cfg == TINY
    return ref, ours, cfg, tmp


@pytest.fixture(scope="module")
def jitted(vae_pair):
    """One compile each, shared by the parity, memory and 8-device tests (batch 8: one sample a device)."""
    _, ours, _, _ = vae_pair
    return jax.jit(ours.encode_moments), jax.jit(lambda z: ours.decode(z, clamp=False))


VIDEO = np.random.default_rng(0).uniform(-1, 1, (8, 25, 24, 40, 3)).astype(np.float32)  # 9 + 8 + 8 frames
LATENTS = np.random.default_rng(1).standard_normal((8, 7, 3, 5, 4)).astype(np.float32)  # 3 + 2 + 2 latents


def test_encode_matches_diffusers(vae_pair, jitted):
    ref = vae_pair[0]
    with torch.no_grad():
        dist = ref.encode(_cf(VIDEO)).latent_dist
    mean, logvar = jitted[0](VIDEO)
    assert mean.shape == (8, 7, 3, 5, 4)
    assert_close(mean, _cl(dist.mean), "posterior mean")
    assert_close(logvar, _cl(dist.logvar), "posterior logvar")


def test_decode_matches_diffusers(vae_pair, jitted):
    ref = vae_pair[0]
    with torch.no_grad():
        expected = _cl(ref.decode(_cf(LATENTS)).sample)
    assert expected.shape == (8, 25, 24, 40, 3)
    # decode takes the latents the DiT sees (x scaling_factor) and divides, as the pipelines do
    assert_close(jitted[1](LATENTS * TINY.scaling_factor), expected, "decode")


@pytest.mark.parametrize("latent_frames", [1, 2, 4])
def test_decoded_frame_counts_match_diffusers(vae_pair, latent_frames):
    """Odd and even latent counts (diffusers decodes an even first chunk to 4F frames), by shape only."""
    ref, ours, _, _ = vae_pair
    z = np.zeros((1, latent_frames, 1, 2, 4), np.float32)
    with torch.no_grad():
        t = ref.decode(_cf(z)).sample.shape[2]
    assert jax.eval_shape(ours.decode, z).shape[1] == t == ours.num_frames(latent_frames)


@pytest.mark.parametrize("frames", [2, 3, 5])
def test_short_clips_in_one_chunk_match_diffusers(vae_pair, frames):
    """T <= 8 frames of any length encode in one piece by the odd/even time halving (Hallo3's 3
    conditioning frames -> 2 -> 1 latent frame); 1 + 4k beyond (T = 25 above)."""
    ref, ours, _, _ = vae_pair
    video = VIDEO[:2, :frames]
    with torch.no_grad():
        dist = ref.encode(_cf(video)).latent_dist
    mean, logvar = jax.jit(ours.encode_moments)(video)
    assert mean.shape[1] == ours.latent_frames(frames) == -(-frames // 4)
    assert_close(mean, _cl(dist.mean), f"posterior mean, {frames} frames")
    assert_close(logvar, _cl(dist.logvar), f"posterior logvar, {frames} frames")


def test_latent_frame_counts(vae_pair):
    """latent_frames(T) = ceil(T/4) in one chunk, 1 + k for T = 1 + 4k over several (diffusers' batching)."""
    vae = vae_pair[1]
    for t in [*range(1, 9), 9, 13, 17, 21, 25, 29, 49]:
        z = jax.eval_shape(vae.encode_moments, jax.ShapeDtypeStruct((1, t, 8, 8, 3), np.float32))[0]
        assert z.shape[1] == vae.latent_frames(t) == (-(-t // 4) if t <= 8 else 1 + (t - 1) // 4), t


def test_codec_round_trip(vae_pair):
    """`cogvideox-vae:DIR` through get_codec: the model's encode / decode, 3 frames -> 1 latent frame."""
    tmp = vae_pair[3]
    codec = get_codec(f"cogvideox-vae:{tmp / 'ours'}")
    assert (codec.temporal_stride, codec.spatial_stride, codec.latent_channels) == (4, 8, 4)
    assert [latent_frames(codec, t) for t in (3, 8, 17)] == [1, 2, 5]
    with pytest.raises(ValueError, match="10 video frames"):
        latent_frames(codec, 10)
    ref, video = vae_pair[0], VIDEO[:1, :3]
    lat = codec.encode(video)
    assert isinstance(lat, np.ndarray) and lat.shape == (1, 1, 3, 5, 4)
    with torch.no_grad():
        expected = ref.encode(_cf(video)).latent_dist.mean * TINY.scaling_factor
    assert_close(lat, _cl(expected), "codec encode")
    back = codec.decode(lat)
    with torch.no_grad():
        expected = ref.decode(_cf(lat / TINY.scaling_factor)).sample.clamp(-1, 1)
    assert back.shape == (1, 1, 24, 40, 3) and np.abs(back).max() <= 1.0
    assert_close(back, _cl(expected), "codec decode (clamped)")
    with pytest.raises(ValueError, match="needs a path: 'cogvideox-vae:DIR'"):
        get_codec("cogvideox-vae")
    with pytest.raises(ValueError, match=r"T must be 1 \+ 4k \(or at most 8\)"):
        codec.encode(VIDEO[:1, :10])


def test_decode_memory_is_bounded_by_the_chunk(jitted):
    """XLA's compiled temp memory for 7 latent frames (3 chunks) exceeds that of 5 (2 chunks) by less than
    the extra output: one more chunk adds no activations (decoding all at once adds ~20x the output)."""
    short, long = (jitted[1].lower(LATENTS[:, :f]).compile().memory_analysis() for f in (5, 7))
    extra_out = long.output_size_in_bytes - short.output_size_in_bytes
    assert extra_out == 8 * 8 * 24 * 40 * 3 * 4  # 8 more frames
    growth = long.temp_size_in_bytes - short.temp_size_in_bytes
    assert growth <= extra_out, (short.temp_size_in_bytes, long.temp_size_in_bytes)


def test_batch_sharded_equals_single_device(vae_pair, jitted, devices):
    """8 devices, one sample each, against the single-device compiles above; on the way, `encode` scales
    the mean by scaling_factor and `decode` clamps to [-1, 1] as the CogVideoX pipelines do."""
    ours = vae_pair[1]
    mean, video = np.asarray(jitted[0](VIDEO)[0]), np.asarray(jitted[1](LATENTS))
    assert np.abs(video).max() > 1.0  # so the clamp is exercised
    mesh = make_mesh(dict(data=-1))
    with jax.set_mesh(mesh):
        latents = jax.jit(ours.encode)(jax.device_put(VIDEO, batch_sharding(mesh, VIDEO.shape)))
        clamped = jax.jit(ours.decode)(jax.device_put(LATENTS, batch_sharding(mesh, LATENTS.shape)))
    assert latents.addressable_shards[0].data.shape[0] == 1 and clamped.addressable_shards[0].data.shape[0] == 1
    np.testing.assert_allclose(np.asarray(latents), mean * TINY.scaling_factor, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(clamped), np.clip(video, -1.0, 1.0), rtol=1e-5, atol=1e-5)


def test_round_trip_is_bitwise(vae_pair):
    from diffusers import AutoencoderKLCogVideoX

    ref, _, _, tmp = vae_pair
    export_cogvideox_vae(tmp / "ours", tmp / "back", progress=False)
    assert assert_export_bitwise(ref, tmp / "back", AutoencoderKLCogVideoX).config.scaling_factor == 0.7


@pytest.mark.parametrize("name,factor", [("2b", 1.15258426), ("5b", 0.7)])
def test_full_size_presets_equal_diffusers(name, factor):
    from diffusers import AutoencoderKLCogVideoX

    cfg = CogVideoXVAEConfig.preset(name)
    assert cfg.scaling_factor == factor
    with torch.device("meta"):
        ref = AutoencoderKLCogVideoX(**_diffusers_kwargs(cfg))
    assert param_count(abstract(cfg)) == sum(p.numel() for p in ref.parameters())


def test_bad_checkpoint_errors_name_keys_and_write_nothing(vae_pair, tmp_path):
    _, _, _, tmp = vae_pair
    src = tmp / "diffusers"
    tensors = safetensors.numpy.load_file(str(src / "diffusion_pytorch_model.safetensors"))
    del tensors["decoder.up_blocks.1.resnets.0.norm2.conv_y.conv.weight"]
    tensors["encoder.down_blocks.0.resnets.0.conv1.conv.weight"] = np.zeros((8, 8, 3, 3, 2), np.float32)
    tensors["encoder.quant_conv.weight"] = np.zeros((8, 8, 1, 1, 1), np.float32)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    safetensors.numpy.save_file(tensors, str(bad / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConversionError) as err:
        convert_cogvideox_vae(bad, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "1 missing" in msg
    assert "decoder.up_blocks.1.resnets.0.norm2.conv_y.conv.weight (expected (16, 4, 1, 1, 1))" in msg
    assert "1 unexpected" in msg and "encoder.quant_conv.weight (8, 8, 1, 1, 1)" in msg
    assert "1 mis-shaped" in msg and "encoder.down_blocks.0.resnets.0.conv1.conv.weight: (8, 8, 3, 3, 2)" in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))

    cfg = json.loads((src / "config.json").read_text())
    with pytest.raises(ConversionError, match="use_quant_conv=true"):
        config_from_diffusers(dict(cfg, use_quant_conv=True))
    with pytest.raises(ConversionError, match="multiple of norm_num_groups=3"):
        config_from_diffusers(dict(cfg, norm_num_groups=3))
    assert cli.main(["convert", "cogvideox-vae", str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 2


def test_bad_shapes_and_presets(vae_pair):
    """The shape checks are nn.conv's, shared with the Wan VAE (tested there); here: they are wired."""
    ours = vae_pair[1]
    with pytest.raises(ValueError, match="T must be 1 \\+ 4k \\(or at most 8\\) and H, W multiples of 8"):
        ours.encode(np.zeros((1, 10, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="10 video frames; expected 1 \\+ 4k or at most 8"):
        ours.latent_frames(10)
    with pytest.raises(ValueError, match=r"expected \[B, F, H, W, 4\]"):
        ours.decode(np.zeros((1, 2, 2, 2, 16), np.float32))
    with pytest.raises(ValueError, match="preset 'xl'"):
        CogVideoXVAEConfig.preset("xl")
