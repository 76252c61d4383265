"""Hallo3 as released: our model, loaded through `hallojax convert hallo3` from a state dict with the released
names, against tests/hallo3_reference.py (an independent PyTorch reference written from the research facts,
itself checked against diffusers' CogVideoX for the backbone) at a tiny width with every norm and modulation
perturbed: fp32 <= 1e-5 relative on 1 and 8 simulated devices; the bank computed once = recomputed; the
projectors' shapes at full size (49 wav2vec2 frames -> 13 latent frames); the full-size count from shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cogvideox_reference import diffusers_forward
from encoder_reference import assert_parity
from hallo3_reference import DENOISER, TINY, dit_forward, hallo3_forward, released_state_dict, window5
from hallojax import cli, load_pretrained
from hallojax.convert.hallo3 import DiffusersView
from hallojax.convert.hf import DictSource
from hallojax.models.hallo3 import AudioProjector, FaceProjector, Hallo3, param_count, preset
from hallojax.sharding import DEFAULT_RULES, make_mesh, use_rules

B, F, H, W = 2, 3, 4, 6  # 3 latent frames = 9 video frames; a 2 x 3 token grid per frame


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hallo3")
    sd = released_state_dict(TINY, seed=1)
    torch.save({"module": sd, "iteration": 1}, tmp / "mp_rank_00_model_states.pt")
    assert cli.main(["convert", "hallo3", str(tmp), str(tmp / "ours")]) == 0
    return sd, tmp / "ours"


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    s = TINY
    lat = rng.standard_normal((B, F, H, W, s["in_channels"])).astype(np.float32)
    t = np.array([999.0, 321.5], np.float32)
    ctx = rng.standard_normal((B, s["text_len"], s["text_dim"])).astype(np.float32)
    face = rng.standard_normal((B, s["face_in"])).astype(np.float32)
    audio = rng.standard_normal((B, 4 * F - 3, s["audio_layers"], s["audio_in"])).astype(np.float32)
    ref = rng.standard_normal((B, 1, H, W, s["out_channels"])).astype(np.float32)
    return lat, t, ctx, face, audio, ref


def _reference(sd, lat, t, ctx, face, audio, ref):
    """The PyTorch reference on our channels-last inputs; channels-last float64 out."""
    sat = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 1, 4, 2, 3)))  # noqa: E731
    out = hallo3_forward(sd, TINY, sat(lat), torch.from_numpy(t), torch.from_numpy(ctx), torch.from_numpy(face),
                         window5(torch.from_numpy(audio)), sat(ref))
    return out.numpy().transpose(0, 1, 3, 4, 2).astype(np.float64)


_JITTED = {}


def _run(model, lat, t, ctx, face, audio, ref):
    """The model jitted once per graph (shared by the tests: one compile per mesh layout)."""
    graphdef, state = nnx.split(model)
    if graphdef not in _JITTED:
        _JITTED[graphdef] = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a[:3], face=a[3], audio=a[4],
                                                                            reference=a[5]))
    return np.asarray(_JITTED[graphdef](state, lat, t, ctx, face, audio, ref), np.float64)


@pytest.fixture(scope="module")
def model(released):
    return load_pretrained(released[1], dtype="float32")


def test_reference_backbone_is_diffusers_cogvideox(released):
    """The reference's SAT block (no bank, no face/audio) equals diffusers' CogVideoX-5B-I2V block on the same
    weights renamed by the converter's SAT -> diffusers table (final norm eps set to SAT's 1e-6)."""
    from diffusers import CogVideoXTransformer3DModel

    sd, _ = released
    s = TINY
    config = dict(num_attention_heads=s["heads"], attention_head_dim=s["head_dim"], in_channels=s["in_channels"],
                  out_channels=s["out_channels"], time_embed_dim=s["time_dim"], text_embed_dim=s["text_dim"],
                  num_layers=s["layers"], sample_width=s["width"], sample_height=s["height"],
                  sample_frames=4 * s["frames"] - 3, max_text_seq_length=s["text_len"],
                  use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True)
    model = CogVideoXTransformer3DModel(**config).eval()
    model.norm_out.norm.eps = 1e-6
    view = DiffusersView(DictSource(sd))
    renamed = {k[len(DENOISER):]: torch.from_numpy(np.array(view.get(k))) for k in view.keys()
               if k.startswith(DENOISER) and not any(x in k for x in ("face", "audio", "freqs", "position_embeddings"))}
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    lat, t, ctx, *_ = _inputs(3)
    ref = diffusers_forward(model, config, lat, t, ctx)
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(lat.transpose(0, 1, 4, 2, 3)))
        ours = dit_forward(sd, DENOISER, s, x, torch.from_numpy(t), torch.from_numpy(ctx)).numpy()
    assert_parity(ours.transpose(0, 1, 3, 4, 2), ref, "(SAT reference block vs diffusers)")


def test_forward_matches_reference_on_1_and_8_devices(released, model, devices):
    sd, ours_dir = released
    args = _inputs()
    ref = _reference(sd, *args)
    model, cfg = model
    assert isinstance(model, Hallo3) and cfg.num_layers == TINY["layers"] and cfg.dim == 32
    out = _run(model, *args)
    err1 = assert_parity(out, ref, "(1 device)")

    # the face and the audio paths are live in the reference (so the parity above covers them)
    lat, t, ctx, face, audio, r = args
    assert np.abs(_reference(sd, lat, t, ctx, 2 * face, audio, r) - ref).max() > 1e-2
    assert np.abs(_reference(sd, lat, t, ctx, face, 0 * audio, r) - ref).max() > 1e-2
    assert np.abs(_reference(sd, lat, t, ctx, face, audio, 0 * r) - ref).max() > 1e-2

    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    sharded, _ = load_pretrained(ours_dir, mesh=mesh, rules=DEFAULT_RULES, dtype="float32")
    shard = sharded.cross.face.query.kernel.get_value().addressable_shards[0].data.shape
    assert shard == (TINY["layers"], 32 // 4, 32 // 2), shard  # really split: fsdp 4, tensor 2
    with use_rules(DEFAULT_RULES), jax.set_mesh(mesh):
        out8 = _run(sharded, *args)
    err8 = assert_parity(out8, ref, "(8 devices)")
    assert np.abs(out8 - out).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    print(f"max |ours - reference|: 1 device {err1:.3g}, 8 devices {err8:.3g} (|ref| max {np.abs(ref).max():.3g})")


def test_bank_computed_once_equals_recomputing_it(model):
    model, cfg = model
    lat, t, ctx, face, audio, ref = _inputs(5)
    graphdef, state = nnx.split(model)
    bank_fn = jax.jit(lambda s, r: nnx.merge(graphdef, s).reference_bank(r))
    step = jax.jit(lambda s, x, tt, bank: nnx.merge(graphdef, s)(x, tt, ctx, face=face, audio=audio, bank=bank))
    bank = bank_fn(state, ref[:1])  # one reference for the whole batch (e.g. both guidance branches)
    assert bank.shape == (cfg.num_layers, 1, (H // 2) * (W // 2), cfg.dim)
    for tt in (t, np.array([17.0, 640.0], np.float32)):  # the same bank at every step
        once = np.asarray(step(state, lat, tt, bank))
        again = _run(model, lat, tt, ctx, face, audio, np.repeat(ref[:1], B, axis=0))
        np.testing.assert_allclose(once, again, rtol=0, atol=1e-6 * max(1.0, np.abs(again).max()))
    other = np.asarray(step(state, lat, t, bank_fn(state, ref[1:])))
    assert np.abs(other - np.asarray(step(state, lat, t, bank))).max() > 1e-3  # the bank is live
    with pytest.raises(ValueError, match="exactly one of `bank`"):
        model(lat, t, ctx, face=face, audio=audio)
    with pytest.raises(ValueError, match="bank has shape"):
        model(lat, t, ctx, face=face, audio=audio, bank=jnp.zeros((2, 1, 5, cfg.dim)))


def test_full_size_projectors_and_count_from_shapes():
    cfg = preset("hallo3")
    audio = nnx.eval_shape(lambda: AudioProjector(window=2, layers=12, in_dim=768, hidden=512, tokens=32, dim=768,
                                                  rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    gd, st = nnx.split(audio)
    for feats in ((1, 49, 12, 768), (1, 49, 5, 12, 768)):  # per-frame states, or windows already built
        out = jax.eval_shape(lambda s, x: nnx.merge(gd, s)(x), st, jax.ShapeDtypeStruct(feats, jnp.bfloat16))
        assert out.shape == (1, 13, 32, 768)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        jax.eval_shape(lambda s, x: nnx.merge(gd, s)(x), st, jax.ShapeDtypeStruct((1, 48, 12, 768), jnp.bfloat16))
    face = nnx.eval_shape(lambda: FaceProjector(512, 4, 1024, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                                param_dtype=jnp.bfloat16))
    gd, st = nnx.split(face)
    assert jax.eval_shape(lambda s, x: nnx.merge(gd, s)(x), st,
                          jax.ShapeDtypeStruct((2, 512), jnp.bfloat16)).shape == (2, 4, 1024)

    model = nnx.eval_shape(lambda: Hallo3(cfg, rngs=nnx.Rngs(0)))
    parts = {name: param_count(getattr(model, name)) for name in ("denoiser", "reference", "cross", "face_proj",
                                                                   "audio_proj", "denoiser_buffers")}
    assert parts["denoiser"] == parts["reference"] == 5_570_479_680 + 54_607_872  # diffusers 5B-I2V + its table
    assert parts["denoiser_buffers"] == 2 * 17550 * 64 + 64 * 3072  # RoPE tables + SAT's dead position table
    assert parts["face_proj"] == 2_103_296 and parts["audio_proj"] == 1_244_449_280
    assert parts["cross"] == 42 * (25_184_256 + 23_611_392)
    assert param_count(model) == 14_551_030_912
