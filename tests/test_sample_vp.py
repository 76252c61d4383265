"""VP samplers against diffusers' schedulers: CogVideoXDDIM / CogVideoXDPM (v-prediction, zero-terminal SNR,
trailing spacing, SNR shift), DDPMScheduler(variance_type="learned_range") on guided-diffusion's respaced
timesteps and on diffusers' own spacing, and DDIMScheduler (ε). A deterministic stand-in model written twice
(torch, JAX), the SAME per-step noise fed to both sides (`step_noise`, patched into diffusers' `randn_tensor`):
final latents within 1e-5 relative (fp32). Also the timesteps, ᾱ tables, posterior and learned-range
variances as arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hallojax.diffusion import alphas_cumprod
from hallojax.sample.schedules import make_schedule, respace, vp_schedule
from hallojax.sample.solvers import get_sampler, sample, schedule_arrays, step_noise

SHAPE = (2, 3, 4, 5, 6)  # [B, F, H, W, C]
_rng = np.random.default_rng(0)
A = _rng.uniform(0.5, 1.5, SHAPE).astype(np.float32)
B = _rng.normal(size=SHAPE).astype(np.float32)
A2 = _rng.uniform(0.5, 1.5, SHAPE).astype(np.float32)
X0 = _rng.standard_normal(SHAPE).astype(np.float32)
KEY = jax.random.key(7)


def to_torch(a):  # [B, F, H, W, C] -> diffusers' channels-first [B, C, F, H, W]
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, 1)))


def to_ours(t):
    return np.moveaxis(t.numpy(), 1, -1)


def stand_in_jax(learned):
    def f(x, t, i):
        out = jnp.tanh(x * A + (t / 1000) * B) * 1.5 - 0.3 * x
        if learned:  # the variance half in [-1, 1]
            out = jnp.concatenate([out, jnp.tanh(x * A2 - (t / 1000) * B)], axis=-1)
        return out
    return f


def stand_in_torch(x, t, learned):
    a, b, a2 = to_torch(A), to_torch(B), to_torch(A2)
    out = torch.tanh(x * a + (float(t) / 1000) * b) * 1.5 - 0.3 * x
    if learned:
        out = torch.cat([out, torch.tanh(x * a2 - (float(t) / 1000) * b)], dim=1)
    return out


class _FeedNoise:
    """diffusers draws its step noise with `randn_tensor`: hand it ours for the current step."""

    def __init__(self, monkeypatch, *modules):
        self.step = 0
        for m in modules:
            monkeypatch.setattr(m, "randn_tensor", self)

    def __call__(self, shape, **kw):
        return to_torch(_noises()[self.step])


_NOISE = []


def _noises():
    """The noise of steps 0..249, computed once (one program, not one dispatch per torch step)."""
    if not _NOISE:
        _NOISE.append(np.asarray(jax.jit(jax.vmap(lambda i: step_noise(KEY, i, SHAPE)))(jnp.arange(250))))
    return _NOISE[0]


_JITTED = {}


def _ours(name, schedule, learned=False):
    sampler = get_sampler(name)
    key = (name, learned, schedule.prediction)
    if key not in _JITTED:  # one program per sampler; the schedule arrays are arguments
        _JITTED[key] = jax.jit(lambda x, arrays, s=sampler, p=schedule.prediction: sample(
            stand_in_jax(learned), x, arrays, s, p, key=KEY))
    return np.asarray(_JITTED[key](X0, schedule_arrays(sampler, schedule)))


def _cogvideox(cls_name, shift):
    import diffusers

    return getattr(diffusers, cls_name)(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                        rescale_betas_zero_snr=True, set_alpha_to_one=True, clip_sample=False,
                                        timestep_spacing="trailing", snr_shift_scale=shift)


def _rel(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# --- arrays --------------------------------------------------------------------------------------
def test_vp_tables_and_timesteps_equal_diffusers():
    from diffusers import DDIMScheduler, DDPMScheduler

    for shift in (1.0, 3.0):
        ref = _cogvideox("CogVideoXDPMScheduler", shift)
        np.testing.assert_allclose(alphas_cumprod("cogvideox", shift), ref.alphas_cumprod.numpy(), rtol=1e-12,
                                   atol=1e-15)
        assert ref.alphas_cumprod[-1] == 0 and alphas_cumprod("cogvideox", shift)[-1] == 0  # zero terminal SNR
        for n in (50, 30, 7):
            ref.set_timesteps(n)
            np.testing.assert_array_equal(vp_schedule("cogvideox-dpm", n, shift).timesteps, ref.timesteps.numpy())
    assert vp_schedule("cogvideox-dpm", 50).timesteps[[0, 1, -1]].tolist() == [999, 979, 19]
    # diffusers keeps the linear betas' ᾱ in float32; guided-diffusion (and we) in float64
    np.testing.assert_allclose(alphas_cumprod("ddpm"), DDPMScheduler().alphas_cumprod.numpy(), rtol=2e-5)
    for n in (250, 50, 7):
        gd = respace(n, "respace")
        # guided-diffusion's space_timesteps(1000, [n]) = round(k·999/(n − 1)) = diffusers' "linspace" spacing
        lin = DDPMScheduler(timestep_spacing="linspace")
        lin.set_timesteps(n)
        np.testing.assert_array_equal(gd, lin.timesteps.numpy())
        lead = DDIMScheduler()
        lead.set_timesteps(n)
        np.testing.assert_array_equal(respace(n, "leading"), lead.timesteps.numpy())
    assert respace(250, "respace")[[0, 1, -2, -1]].tolist() == [999, 995, 4, 0]
    assert respace(250, "leading")[[0, -1]].tolist() == [996, 0]  # diffusers' default: never visits 999


def test_posterior_and_learned_range_variance_equal_diffusers():
    """On guided-diffusion's respaced chain: the step's log posterior variance (fixed small) and the
    learned-range log variance for model values y, as diffusers' DDPMScheduler computes them per step."""
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(variance_type="learned_range", clip_sample=False)
    ref.alphas_cumprod = torch.from_numpy(alphas_cumprod("ddpm"))
    steps = respace(50, "respace")
    ref.set_timesteps(timesteps=steps.tolist())
    c = get_sampler("ddpm").coefficients(vp_schedule("ddpm", 50))
    y = np.linspace(-1, 1, 5)
    for i, t in enumerate(steps[:-1]):  # the last step (t = 0) adds no noise on either side
        var = ref._get_variance(int(t), variance_type="fixed_small").item()
        np.testing.assert_allclose(c["min_log"][i], np.log(var), rtol=1e-6)
        learned = ref._get_variance(int(t), predicted_variance=torch.from_numpy(y), variance_type="learned_range")
        frac = (y + 1) / 2
        np.testing.assert_allclose(frac * c["max_log"][i] + (1 - frac) * c["min_log"][i], learned.numpy(),
                                   rtol=1e-6)
    assert c["p_n"][-1] == 0 and np.all(c["p_n"][:-1] == 1)


# --- final latents -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cogvideox-ddim", "cogvideox-dpm"])
def test_cogvideox_samplers_match_diffusers(name, monkeypatch):
    from diffusers.schedulers import scheduling_dpm_cogvideox

    feed = _FeedNoise(monkeypatch, scheduling_dpm_cogvideox)
    worst = 0.0
    for shift in (1.0, 3.0):
        for steps in (50, 30, 7):
            ref = _cogvideox("CogVideoXDDIMScheduler" if name == "cogvideox-ddim" else "CogVideoXDPMScheduler", shift)
            ref.set_timesteps(steps)
            x, old = to_torch(X0), None
            for i, t in enumerate(ref.timesteps):  # the CogVideoX pipelines' loop
                feed.step = i
                out = stand_in_torch(x, t, False)
                if name == "cogvideox-ddim":
                    x = ref.step(out, t, x, return_dict=False)[0]
                else:
                    x, old = ref.step(out, old, t, ref.timesteps[i - 1] if i > 0 else None, x, return_dict=False)
            err = _rel(_ours(name, vp_schedule(name, steps, shift)), to_ours(x))
            worst = max(worst, err)
            assert err <= 1e-5, f"{name} steps={steps} shift={shift}: relative error {err:.3g}"
    print(f"{name}: worst relative error {worst:.2e}")


@pytest.mark.parametrize("spacing", ["respace", "leading"])
def test_ddpm_learned_range_matches_diffusers(spacing, monkeypatch):
    """LetsTalk's sampler: ancestral DDPM, ε + learned-range variance, on guided-diffusion's respaced timesteps
    (diffusers given them as custom timesteps) or on diffusers' default spacing (num_inference_steps)."""
    from diffusers import DDPMScheduler
    from diffusers.schedulers import scheduling_ddpm

    feed = _FeedNoise(monkeypatch, scheduling_ddpm)
    worst = 0.0
    for steps in ((250, 7) if spacing == "respace" else (50,)):  # 250: LetsTalk's default
        ref = DDPMScheduler(variance_type="learned_range", clip_sample=False, prediction_type="epsilon")
        ref.alphas_cumprod = torch.from_numpy(alphas_cumprod("ddpm"))  # float64, as guided-diffusion keeps it
        if spacing == "respace":
            ref.set_timesteps(timesteps=respace(steps, "respace").tolist())
        else:
            ref.set_timesteps(steps)
        x = to_torch(X0)
        for i, t in enumerate(ref.timesteps):
            feed.step = i
            x = ref.step(stand_in_torch(x, t, True), t, x, return_dict=False)[0]
        sched = vp_schedule("ddpm", steps, prediction="epsilon", spacing=spacing)
        err = _rel(_ours("ddpm", sched, learned=True), to_ours(x))
        worst = max(worst, err)
        assert err <= 1e-5, f"ddpm {spacing} steps={steps}: relative error {err:.3g}"
    print(f"ddpm ({spacing}): worst relative error {worst:.2e}")


def test_ddpm_fixed_small_matches_diffusers(monkeypatch):
    """A model without a learned variance: the posterior's (fixed small) variance."""
    from diffusers import DDPMScheduler
    from diffusers.schedulers import scheduling_ddpm

    feed = _FeedNoise(monkeypatch, scheduling_ddpm)
    ref = DDPMScheduler(variance_type="fixed_small", clip_sample=False)
    ref.alphas_cumprod = torch.from_numpy(alphas_cumprod("ddpm"))
    ref.set_timesteps(timesteps=respace(20, "respace").tolist())
    x = to_torch(X0)
    for i, t in enumerate(ref.timesteps):
        feed.step = i
        x = ref.step(stand_in_torch(x, t, False), t, x, return_dict=False)[0]
    err = _rel(_ours("ddpm", vp_schedule("ddpm", 20, prediction="epsilon")), to_ours(x))
    assert err <= 1e-5, err


def test_ddim_matches_diffusers():
    from diffusers import DDIMScheduler

    worst = 0.0
    for steps in (50, 7):
        ref = DDIMScheduler(clip_sample=False, prediction_type="epsilon")  # linear betas, leading, ᾱ_final = 1
        ref.alphas_cumprod = torch.from_numpy(alphas_cumprod("ddpm"))
        ref.set_timesteps(steps)
        x = to_torch(X0)
        for t in ref.timesteps:
            x = ref.step(stand_in_torch(x, t, False), t, x, eta=0.0, return_dict=False)[0]
        err = _rel(_ours("ddim", vp_schedule("ddim", steps, prediction="epsilon", spacing="leading")), to_ours(x))
        worst = max(worst, err)
        assert err <= 1e-5, f"ddim steps={steps}: relative error {err:.3g}"
    # a learned-variance model's variance half is ignored by DDIM
    sched = vp_schedule("ddim", 7, prediction="epsilon", spacing="leading")
    np.testing.assert_array_equal(_ours("ddim", sched, learned=True), _ours("ddim", sched))
    print(f"ddim: worst relative error {worst:.2e}")


def test_stochastic_samplers_depend_on_the_key_and_pairing_errors():
    sampler = get_sampler("cogvideox-dpm")
    arrays = schedule_arrays(sampler, vp_schedule("cogvideox-dpm", 5))
    run = jax.jit(lambda k: sample(stand_in_jax(False), X0, arrays, sampler, "v", key=k))
    a, b = np.asarray(run(jax.random.key(0))), np.asarray(run(jax.random.key(1)))
    assert np.abs(a - b).max() > 1e-3 and np.isfinite(a).all()
    with pytest.raises(ValueError, match="pass sample"):
        sample(stand_in_jax(False), X0, arrays, sampler, "v")
    with pytest.raises(ValueError, match="flow-matching sampler"):
        make_schedule("unipc", 5, 3.0, prediction="v")
    with pytest.raises(ValueError, match="VP model"):
        make_schedule("ddpm", 5, 1.0, prediction="flow")
    with pytest.raises(ValueError, match="no shift"):
        make_schedule("ddim", 5, 3.0, prediction="epsilon")
