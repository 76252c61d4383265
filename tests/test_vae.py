"""Wan VAE parity with diffusers' AutoencoderKLWan (fp32, CPU), through the real converter.

Tolerance: max |ours - diffusers| <= 1e-4 * max(1, max |diffusers|), over 9 frames (so the chunked
cache path runs) on a non-square frame.
"""

import jax
import numpy as np
import pytest
import torch

from hallojax import cli, load_pretrained
from hallojax.convert.safetensors_io import TensorStore
from hallojax.convert.wan_vae import config_to_diffusers, export_wan_vae
from hallojax.registry import abstract
from hallojax.models.wan import param_count
from hallojax.sharding import batch_sharding, make_mesh
from hallojax.models.wan_vae import VAEConfig

TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
            latents_std=[1.5, 0.7, 2.0, 1.1])


def assert_close(ours, ref, what):
    ours = np.asarray(ours, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err, bound = np.abs(ours - ref).max(), 1e-4 * max(1.0, np.abs(ref).max())
    assert err <= bound, f"{what}: max |ours - diffusers| = {err:.3g} > {bound:.3g}"


def _cf(x):  # channels-last numpy -> channels-first torch
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def _cl(t):  # channels-first torch -> channels-last numpy
    return np.moveaxis(t.detach().numpy(), 1, -1).astype(np.float64)


@pytest.fixture(scope="module")
def vae_pair(tmp_path_factory):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    ref = AutoencoderKLWan(**TINY).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "gamma" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))  # norms away from 1
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    tmp = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(tmp / "diffusers")
    assert cli.main(["convert", "wan-vae", str(tmp / "diffusers"), str(tmp / "ours")]) == 0
    ours, cfg = load_pretrained(tmp / "ours")
    return ref, ours, cfg, tmp


def test_encode_matches_diffusers(vae_pair):
    ref, ours, cfg, _ = vae_pair
    video = np.random.default_rng(0).uniform(-1, 1, (2, 9, 24, 40, 3)).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(_cf(video)).latent_dist
    mean, logvar = jax.jit(ours.encode_moments)(video)
    assert_close(mean, _cl(dist.mean), "posterior mean")
    assert_close(logvar, _cl(dist.logvar), "posterior logvar")
    # normalised latents, as the Wan pipelines compute them: (z - mean) / std
    expected = (_cl(dist.mean) - np.array(TINY["latents_mean"])) / np.array(TINY["latents_std"])
    assert_close(jax.jit(ours.encode)(video), expected, "normalised latents")


def test_decode_matches_diffusers(vae_pair):
    ref, ours, cfg, _ = vae_pair
    z = np.random.default_rng(1).standard_normal((2, 3, 3, 5, 4)).astype(np.float32)  # -> 9 frames 24x40
    raw = z * np.array(TINY["latents_std"], np.float32) + np.array(TINY["latents_mean"], np.float32)
    with torch.no_grad():
        expected = _cl(ref.decode(_cf(raw)).sample)
    assert expected.shape == (2, 9, 24, 40, 3)
    assert_close(jax.jit(ours.decode)(z), expected, "decode")


def test_tiled_decode_matches_diffusers(vae_pair):
    ref, ours, cfg, _ = vae_pair
    z = np.random.default_rng(2).standard_normal((1, 2, 4, 6, 4)).astype(np.float32)
    raw = z * np.array(TINY["latents_std"], np.float32) + np.array(TINY["latents_mean"], np.float32)
    ref.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                      tile_sample_stride_width=24)
    try:
        with torch.no_grad():
            expected = _cl(ref.decode(_cf(raw)).sample)
    finally:
        ref.use_tiling = False
    out = jax.jit(lambda z: ours.decode(z, tile=32, tile_stride=24))(z)
    assert_close(out, expected, "tiled decode")
    untiled = np.asarray(jax.jit(ours.decode)(z))
    assert np.abs(untiled - expected).max() > 1e-3  # tiling really changed the computation


def test_encoder_is_causal_in_time(vae_pair):
    _, ours, _, _ = vae_pair
    video = np.random.default_rng(3).uniform(-1, 1, (1, 9, 16, 16, 3)).astype(np.float32)
    full, _ = ours.encode_moments(video)
    head, _ = ours.encode_moments(video[:, :5])
    np.testing.assert_allclose(np.asarray(head), np.asarray(full)[:, :2], rtol=1e-5, atol=1e-6)
    changed = video.copy()
    changed[:, 5:] = 0.0  # the future does not change the past latents, only the last one
    later, _ = ours.encode_moments(changed)
    np.testing.assert_allclose(np.asarray(later)[:, :2], np.asarray(full)[:, :2], rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(later)[:, 2] - np.asarray(full)[:, 2]).max() > 1e-3


def test_batch_sharded_equals_single_device(vae_pair, devices):
    _, ours, _, _ = vae_pair
    video = np.random.default_rng(4).uniform(-1, 1, (8, 5, 16, 24, 3)).astype(np.float32)
    single = np.asarray(jax.jit(ours.encode)(video))
    mesh = make_mesh(dict(data=-1))
    with jax.set_mesh(mesh):
        x = jax.device_put(video, batch_sharding(mesh, video.shape))
        latents = jax.jit(ours.encode)(x)
        decoded = jax.jit(ours.decode)(latents)
    assert latents.addressable_shards[0].data.shape[0] == 1  # one sample per device
    np.testing.assert_allclose(np.asarray(latents), single, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(jax.jit(ours.decode)(single)), rtol=1e-5, atol=1e-5)


def assert_export_bitwise(ref, back_dir, diffusers_cls):
    """The exported directory holds exactly `ref`'s tensors, bit for bit, and `diffusers_cls` loads it."""
    back = TensorStore(back_dir)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert sorted(back.keys()) == sorted(state)
    for k, v in state.items():
        assert np.array_equal(back.get(k), v), k
    reloaded = diffusers_cls.from_pretrained(back_dir)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
    return reloaded


def test_round_trip_is_bitwise(vae_pair):
    from diffusers import AutoencoderKLWan

    ref, _, _, tmp = vae_pair
    export_wan_vae(tmp / "ours", tmp / "back", progress=False)
    assert_export_bitwise(ref, tmp / "back", AutoencoderKLWan)


def test_full_size_parameter_count_equals_diffusers():
    from diffusers import AutoencoderKLWan

    cfg = VAEConfig()
    kwargs = {k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = AutoencoderKLWan(**kwargs)
    assert param_count(abstract(cfg)) == sum(p.numel() for p in ref.parameters())


def test_bad_shapes_and_unsupported_configs(vae_pair, tmp_path):
    _, ours, _, _ = vae_pair
    with pytest.raises(ValueError, match="T must be 1 \\+ 4k"):
        ours.encode(np.zeros((1, 8, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected \[B, T, H, W, 3\]"):
        ours.encode(np.zeros((1, 5, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"latents have shape"):
        ours.decode(np.zeros((1, 2, 2, 2, 7), np.float32))
    from hallojax.convert.wan_vae import config_from_diffusers

    with pytest.raises(ValueError, match="Wan2.2 VAE"):
        config_from_diffusers(dict(TINY, is_residual=True))
