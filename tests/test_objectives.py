"""The VP training objectives (hallojax.diffusion) against independent computations, and the trainer with
each objective on 1 and 8 devices.

- v (Hallo3): x_t and v equal diffusers' `CogVideoXDPMScheduler.add_noise` / `get_velocity`; Hallo3's loss
  (1/(1 − ᾱ))·|x̂0 − x0|² with x̂0 = √ᾱ·x_t − √(1 − ᾱ)·v̂, computed in float64 numpy, equals our |v̂ − v|².
- ddpm (LetsTalk): the VB terms per element against float64 numpy closed forms fed by diffusers'
  `DDPMScheduler` (the model's and the true posterior mean from its `step`, the posterior and learned-range
  log variances from `_get_variance`): KL of the two Gaussians for t > 0, the discretised decoder NLL at t = 0.
  Compared in float64 (our terms traced with x64 and float64 tables, to 1e-9), and our float32 terms (the
  trainer's) with that float64 reference per sample to 1e-5 relative (measured <= 7e-7: guided-diffusion's
  float32 formulas lose ~1e-4 in the decoder NLL and the variance gradient; see `diffusion.ddpm_terms`).
  The stop-gradient: the ε half's gradient is the MSE's alone.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hallojax import diffusion
from hallojax.config import load_config
from hallojax.data import example_batch
from hallojax.models.wan import DiTConfig
from hallojax.train import make_train_step
from test_train_conditioning import step_on_1_and_8_devices

SHAPE = (6, 2, 3, 4, 5)  # [B, F, H, W, C]
_rng = np.random.default_rng(0)
X0 = _rng.uniform(-1.2, 1.2, SHAPE).astype(np.float32)  # beyond ±0.999 too: the decoder's open outer bins
EPS = _rng.standard_normal(SHAPE).astype(np.float32)
T = np.array([0, 1, 2, 500, 998, 999], np.int32)


def _diffusers_cogvideox(shift):
    from diffusers import CogVideoXDPMScheduler

    return CogVideoXDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                 rescale_betas_zero_snr=True, snr_shift_scale=shift)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_v_objective_is_hallo3s_weighted_x0_loss(shift):
    ref = _diffusers_cogvideox(shift)
    tables = diffusion.training_tables("cogvideox", shift)
    x0, eps, t = torch.from_numpy(X0), torch.from_numpy(EPS), torch.from_numpy(T.astype(np.int64))
    x_t = np.asarray(diffusion.noised(tables, X0, EPS, jnp.asarray(T)))
    np.testing.assert_allclose(x_t, ref.add_noise(x0, eps, t).numpy(), rtol=1e-6, atol=1e-6)
    v = np.asarray(diffusion.v_target(tables, X0, EPS, jnp.asarray(T)))
    np.testing.assert_allclose(v, ref.get_velocity(x0, eps, t).numpy(), rtol=1e-6, atol=1e-6)
    pred = (v + 0.3 * _rng.standard_normal(SHAPE)).astype(np.float32)
    # Hallo3 (SAT VideoDiffusionLoss with VideoScaling): weight 1/(1 − ᾱ) on the x̂0 error, float64
    ab = ref.alphas_cumprod.numpy()[T].reshape(-1, 1, 1, 1, 1)
    xt64 = np.sqrt(ab) * X0.astype(np.float64) + np.sqrt(1 - ab) * EPS
    x0_hat = np.sqrt(ab) * xt64 - np.sqrt(1 - ab) * pred
    hallo3 = (((x0_hat - X0) ** 2) / (1 - ab)).reshape(len(T), -1).mean(axis=1).mean()
    ours = float(diffusion.v_loss(tables, pred, X0, EPS, jnp.asarray(T)))
    np.testing.assert_allclose(ours, hallo3, rtol=1e-5)
    assert float(diffusion.v_loss(tables, v, X0, EPS, jnp.asarray(T))) < 1e-10  # exact at the target


def _kl(m1, lv1, m2, lv2):
    return 0.5 * (lv2 - lv1 + (np.exp(lv1) + (m1 - m2) ** 2) / np.exp(lv2) - 1)


def _decoder_nll(x, mean, log_scale):
    """The discretised Gaussian decoder (guided-diffusion: tanh approximation of Φ, bins of 2/255), float64."""
    def cdf(z):
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    inv = np.exp(-log_scale)
    hi, lo = cdf(inv * (x - mean + 1 / 255)), cdf(inv * (x - mean - 1 / 255))
    logp = np.where(x < -0.999, np.log(np.maximum(hi, 1e-12)),
                    np.where(x > 0.999, np.log(np.maximum(1 - lo, 1e-12)), np.log(np.maximum(hi - lo, 1e-12))))
    return -logp


def test_ddpm_vb_terms_against_diffusers_and_closed_forms(monkeypatch):
    from diffusers import DDPMScheduler
    from diffusers.schedulers import scheduling_ddpm

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: torch.zeros(shape, dtype=torch.float64))
    ref = DDPMScheduler(variance_type="learned_range", clip_sample=False)
    ref.alphas_cumprod = torch.from_numpy(diffusion.alphas_cumprod("ddpm"))
    tables = diffusion.training_tables("ddpm", dtype=np.float64)
    eps_hat = EPS + 0.2 * _rng.standard_normal(SHAPE)
    y = np.tanh(_rng.standard_normal(SHAPE))
    out = np.concatenate([eps_hat, y], axis=-1)
    x0, eps = X0.astype(np.float64), EPS.astype(np.float64)
    with jax.enable_x64(True):
        terms = {k: np.asarray(v) for k, v in diffusion.ddpm_terms(tables, out, x0, eps, jnp.asarray(T)).items()}
        x_t = np.asarray(diffusion.noised(tables, x0, eps, jnp.asarray(T)))
        loss = float(diffusion.ddpm_loss(tables, out, x0, eps, jnp.asarray(T)))
        gen = np.ones(SHAPE[:2])
        gen[0, 0] = 0  # frame 0 of sample 0 known
        masked = float(diffusion.ddpm_loss(tables, out, x0, eps, jnp.asarray(T), gen))
    assert terms["vb"].dtype == np.float64
    f32 = diffusion.ddpm_terms(diffusion.training_tables("ddpm"), out.astype(np.float32), X0, EPS, jnp.asarray(T))
    for i in range(len(T)):
        assert np.abs(np.asarray(f32["vb"][i]) - terms["vb"][i]).max() <= 1e-5 * np.abs(terms["vb"][i]).max()
    np.testing.assert_allclose(terms["mse"], (out[..., :5] - EPS) ** 2, rtol=1e-12)
    ch = lambda a: torch.from_numpy(np.moveaxis(np.array(a, np.float64), -1, 1).copy())  # noqa: E731
    back = lambda a: np.moveaxis(a.numpy(), 1, -1)  # noqa: E731
    var0 = ref._get_variance(1, variance_type="fixed_small").item()  # β̃_1: guided-diffusion's clip at t = 0
    for b, t in enumerate(T.tolist()):
        sl = slice(b, b + 1)
        model_mean = back(ref.step(ch(out[sl]), t, ch(x_t[sl]), return_dict=False)[0])
        true_mean = back(ref.step(ch(np.concatenate([EPS[sl], y[sl]], -1)), t, ch(x_t[sl]), return_dict=False)[0])
        true_lv = np.log(ref._get_variance(t, variance_type="fixed_small").item() if t else var0)
        frac = (y[sl] + 1) / 2
        beta = 1 - ref.alphas_cumprod[t].item() / (ref.alphas_cumprod[t - 1].item() if t else 1.0)
        model_lv = frac * np.log(beta) + (1 - frac) * true_lv
        if t:  # diffusers' learned-range variance (its t = 0 row is unclipped; guided-diffusion's is clipped)
            np.testing.assert_allclose(model_lv, back(ref._get_variance(t, ch(y[sl]), "learned_range")), rtol=1e-10)
            want = _kl(true_mean, true_lv, model_mean, model_lv) / math.log(2)
        else:
            want = _decoder_nll(X0[sl].astype(np.float64), model_mean, 0.5 * model_lv) / math.log(2)
        got = np.asarray(terms["vb"][sl])
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 1e-9, (t, err)
    # the loss: per sample, the mean of MSE + VB over its elements; then the mean over samples
    per_sample = np.asarray(terms["mse"] + terms["vb"]).reshape(len(T), -1).mean(1)
    np.testing.assert_allclose(loss, per_sample.mean(), rtol=1e-12)
    # the masked mean over generated frames, well defined per sample
    per = np.asarray(terms["mse"] + terms["vb"]).reshape(len(T), SHAPE[1], -1)
    np.testing.assert_allclose(masked, np.mean([per[0, 1:].mean()] + [per[i].mean() for i in range(1, 6)]),
                               rtol=1e-12)


def test_ddpm_vb_trains_only_the_variance():
    tables = diffusion.training_tables("ddpm")
    out = np.concatenate([EPS + 0.2 * _rng.standard_normal(SHAPE), np.tanh(_rng.standard_normal(SHAPE))],
                         -1).astype(np.float32)
    t = jnp.asarray(T)
    g_all = jax.grad(lambda o: diffusion.ddpm_loss(tables, o, X0, EPS, t))(out)
    g_mse = jax.grad(lambda o: jnp.mean(jnp.square(o[..., :5] - EPS)))(out)
    np.testing.assert_allclose(np.asarray(g_all[..., :5]), np.asarray(g_mse[..., :5]), rtol=1e-6, atol=1e-12)
    assert np.abs(np.asarray(g_all[..., 5:])).max() > 0  # the bound reaches the variance half
    with pytest.raises(ValueError, match="channels"):
        diffusion.ddpm_terms(tables, out[..., :7], X0, EPS, t)


# --- the trainer ---------------------------------------------------------------------------------
def _setup(objective):
    config = load_config(f"configs/wan.py:tiny,dtype=float32,objective={objective}")
    config.train.learning_rate, config.train.eps = 1.0, 1.0
    cfg = DiTConfig.from_dict(config.model)
    return config, cfg, example_batch(cfg, 4, 3, 4, 4, text_len=5)


@pytest.mark.parametrize("objective", ["v", "ddpm"])
def test_objective_train_steps_on_1_and_8_devices(objective, devices):
    """A tiny DiT's real train step with each VP objective on one device and FSDP×TP over 8: the same loss,
    gradient norm and update (Adam eps = 1, lr = 1: the update compares the gradients)."""
    config, cfg, batch = _setup(objective)
    assert cfg.prediction == {"v": "v", "ddpm": "epsilon"}[objective]
    assert config.sample.sampler == {"v": "cogvideox-dpm", "ddpm": "ddpm"}[objective]
    (l1, g1, d1), (l8, g8, d8) = step_on_1_and_8_devices(config, cfg, batch, devices)
    # the learned variance doubles the output projection
    assert d1["proj_out"]["kernel"].shape[-1] == cfg.output_channels * cfg.patch_volume
    assert cfg.output_channels == (2 if objective == "ddpm" else 1) * cfg.out_channels
    assert np.isfinite(l1) and g1 > 0
    np.testing.assert_allclose([l8, g8], [l1, g1], rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(d8), jax.tree.leaves(d1)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert np.abs(d1["proj_out"]["kernel"]).max() > 0


def test_objective_and_model_must_agree():
    config, cfg, _ = _setup("v")
    config.train.objective = "ddpm"
    with pytest.raises(ValueError, match="prediction='epsilon'"):
        make_train_step(None, cfg, config.train, 0)
    config.train.objective = "flow"
    with pytest.raises(ValueError, match="objective='flow'"):
        make_train_step(None, cfg, config.train, 0)
    config.train.objective = "v"
    config.train.loss_weighting = "cosmap"
    with pytest.raises(ValueError, match="loss_weighting"):
        make_train_step(None, cfg, config.train, 0)
    config.train.objective = "score"
    with pytest.raises(ValueError, match="expected one of"):
        make_train_step(None, cfg, config.train, 0)
    with pytest.raises(ValueError, match="learned variance needs"):
        DiTConfig(prediction="flow", learned_variance=True)
