"""SD VAE parity with diffusers' AutoencoderKL (fp32, CPU), through the real converter.

Tolerance: max |ours - diffusers| <= 1e-4 * max(1, max |diffusers|), on a batch of non-square frames
encoded and decoded frame by frame. The tiny reference has the real block structure (4 blocks, 2 ResNets
each, stride 8, mid-block attention) with every GroupNorm weight and bias perturbed.
"""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

from hallojax import cli, load_pretrained
from hallojax.codec import get_codec
from hallojax.convert.safetensors_io import TensorStore
from hallojax.convert.sd_vae import config_to_diffusers, convert_sd_vae
from hallojax.convert.table import ConversionError
from hallojax.models.sd_vae import PRESETS, SDVAEConfig
from hallojax.models.wan import param_count
from hallojax.registry import abstract
from hallojax.sharding import batch_sharding, make_mesh
from test_vae import _cf, _cl, assert_close

TINY = dict(block_out_channels=[8, 16, 16, 16], layers_per_block=2, norm_num_groups=4, latent_channels=4,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
SCALE = 0.18215


def _frames(x):  # [B, T, H, W, C] numpy -> torch image batch [B*T, C, H, W]
    return _cf(x.reshape(-1, *x.shape[2:]))


def _video(t, b):  # torch image batch [B*T, C, H, W] -> [B, T, H, W, C] float64
    out = _cl(t)
    return out.reshape(b, -1, *out.shape[1:])


def converted_pair(ref, tmp, fmt):
    """Perturb every GroupNorm weight and bias of the diffusers VAE `ref` away from (1, 0), save it under
    tmp/diffusers, `hallojax convert FMT` it to tmp/ours and load that: (ref, ours, cfg, tmp)."""
    g = torch.Generator().manual_seed(1)
    perturbed = 0
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:  # norm1/2, conv_norm_out, the attention's group_norm
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
                perturbed += 1
    assert perturbed == 2 * sum(1 for m in ref.modules() if isinstance(m, torch.nn.GroupNorm))
    ref.save_pretrained(tmp / "diffusers")
    assert cli.main(["convert", fmt, str(tmp / "diffusers"), str(tmp / "ours")]) == 0
    ours, cfg = load_pretrained(tmp / "ours")
    return ref, ours, cfg, tmp


@pytest.fixture(scope="module")
def vae_pair(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return converted_pair(AutoencoderKL(**TINY).eval(), tmp_path_factory.mktemp("sdvae"), "sd-vae")


def test_tiny_preset_is_the_test_model(vae_pair):
    assert vae_pair[2] == PRESETS["tiny"]


def test_encode_matches_diffusers(vae_pair):
    ref, ours, _, _ = vae_pair
    video = np.random.default_rng(0).uniform(-1, 1, (2, 3, 24, 40, 3)).astype(np.float32)  # non-square frames
    with torch.no_grad():
        dist = ref.encode(_frames(video)).latent_dist
    (mean, logvar), scaled, mapped = jax.jit(lambda v: (ours.encode_moments(v), ours.encode(v),
                                                        ours.encode(v, frames_per_step=2)))(video)
    assert mean.shape == (2, 3, 3, 5, 4)
    assert_close(mean, _video(dist.mean, 2), "posterior mean")
    assert_close(logvar, _video(dist.logvar, 2), "posterior logvar")
    assert_close(scaled, _video(dist.mean, 2) * SCALE, "scaled latents")
    assert_close(mapped, _video(dist.mean, 2) * SCALE, "scaled latents, 2 frames at a time (lax.map)")


def test_decode_matches_diffusers(vae_pair):
    ref, ours, _, _ = vae_pair
    latents = np.random.default_rng(1).standard_normal((2, 3, 3, 5, 4)).astype(np.float32)
    with torch.no_grad():
        expected = _video(ref.decode(_frames(latents / SCALE)).sample, 2)
    assert expected.shape == (2, 3, 24, 40, 3)
    raw, clamped, mapped = jax.jit(lambda z: (ours.decode(z, clamp=False), ours.decode(z),
                                              ours.decode(z, clamp=False, frames_per_step=2)))(latents)
    assert_close(raw, expected, "decode")
    assert_close(clamped, np.clip(expected, -1, 1), "decode, clamped")
    assert_close(mapped, expected, "decode, 2 frames at a time (lax.map)")


def test_frames_are_independent(vae_pair):
    _, ours, _, _ = vae_pair
    video = np.random.default_rng(2).uniform(-1, 1, (2, 3, 24, 40, 3)).astype(np.float32)
    changed = video.copy()
    changed[:, 1] = 0.0
    encode = jax.jit(ours.encode)
    a, b = np.asarray(encode(video)), np.asarray(encode(changed))
    np.testing.assert_array_equal(a[:, [0, 2]], b[:, [0, 2]])
    assert np.abs(a[:, 1] - b[:, 1]).max() > 1e-3


def test_batch_sharded_equals_single_device(vae_pair, devices):
    _, ours, _, _ = vae_pair
    assert_sharded_equals_single_device(ours, np.random.default_rng(4).uniform(-1, 1, (8, 2, 16, 24, 3)))


def assert_sharded_equals_single_device(vae, video):
    """8 devices, one sample each, encode and decode `video` [8, ...]: equal to one device doing the same
    sample by sample (a batch of 1 in both, so XLA picks the same kernels)."""

    def round_trip(v):
        latents = vae.encode(v)
        return latents, vae.decode(latents)

    video = video.astype(np.float32)
    single = jax.jit(lambda v: jax.lax.map(lambda x: round_trip(x[None]), v))(video)
    mesh = make_mesh(dict(data=-1))
    with jax.set_mesh(mesh):
        latents, decoded = jax.jit(round_trip)(jax.device_put(video, batch_sharding(mesh, video.shape)))
    assert latents.addressable_shards[0].data.shape[0] == decoded.addressable_shards[0].data.shape[0] == 1
    np.testing.assert_allclose(np.asarray(latents), np.asarray(single[0])[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(single[1])[:, 0], rtol=1e-5, atol=1e-6)


def test_codec_spec(vae_pair):
    ref, ours, _, tmp = vae_pair
    codec = get_codec(f"sd-vae:{tmp / 'ours'}")
    assert (codec.temporal_stride, codec.spatial_stride, codec.latent_channels) == (1, 8, 4)
    video = np.random.default_rng(5).uniform(-1, 1, (1, 2, 16, 24, 3)).astype(np.float32)
    lat = codec.encode(video)
    np.testing.assert_allclose(lat, np.asarray(jax.jit(ours.encode)(video)), rtol=1e-6, atol=1e-6)
    assert codec.decode(lat).shape == video.shape
    with pytest.raises(ValueError, match="needs a path: 'sd-vae:DIR'"):
        get_codec("sd-vae")
    with pytest.raises(ValueError, match="holds a SDVAE, not a Wan VAE"):
        get_codec(f"wan-vae:{tmp / 'ours'}")


def assert_bitwise_round_trip(ref, tmp, fmt):
    """`hallojax export FMT` of tmp/ours (converted from ref) gives ref's tensors back bit for bit, and
    diffusers loads the directory."""
    assert cli.main(["export", fmt, str(tmp / "ours"), str(tmp / "back")]) == 0
    back = TensorStore(tmp / "back")
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert sorted(back.keys()) == sorted(state)
    for k, v in state.items():
        assert np.array_equal(back.get(k), v), k
    reloaded = type(ref).from_pretrained(tmp / "back")
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k


def diffusers_param_count(cls, config: dict) -> int:
    """Parameters of the diffusers model a `config_to_diffusers` dict describes (built on the meta device)."""
    with torch.device("meta"):
        ref = cls(**{k: v for k, v in config.items() if not k.startswith("_")})
    return sum(p.numel() for p in ref.parameters())


def test_round_trip_is_bitwise(vae_pair):
    assert_bitwise_round_trip(vae_pair[0], vae_pair[3], "sd-vae")


def test_full_size_parameter_count_equals_diffusers():
    from diffusers import AutoencoderKL

    cfg = PRESETS["sd"]
    assert param_count(abstract(cfg)) == diffusers_param_count(AutoencoderKL, config_to_diffusers(cfg)) == 83_653_863


def test_bad_checkpoints_and_inputs(vae_pair, tmp_path):
    _, ours, _, tmp = vae_pair

    def edit(t):
        del t["decoder.mid_block.attentions.0.to_out.0.bias"]
        t["encoder.down_blocks.1.downsamplers.0.conv.weight"] = np.zeros((16, 16, 3, 2), np.float32)
        t["encoder.extra.weight"] = np.zeros((2,), np.float32)

    src = _broken_from(tmp, tmp_path, "broken", edit)
    with pytest.raises(ConversionError) as err:
        convert_sd_vae(src, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "decoder.mid_block.attentions.0.to_out.0.bias (expected (16,))" in msg
    assert "encoder.down_blocks.1.downsamplers.0.conv.weight: (16, 16, 3, 2)" in msg
    assert "encoder.extra.weight (2,)" in msg
    assert not (tmp_path / "out").exists()

    src = _broken_from(tmp, tmp_path, "sd3", edit_config=lambda c: c.update(shift_factor=0.0609, use_quant_conv=False))
    with pytest.raises(ConversionError, match=r"sd3/config.json: not supported: shift_factor=0.0609, use_quant_conv"):
        convert_sd_vae(src, tmp_path / "out", progress=False)
    src = _broken_from(tmp, tmp_path, "attn", edit_config=lambda c: c.update(
        down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]))
    with pytest.raises(ConversionError, match="AttnDownEncoderBlock2D"):
        convert_sd_vae(src, tmp_path / "out", progress=False)

    with pytest.raises(ValueError, match="H and W must be multiples of 8"):
        ours.encode(np.zeros((1, 1, 12, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected \[B, T, H, W, 3\]"):
        ours.encode(np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"latents have shape"):
        ours.decode(np.zeros((1, 2, 2, 2, 16), np.float32))
    with pytest.raises(ValueError, match="multiple of norm_num_groups"):
        SDVAEConfig(block_out_channels=(8, 12), norm_num_groups=8)


def _broken_from(tmp, dest, name, edit_tensors=None, edit_config=None):
    src = tmp / "diffusers"
    out = dest / name
    out.mkdir()
    tensors = safetensors.numpy.load_file(str(src / "diffusion_pytorch_model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    safetensors.numpy.save_file(tensors, str(out / "diffusion_pytorch_model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    return out
