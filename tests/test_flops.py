"""The analytic FLOP count (hallojax.flops) against XLA's cost analysis of the compiled program.

XLA counts a loop body once, so the models here unroll their layer scan (`scan_unroll`); its count also
holds the elementwise work (norms, softmax, activations) that model FLOPs leave out: within 10 %.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hallojax.models.wan import DiTConfig, WanDiT
from hallojax.flops import device_spec, forward_flops, mfu, train_flops
from hallojax.flow import velocity_loss
from hallojax.sharding import DEFAULT_RULES, make_mesh, normalize_rules, shard_module, use_rules

# big enough that matmuls dominate as in real models (D 256, 320 video tokens), small enough for CPU
MEDIUM = DiTConfig(num_layers=2, num_heads=4, head_dim=64, ffn_dim=1024, text_dim=64, freq_dim=64,
                   dtype="float32", scan_unroll=2)
AUDIO = dict(audio_in_layers=2, audio_in_dim=32, audio_hidden=64, audio_tokens=4, audio_dim=64)
CONFIGS = {
    "t2v": {},
    "i2v": dict(in_channels=36, image_dim=64, added_kv_proj_dim=256),
    "hallo3": dict(reference_net=True, motion_frames=1, motion_mode="channels", audio="cross_attn",
                   audio_align="conv", **AUDIO),
    "hyavatar": dict(identity_tokens=True, identity_additive=True, audio="cross_attn", audio_every=2,
                     audio_align="group", audio_face_mask=True, audio_neighbors=1, **AUDIO),
    "echomimic": dict(in_channels=36, audio="decoupled", audio_align="group", audio_window=0, **AUDIO),
    "letstalk_prefix": dict(symbiotic=True, motion_frames=1, motion_mode="prefix"),
}
B, F, H, W, M, M_IMG = 2, 5, 16, 16, 16, 8


def _inputs(cfg, B=B):
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    args = (r(B, F, H, W, cfg.in_channels), np.linspace(100.0, 900.0, B, dtype=np.float32), r(B, M, cfg.text_dim))
    kw = {}
    if cfg.image_dim:
        kw["image_context"] = r(B, M_IMG, cfg.image_dim)
    if cfg.identity_tokens or cfg.identity_additive or cfg.symbiotic or cfg.reference_net:
        kw["reference"] = r(B, 1, H, W, cfg.out_channels)
    if cfg.audio != "none":
        kw["audio"] = r(B, 1 + 4 * (F - 1), cfg.audio_in_layers, cfg.audio_in_dim)
    if cfg.audio_face_mask:
        kw["face_mask"] = np.ones((B, F, H // 2, W // 2), np.float32)
    if cfg.motion_frames:
        kw["motion"] = r(B, cfg.motion_frames, H, W, cfg.out_channels)
    return args, kw


def _analytic(cfg, B=B):
    return forward_flops(cfg, batch=B, frames=F, height=H, width=W, text_len=M,
                         image_len=M_IMG if cfg.image_dim else 0)["total"]


def _xla_flops(cfg, train: bool, mesh=None, B=B) -> float:
    model = WanDiT(cfg, rngs=nnx.Rngs(0))
    (x, t, c), kw = _inputs(cfg, B)
    if train:
        def f(m, x, c, kw):
            return nnx.value_and_grad(lambda m: velocity_loss(m, x, c, t / 1000.0, jnp.ones_like(x), **kw))(m)
    else:
        def f(m, x, c, kw):
            return m(x, t, c, **kw)
    if mesh is None:
        return nnx.jit(f).lower(model, x, c, kw).compile().cost_analysis()["flops"]
    rules = normalize_rules(DEFAULT_RULES)
    with jax.set_mesh(mesh), use_rules(rules):
        shard_module(model, mesh, rules)
        return nnx.jit(f).lower(model, x, c, kw).compile().cost_analysis()["flops"] * mesh.size


# symbiotic fusion's extra stream is as long as the video: in an unrolled forward pass XLA drops its unused
# last-layer half, which a scanned model and every training step compute; it is checked on the train step
@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "letstalk_prefix"])
def test_forward_flops_match_xla_cost_analysis(name):
    cfg = MEDIUM.replace(**CONFIGS[name])
    analytic, xla = _analytic(cfg), _xla_flops(cfg, train=False)
    assert abs(xla / analytic - 1) < 0.10, f"{name}: analytic {analytic:.4g} vs XLA {xla:.4g}"


@pytest.mark.parametrize("name", ["t2v", "hyavatar", "letstalk_prefix"])
def test_train_step_flops_are_three_forwards(name):
    # audio adapters every k-th layer sit behind a lax.cond, whose branches XLA counts in every layer
    # although only one runs: compare with an adapter in every layer, and check the 1/k scaling apart
    cfg = MEDIUM.replace(**{**CONFIGS[name], "audio_every": 1})
    if cfg.audio != "none":
        every = [forward_flops(cfg.replace(audio_every=k), batch=B, frames=F, height=H, width=W)["audio_attention"]
                 for k in (1, 2)]
        assert every[0] == 2 * every[1]
    analytic = 3 * _analytic(cfg)
    assert train_flops(cfg, batch=B, frames=F, height=H, width=W, text_len=M) == analytic
    xla = _xla_flops(cfg, train=True)
    assert abs(xla / analytic - 1) < 0.10, f"{name}: analytic {analytic:.4g} vs XLA {xla:.4g}"


def test_flops_per_device_on_8_devices_add_up(devices):
    """FSDP over 8 devices splits the work: per-device cost × 8 is still the analytic count (no replicated
    matmuls); the same with FSDP × TP."""
    analytic = _analytic(MEDIUM, B=8)
    for shape in (dict(fsdp=8), dict(fsdp=4, tensor=2)):
        xla = _xla_flops(MEDIUM, train=False, mesh=make_mesh(shape), B=8)
        assert abs(xla / analytic - 1) < 0.10, f"{shape}: analytic {analytic:.4g} vs XLA {xla:.4g} (x8 devices)"


def test_layers_scale_the_count_and_the_wan_1_3b_figure():
    one, two = (forward_flops(MEDIUM.replace(num_layers=n), batch=1, frames=F, height=H, width=W)["blocks"]
                for n in (1, 2))
    assert two == 2 * one
    # Wan2.1-1.3B at 480x832, 81 frames: 32,760 tokens; the 30 blocks dominate: 2 x 1.42 B params x tokens
    # for the linear layers plus attention 4 L^2 D per layer
    cfg = DiTConfig()
    f = forward_flops(cfg, batch=1, frames=21, height=60, width=104)
    tokens = 21 * 30 * 52
    linear = 2 * tokens * cfg.num_layers * (6 * cfg.dim**2 + 2 * cfg.dim * cfg.ffn_dim)
    attn = cfg.num_layers * 4 * tokens * (tokens + 512) * cfg.dim
    assert abs(f["blocks"] / (linear + attn) - 1) < 0.01
    assert abs(f["total"] / f["blocks"] - 1) < 0.01


def test_device_peaks_and_mfu():
    assert device_spec("TPU v5") == (459.0, 95.74)
    assert device_spec("TPU v5 lite")[0] == 197.0 and device_spec("TPU v6 lite")[0] == 918.0
    assert device_spec("NVIDIA H100 80GB HBM3")[0] == 989.0 and device_spec("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert device_spec("cpu") is None and mfu(1e12, 1.0, 1, "cpu") is None
    assert mfu(989e12 * 4 * 0.5, 1.0, 4, "NVIDIA H200") == pytest.approx(0.5)
