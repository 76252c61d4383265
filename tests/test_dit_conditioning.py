"""Portrait conditioning on the DiT: every mechanism on and off, the zero-init rule (bitwise), identity
tokens' RoPE coordinates, audio locality, the reference cache, the zero-init rule on 8 devices (each style
preset's gradients on 1 vs 8 devices: tests/test_train_conditioning.py, through the real train step)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hallojax.adapt import load_base
from hallojax.nn.attention import dot_product_attention, gated_joint_attention
from hallojax.nn.audio import AudioCrossAttention
from hallojax.config import load_config
from hallojax.models.wan import Attention, DiTConfig, WanDiT
from hallojax.nn.rope import frame_coords, grid_coords
from hallojax.sharding import batch_sharding, create_sharded, make_mesh, normalize_rules, use_rules

BASE = DiTConfig.from_dict(load_config("configs/wan.py:tiny,dtype=float32").model)
AUDIO = dict(load_config("configs/wan.py:letstalk-style,dtype=float32").model)
AUDIO = {k: v for k, v in AUDIO.items() if k.startswith("audio_") and k not in ("audio_every", "audio_align")}
# one mechanism at a time, on the tiny backbone
MECHANISMS = {
    "identity_tokens": dict(identity_tokens=True),
    "identity_shift": dict(identity_tokens=True, identity_offset="shift"),
    "identity_additive": dict(identity_additive=True),
    "reference_net": dict(reference_net=True),
    "symbiotic": dict(symbiotic=True),
    "motion_channels": dict(motion_frames=1, motion_mode="channels"),
    "motion_prefix": dict(motion_frames=1, motion_mode="prefix"),
    "audio_cross_attn": dict(AUDIO, audio="cross_attn", audio_align="conv"),
    "audio_every_2_group_face": dict(AUDIO, audio="cross_attn", audio_every=2, audio_align="group",
                                     audio_face_mask=True, audio_neighbors=1),
    "audio_decoupled": dict(AUDIO, audio="decoupled", audio_align="group", audio_face_mask=True),
    "masked_input": dict(in_channels=36),
}
B, F, H, W = 2, 2, 4, 6  # latent frames 2 -> 5 video frames


def style_cfg(style, **kw):
    return DiTConfig.from_dict(load_config(f"configs/wan.py:{style},dtype=float32").model).replace(**kw)


def inputs(cfg: DiTConfig, seed=0, base_channels=None):
    rng = np.random.default_rng(seed)
    c_in = base_channels or cfg.in_channels
    x = {
        "latents": rng.standard_normal((B, F, H, W, c_in)).astype(np.float32),
        "timesteps": np.array([250.0, 900.0], np.float32),
        "context": rng.standard_normal((B, 5, cfg.text_dim)).astype(np.float32),
    }
    kw = {}
    if cfg.identity_tokens or cfg.identity_additive or cfg.symbiotic or cfg.reference_net:
        kw["reference"] = rng.standard_normal((B, 1, H, W, cfg.out_channels)).astype(np.float32)
    if cfg.audio != "none":
        kw["audio"] = rng.standard_normal((B, 1 + 4 * (F - 1), cfg.audio_in_layers, cfg.audio_in_dim)).astype(np.float32)
    if cfg.audio_face_mask:
        kw["face_mask"] = (rng.uniform(size=(B, F, H // 2, W // 2)) > 0.3).astype(np.float32)
    if cfg.motion_frames:
        kw["motion"] = rng.standard_normal((B, cfg.motion_frames, H, W, cfg.out_channels)).astype(np.float32)
    return x, kw


def forward(model, x, kw):
    return nnx.jit(lambda m, a, b: m(a["latents"], a["timesteps"], a["context"], **b))(model, x, kw)


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_zero_init_keeps_the_base_output_bitwise(name):
    """Base model -> the same weights in a model with the mechanism on (all adapters at init): equal bits."""
    base = WanDiT(BASE, rngs=nnx.Rngs(0))
    cfg = BASE.replace(**MECHANISMS[name])
    adapted = WanDiT(cfg, rngs=nnx.Rngs(1))
    report = load_base(adapted, base)
    assert report["copied"] and (report["kept_init"] or name == "masked_input" or name == "motion_channels")
    x, kw = inputs(cfg)
    base_x = dict(x, latents=x["latents"][..., : BASE.in_channels])
    expected = np.asarray(forward(base, base_x, {}))
    assert np.abs(expected).max() > 0.1
    got = np.asarray(forward(adapted, x, kw))
    assert np.array_equal(got, expected), f"{name}: max |diff| {np.abs(got - expected).max():.3g}"
    # and the mechanism is live: once its own parameters (those the base lacks, and the new input rows of a
    # widened patch embedding) move, the output moves, and another value of each conditioning input it
    # reads (reference, audio, face mask, motion, mask channels) gives another output
    perturb_mechanism(adapted, report, BASE.in_channels)
    moved = np.asarray(forward(adapted, x, kw))
    assert np.abs(moved - expected).max() > 1e-3
    reads = list(kw) + (["mask channels"] if cfg.in_channels > BASE.in_channels else [])
    assert reads, name
    rng = np.random.default_rng(7)
    for key in reads:
        other_x, other_kw = dict(x), dict(kw)
        if key == "mask channels":
            lat = x["latents"].copy()
            lat[..., BASE.in_channels:] = rng.standard_normal(lat[..., BASE.in_channels:].shape)
            other_x["latents"] = lat
        elif key == "face_mask":
            other_kw[key] = 1.0 - kw[key]
        else:
            other_kw[key] = rng.standard_normal(kw[key].shape).astype(np.float32)
        other = np.asarray(forward(adapted, other_x, other_kw))
        assert np.abs(other - moved).max() > 1e-4 * np.abs(moved).max(), f"{name}: the output ignores {key}"


def perturb_mechanism(model, report, base_channels):
    """Move only the mechanism's parameters off their init: those `load_base` kept at init, and the rows
    past `base_channels` of a widened input kernel."""
    state = nnx.state(model, nnx.Param)
    flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}

    def bump(a):
        return a + 0.05 * jnp.sign(jnp.sin(jnp.arange(a.size).reshape(a.shape))) if a.ndim else a + 0.5

    for path in report["kept_init"]:
        flat[path].set_value(bump(flat[path].get_value()))
    for path in report["widened"]:
        a = flat[path].get_value()
        flat[path].set_value(a.at[..., base_channels:, :].set(bump(a[..., base_channels:, :])))
    nnx.update(model, state)


def test_gate_one_is_joint_softmax_attention():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 5, 3, 8)).astype(np.float32) for _ in range(3))
    ke, ve = (rng.standard_normal((2, 4, 3, 8)).astype(np.float32) for _ in range(2))
    joint = dot_product_attention(q, np.concatenate([k, ke], 1), np.concatenate([v, ve], 1))
    np.testing.assert_allclose(gated_joint_attention(q, k, v, ke, ve, jnp.float32(1.0)), joint, rtol=1e-5, atol=1e-6)
    assert np.array_equal(gated_joint_attention(q, k, v, ke, ve, jnp.float32(0.0)), dot_product_attention(q, k, v))


def test_identity_tokens_coordinates_and_absence_from_output():
    cfg = BASE.replace(identity_tokens=True, extra_gate_init=1.0)
    model = WanDiT(cfg, rngs=nnx.Rngs(0))
    x, kw = inputs(cfg)
    gh, gw = H // 2, W // 2
    _, coords = model.extra_streams(jnp.asarray(kw["reference"]), None, None, (F, gh, gw))
    np.testing.assert_array_equal(coords, frame_coords(gh, gw, t=-1))
    assert (coords[:, 0] == -1).all() and (coords[:, 1:] == grid_coords(1, gh, gw)[:, 1:]).all()
    shifted = WanDiT(cfg.replace(identity_offset="shift"), rngs=nnx.Rngs(0))
    _, coords_s = shifted.extra_streams(jnp.asarray(kw["reference"]), None, None, (F, gh, gw))
    np.testing.assert_array_equal(coords_s[:, 1:], coords[:, 1:] + [gh, gw])
    offsets = np.arange(2 * gh * gw).reshape(gh * gw, 2)
    _, coords_p = model.extra_streams(jnp.asarray(kw["reference"]), None, offsets, (F, gh, gw))
    np.testing.assert_array_equal(coords_p[:, 1:], coords[:, 1:] + offsets)

    out = np.asarray(forward(model, x, kw))
    assert out.shape == x["latents"].shape[:-1] + (cfg.out_channels,)  # identity tokens removed
    # they take part: another reference changes the video; another offset mode too
    other = np.asarray(forward(model, x, dict(kw, reference=kw["reference"][::-1])))
    assert np.abs(other - out).max() > 1e-4
    assert np.abs(np.asarray(forward(model, x, dict(kw, identity_offsets=offsets))) - out).max() > 1e-4


@pytest.mark.parametrize("neighbors", [0, 1])
def test_audio_cross_attention_is_local_per_latent_frame(neighbors):
    frames, p, d = 4, 3, 16
    attn = AudioCrossAttention(d, 2, 8, eps=1e-6, rngs=nnx.Rngs(0))
    attn.to_out.kernel.set_value(jax.random.normal(jax.random.key(1), (d, d)))  # leave the zero init
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, frames * p, d)).astype(np.float32)
    audio = rng.standard_normal((1, frames, 5, 8)).astype(np.float32)
    base = np.asarray(attn(x, audio, frames=frames, neighbors=neighbors)).reshape(frames, p, d)
    changed = audio.copy()
    changed[:, 1] += 1.0  # perturb the audio of latent frame 1 only
    out = np.asarray(attn(x, changed, frames=frames, neighbors=neighbors)).reshape(frames, p, d)
    diff = np.abs(out - base).max(axis=(1, 2))
    affected = {0, 1, 2} if neighbors else {1}
    for f in range(frames):
        assert (diff[f] > 1e-4) == (f in affected), (f, diff)
    # the face mask zeroes the output outside the face
    mask = np.zeros((1, frames * p), np.float32)
    mask[0, :p] = 1.0
    masked = np.asarray(attn(x, audio, frames=frames, neighbors=neighbors, face_mask=mask))
    assert np.abs(masked[0, p:]).max() == 0 and np.abs(masked[0, :p]).max() > 0


def test_decoupled_audio_is_local_per_latent_frame():
    attn = Attention(64, 4, eps=1e-6, audio_dim=16, rngs=nnx.Rngs(0))
    v = attn.audio_v_proj.kernel
    assert np.abs(np.asarray(v.get_value())).max() == 0  # zero-init
    v.set_value(jax.random.normal(jax.random.key(2), v.get_value().shape))
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 4 * 3, 4, 16)).astype(np.float32))
    tokens = rng.standard_normal((1, 4, 8, 16)).astype(np.float32)
    a = dict(tokens=tokens, frames=4, neighbors=0, scale=1.0, face_mask=None)
    base = np.asarray(attn._decoupled_audio(q, a)).reshape(4, 3, -1)
    changed = tokens.copy()
    changed[:, 2] += 1.0  # perturb the audio of latent frame 2 only
    out = np.asarray(attn._decoupled_audio(q, dict(a, tokens=changed))).reshape(4, 3, -1)
    diff = np.abs(out - base).max(axis=(1, 2))
    assert diff[2] > 1e-4 and diff[[0, 1, 3]].max() == 0
    half = np.asarray(attn._decoupled_audio(q, dict(a, scale=0.5))).reshape(4, 3, -1)
    np.testing.assert_allclose(half, 0.5 * base, rtol=1e-6)


def test_reference_cache_equals_recomputing():
    cfg = BASE.replace(reference_net=True, extra_gate_init=1.0)
    model = WanDiT(cfg, rngs=nnx.Rngs(0))
    x, kw = inputs(cfg)
    direct = np.asarray(forward(model, x, kw))
    cache = nnx.jit(lambda m, r: m.encode_reference(r))(model, kw["reference"])
    assert cache.features.shape == (cfg.num_layers, B, (H // 2) * (W // 2), cfg.dim)
    cached = np.asarray(nnx.jit(lambda m, a, c: m(a["latents"], a["timesteps"], a["context"], reference_cache=c))(
        model, x, cache))
    np.testing.assert_allclose(cached, direct, rtol=1e-6, atol=1e-6)
    # one cache serves both CFG branches: the features do not depend on the prompt
    null = np.asarray(nnx.jit(lambda m, a, c: m(a["latents"], a["timesteps"], 0 * a["context"], reference_cache=c))(
        model, x, cache))
    assert np.abs(null - cached).max() > 1e-4  # the prompt still matters to the denoiser


def test_missing_or_unexpected_conditioning_inputs_are_named():
    cfg = style_cfg("hyavatar-style")
    model = WanDiT(cfg, rngs=nnx.Rngs(0))
    x, kw = inputs(cfg)
    call = lambda **k: model(x["latents"], x["timesteps"], x["context"], **k)  # noqa: E731
    with pytest.raises(ValueError, match="needs `reference`"):
        call(**{k: v for k, v in kw.items() if k != "reference"})
    with pytest.raises(ValueError, match="needs `face_mask`"):
        call(**{k: v for k, v in kw.items() if k != "face_mask"})
    with pytest.raises(ValueError, match="`motion` given but no configured mechanism"):
        call(**kw, motion=np.zeros((B, 1, H, W, 16), np.float32))
    with pytest.raises(ValueError, match="audio covers"):
        call(**dict(kw, audio=kw["audio"][:, :1]))
    with pytest.raises(ValueError, match="reference has shape"):
        call(**dict(kw, reference=kw["reference"][:, :, :2]))


@pytest.mark.parametrize("name", ["identity_tokens", "reference_net", "audio_cross_attn", "audio_every_2_group_face", "audio_decoupled",
                                  "motion_prefix", "masked_input"])
def test_zero_init_bitwise_on_8_devices(name, devices):
    """The same rule with both models FSDP+TP-sharded over 8 devices."""
    config = load_config("configs/wan.py:tiny,mesh=fsdp_tp,dtype=float32")
    mesh, rules = make_mesh(dict(config.mesh)), normalize_rules(config.rules)
    cfg = BASE.replace(**MECHANISMS[name])
    base = create_sharded(lambda: WanDiT(BASE, rngs=nnx.Rngs(0)), mesh, rules)
    adapted = create_sharded(lambda: WanDiT(cfg, rngs=nnx.Rngs(1)), mesh, rules)
    with jax.set_mesh(mesh):
        load_base(adapted, base)
    x, kw = inputs(cfg)
    with jax.set_mesh(mesh), use_rules(rules):
        put = lambda a: jax.device_put(a, batch_sharding(mesh, a.shape, rules))  # noqa: E731
        expected = np.asarray(forward(base, {**x, "latents": put(x["latents"][..., : BASE.in_channels])}, {}))
        got = np.asarray(forward(adapted, {**x, "latents": put(x["latents"])}, kw))
    assert np.abs(expected).max() > 0.1
    assert np.array_equal(got, expected), f"{name}: max |diff| {np.abs(got - expected).max():.3g}"
