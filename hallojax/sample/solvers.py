"""Samplers: Euler, UniPC (bh2, order 2), DPM-Solver++ 2M and the VP ones (CogVideoX DDIM / DPM, DDPM,
DDIM), each one jitted loop over all steps.

k-diffusion's shape: a sampler is a small object over a `Schedule` and a denoiser callable
`denoise(x, t, i) -> model output` (guidance is a wrapper around the model, not inside the sampler).
`sample` runs every step inside one program (`lax.scan` over the step index, the model call inside),
so a clip's whole denoising loop compiles once per shape and is reused for every clip of a video.

The multistep solvers are written as what they are: per step, a linear combination of the current
sample, the previous sample and the last few data predictions x̂0 = to_x0(model output). All scalar
algebra (log-SNR λ = log α − log σ, step sizes h, the UniPC B(h) and ρ solves, DPM-Solver's r) runs on
the host in float64 from the float32 schedule, giving per-step coefficient arrays; the device only does
`c0·x + c1·x_last + Σ ck·x̂0_k` in float32. This matches diffusers' `UniPCMultistepScheduler`
(predict_x0, bh2, solver_order 2, lower_order_final, no disabled corrector) and
`DPMSolverMultistepScheduler` (dpmsolver++, midpoint, solver_order 2, final σ 0: first order at the
first and last step) to float32 rounding: final latents within 1e-5 relative (tested against diffusers
with a deterministic stand-in model). Euler is `x + (σ_{i+1} − σ_i)·v` with diffusers' float32 `dt`,
bit for bit. The (α, σ, prediction) form takes VP / v-prediction schedules unchanged.

VP samplers (v or ε models on `vp_schedule`s): CogVideoX DDIM and the stochastic CogVideoX DPM-Solver++(2M)
(diffusers `CogVideoXDDIMScheduler` / `CogVideoXDPMScheduler`), DDPM ancestral sampling with the
learned-range (or fixed small) variance (`DDPMScheduler`, guided-diffusion's `p_sample`) and DDIM with η = 0
(`DDIMScheduler`). Each step is x ← p_x·x + p_0·x̂0_i + p_1·x̂0_{i−1} (+ noise), the coefficients from ᾱ and
the level ᾱ_to the step lands on, in float64 on the host. The stochastic ones draw their noise per step from
`step_noise(key, i, shape)`: pass `key` to `sample`. Models with a learned variance output 2C channels
[prediction, variance]; only DDPM reads the variance half.

Known frames (image-to-video, motion frames, continuation): `known=(latents, mask, noise)` puts the
known latent frames at the current noise level, α_i·known + σ_i·noise, before every model call (exactly
how the trainer shows them to the model: x_t of the clean frames), and pastes them clean at the end.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hallojax.sample.schedules import Schedule

Denoiser = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (x, t, step index) -> model output


def to_x0(out: jax.Array, x: jax.Array, alpha, sigma, prediction: str) -> jax.Array:
    """The data prediction x̂0 from a model output: flow (velocity ε − x0), v, or ε."""
    if prediction == "flow":
        return x - sigma * out
    if prediction == "v":
        return alpha * x - sigma * out
    if prediction == "epsilon":
        return (x - sigma * out) / alpha
    raise ValueError(f"prediction {prediction!r}: expected 'flow', 'v' or 'epsilon'")


def _lambdas(schedule: Schedule) -> np.ndarray:
    """log-SNR λ_i = log α_i − log σ_i in float64 (+inf at σ = 0)."""
    a, s = schedule.alphas.astype(np.float64), schedule.sigmas.astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.log(a) - np.log(s)


class Euler:
    """Flow-matching Euler: x_{i+1} = x_i + (σ_{i+1} − σ_i)·v (diffusers `FlowMatchEulerDiscreteScheduler`)."""

    name = "euler"

    def coefficients(self, schedule: Schedule) -> dict[str, np.ndarray]:
        if schedule.prediction != "flow":
            raise ValueError(f"the euler sampler integrates a velocity; this schedule predicts {schedule.prediction!r}")
        s = schedule.sigmas.astype(np.float32)
        return {"dt": (s[1:] - s[:-1]).astype(np.float32)}

    def init(self, x: jax.Array) -> dict:
        return {"x": x}

    def step(self, state: dict, out: jax.Array, c: dict, alpha, sigma, prediction: str, noise=None) -> dict:
        return {"x": state["x"] + c["dt"] * out}


class _LinearMultistep:
    """Solvers of the form: corrector x ← c_x·x + c_last·x_last + c_0·x̂0_i + c_1·x̂0_{i−1} + c_2·x̂0_{i−2},
    then predictor x_{i+1} = p_x·x + p_0·x̂0_i + p_1·x̂0_{i−1}; subclasses give the coefficients."""

    name = ""
    KEYS = ("c_x", "c_last", "c_0", "c_1", "c_2", "p_x", "p_0", "p_1")

    def _coefficients(self, c: dict, lam, a, s, n) -> None:
        """Fill the per-step coefficient arrays `c` (c_x starts at 1, the rest at 0)."""
        raise NotImplementedError

    def coefficients(self, schedule: Schedule) -> dict[str, np.ndarray]:
        n = schedule.steps
        c = {k: np.zeros(n) for k in self.KEYS}
        c["c_x"][:] = 1.0  # no corrector unless a subclass sets one
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            self._coefficients(c, _lambdas(schedule), schedule.alphas.astype(np.float64),
                               schedule.sigmas.astype(np.float64), n)
        bad = [k for k, v in c.items() if not np.all(np.isfinite(v))]
        if bad:
            raise ValueError(f"{self.name}: non-finite solver coefficients {bad} "
                             "(a repeated or zero σ before the end?)")
        return {k: v.astype(np.float32) for k, v in c.items()}

    def init(self, x: jax.Array) -> dict:
        zero = jnp.zeros_like(x)
        return {"x": x, "last": x, "m1": zero, "m2": zero}

    def step(self, state: dict, out: jax.Array, c: dict, alpha, sigma, prediction: str, noise=None) -> dict:
        x = state["x"]
        m0 = to_x0(out, x, alpha, sigma, prediction)  # from the uncorrected sample, as diffusers does
        x = c["c_x"] * x + c["c_last"] * state["last"] + c["c_0"] * m0 + c["c_1"] * state["m1"] + c["c_2"] * state["m2"]
        nxt = c["p_x"] * x + c["p_0"] * m0 + c["p_1"] * state["m1"]
        return {"x": nxt, "last": x, "m1": m0, "m2": state["m1"]}


class UniPC(_LinearMultistep):
    """UniPC multistep, B(h) = e^h − 1 ("bh2"), order 2 with the first and last steps at order 1; the
    corrector (UniC) of step i uses the order its predictor (UniP) ran at step i − 1."""

    name = "unipc"

    def _coefficients(self, c, lam, a, s, n):
        order = np.array([1 if i == 0 or i == n - 1 else 2 for i in range(n)])
        for i in range(n):
            # predictor: s0 = i -> t = i + 1
            h = lam[i + 1] - lam[i]
            hh = -h
            h_phi_1 = np.expm1(hh)
            b_h = np.expm1(hh)
            c["p_x"][i] = s[i + 1] / s[i]
            c["p_0"][i] = -a[i + 1] * h_phi_1
            if order[i] == 2:
                rk = (lam[i - 1] - lam[i]) / h
                k = a[i + 1] * b_h * 0.5 / rk  # ρ_p = 0.5 on D1 = (x̂0_{i−1} − x̂0_i) / r_k
                c["p_0"][i] += k
                c["p_1"][i] = -k
            # corrector at step i (i >= 1): s0 = i − 1 -> t = i, with the order used at step i − 1
            if i == 0:
                continue  # nothing to correct yet: x stays
            c["c_x"][i] = 0.0
            h = lam[i] - lam[i - 1]
            hh = -h
            h_phi_1 = np.expm1(hh)
            b_h = np.expm1(hh)
            c["c_last"][i] = s[i] / s[i - 1]
            c["c_1"][i] = -a[i] * h_phi_1
            if order[i - 1] == 1:
                rho_last, rho_t, rk = 0.0, 0.5, 1.0
            else:
                rk = (lam[i - 2] - lam[i - 1]) / h
                h_phi_k = h_phi_1 / hh - 1
                b1 = h_phi_k / b_h
                h_phi_k = h_phi_k / hh - 0.5
                b2 = h_phi_k * 2 / b_h
                rho_last, rho_t = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array([b1, b2]))
            # x_c = x_t_ − α B (ρ_last·(x̂0_{i−2} − x̂0_{i−1}) / r_k + ρ_t·(x̂0_i − x̂0_{i−1}))
            k = a[i] * b_h
            c["c_2"][i] = -k * rho_last / rk
            c["c_1"][i] += k * (rho_last / rk + rho_t)
            c["c_0"][i] = -k * rho_t


class DPMSolverPP(_LinearMultistep):
    """DPM-Solver++ 2M (midpoint): first order at the first step and at the last (σ = 0) step."""

    name = "dpm++"

    def _coefficients(self, c, lam, a, s, n):
        for i in range(n):
            h = lam[i + 1] - lam[i]
            big_a = a[i + 1] * (np.exp(-h) - 1.0)
            c["p_x"][i] = s[i + 1] / s[i]
            c["p_0"][i] = -big_a
            if 0 < i < n - 1:
                r0 = (lam[i] - lam[i - 1]) / h
                c["p_0"][i] -= 0.5 * big_a / r0
                c["p_1"][i] = 0.5 * big_a / r0


# --- VP samplers ---------------------------------------------------------------------------------
class _VPSampler:
    """x_{i+1} = p_x·x + p_0·x̂0_i + p_1·x̂0_{i−1} + p_n·z_i over a VP schedule (ᾱ, ᾱ_to per step)."""

    name = ""
    stochastic = False
    KEYS = ("p_x", "p_0", "p_1", "p_n")

    def _coefficients(self, c: dict, ab, ab_to, n) -> None:
        raise NotImplementedError

    def coefficients(self, schedule: Schedule) -> dict[str, np.ndarray]:
        if schedule.abar is None or schedule.prediction not in ("v", "epsilon"):
            raise ValueError(f"the {self.name} sampler needs a VP schedule (hallojax.sample.schedules.vp_schedule)")
        n = schedule.steps
        c = {k: np.zeros(n) for k in self.KEYS}
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            self._coefficients(c, schedule.abar.astype(np.float64), schedule.abar_to.astype(np.float64), n)
        bad = [k for k, v in c.items() if not np.all(np.isfinite(v))]
        if bad:
            raise ValueError(f"{self.name}: non-finite solver coefficients {bad}")
        return {k: v.astype(np.float32) for k, v in c.items()}

    def init(self, x: jax.Array) -> dict:
        return {"x": x, "m1": jnp.zeros_like(x)}

    def _noise_scale(self, out_var, c):
        return c["p_n"]

    def step(self, state: dict, out: jax.Array, c: dict, alpha, sigma, prediction: str, noise=None) -> dict:
        x = state["x"]
        ch = x.shape[-1]
        m0 = to_x0(out[..., :ch], x, alpha, sigma, prediction)
        nxt = c["p_x"] * x + c["p_0"] * m0 + c["p_1"] * state["m1"]
        if self.stochastic:
            nxt = nxt + self._noise_scale(out[..., ch:], c) * noise
        return {"x": nxt, "m1": m0}


class DDIM(_VPSampler):
    """DDIM, η = 0: x_to = √ᾱ_to·x̂0 + √(1 − ᾱ_to)·ε̂ with ε̂ = (x − √ᾱ·x̂0)/√(1 − ᾱ) (diffusers `DDIMScheduler`,
    `CogVideoXDDIMScheduler`; guided-diffusion's `ddim_sample`)."""

    name = "ddim"

    def _coefficients(self, c, ab, ab_to, n):
        a_t = np.sqrt((1.0 - ab_to) / (1.0 - ab))
        c["p_x"][:] = a_t
        c["p_0"][:] = np.sqrt(ab_to) - np.sqrt(ab) * a_t


class CogVideoXDPM(_VPSampler):
    """CogVideoX's stochastic DPM-Solver++(2M) (SAT `VPSDEDPMPP2MSampler`, diffusers `CogVideoXDPMScheduler`):
    with λ = log √(ᾱ/(1 − ᾱ)) and h = λ_to − λ_i, x ← √((1 − ᾱ_to)/(1 − ᾱ))·e^{−h}·x − expm1(−2h)·√ᾱ_to·D
    + √(1 − ᾱ_to)·√(1 − e^{−2h})·z, D = x̂0 at the first step and when landing on ᾱ = 1, else
    (1 + 1/(2r))·x̂0 − (1/(2r))·x̂0_prev with r = (λ_i − λ_{i−1})/h."""

    name = "cogvideox-dpm"
    stochastic = True

    def _coefficients(self, c, ab, ab_to, n):
        lam, lam_to = 0.5 * np.log(ab / (1.0 - ab)), 0.5 * np.log(ab_to / (1.0 - ab_to))
        h = lam_to - lam
        mult2 = np.expm1(-2.0 * h) * np.sqrt(ab_to)
        c["p_x"][:] = np.sqrt((1.0 - ab_to) / (1.0 - ab)) * np.exp(-h)
        c["p_0"][:] = -mult2
        c["p_n"][:] = np.sqrt(1.0 - ab_to) * np.sqrt(-np.expm1(-2.0 * h))
        for i in range(1, n):
            if ab_to[i] >= 1.0:  # diffusers: prev_timestep < 0, first order
                continue
            r = (lam[i] - lam[i - 1]) / h[i]
            c["p_0"][i] = -mult2[i] * (1.0 + 1.0 / (2.0 * r))
            c["p_1"][i] = mult2[i] / (2.0 * r)


class DDPM(_VPSampler):
    """Ancestral DDPM on the respaced chain: x_to = coef_x0·x̂0 + coef_xt·x + [t > 0]·e^{log σ²/2}·z with the
    learned-range log σ² = f·log β + (1 − f)·log β̃ (f = (y + 1)/2 from the model's variance half y) or, for
    a model without one, the fixed small log β̃ (diffusers `DDPMScheduler`, guided-diffusion `p_sample`)."""

    name = "ddpm"
    stochastic = True
    KEYS = ("p_x", "p_0", "p_1", "p_n", "max_log", "min_log")

    def _coefficients(self, c, ab, ab_to, n):
        from hallojax.diffusion import posterior_tables

        post = {k: v[::-1] for k, v in posterior_tables(ab[::-1], ab_to[::-1]).items()}  # tables run up in t
        c["p_x"][:] = post["coef_xt"]
        c["p_0"][:] = post["coef_x0"]
        c["p_n"][:] = ab_to < 1.0  # no noise on the step to the data (t = 0)
        c["max_log"][:] = np.where(ab_to < 1.0, post["log_beta"], 0.0)
        c["min_log"][:] = np.where(ab_to < 1.0, post["log_var_clipped"], 0.0)

    def _noise_scale(self, out_var, c):
        if out_var.shape[-1] == 0:  # no learned variance: the posterior's
            return c["p_n"] * jnp.exp(0.5 * c["min_log"])
        frac = (out_var + 1.0) / 2.0
        return c["p_n"] * jnp.exp(0.5 * (frac * c["max_log"] + (1.0 - frac) * c["min_log"]))


SAMPLERS = {"euler": Euler, "unipc": UniPC, "dpm++": DPMSolverPP,
            "wan-unipc": UniPC,  # Wan's FlowUniPCMultistepScheduler: the same solver on Wan's σ grid (schedules.py)
            "cogvideox-ddim": DDIM, "cogvideox-dpm": CogVideoXDPM, "ddpm": DDPM, "ddim": DDIM}
# the sampler names that run VP (v / ε) models, on hallojax.sample.schedules.vp_schedule grids
VP = ("cogvideox-ddim", "cogvideox-dpm", "ddpm", "ddim")


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r}: expected one of {sorted(SAMPLERS)}")
    sampler = SAMPLERS[name]()
    sampler.name = name  # one class may serve several names (programs are cached by name)
    return sampler


def step_noise(key: jax.Array, i, shape) -> jax.Array:
    """The standard normal noise a stochastic sampler adds at step i: a function of (key, i) alone."""
    return jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)


class Known(NamedTuple):
    """Known latent frames: latents like x, mask broadcastable to x (1 = known), noise like x."""

    latents: jax.Array
    mask: jax.Array
    noise: jax.Array


def schedule_arrays(sampler, schedule: Schedule) -> dict[str, np.ndarray]:
    """Everything per step the loop needs, as host arrays (pass them to the jitted program as arguments:
    a different shift or schedule of the same length reuses the compiled program)."""
    return {"t": schedule.timesteps, "alpha": schedule.alphas[:-1], "sigma": schedule.sigmas[:-1],
            "coef": sampler.coefficients(schedule)}


def sample(denoise: Denoiser | Sequence[Denoiser], x: jax.Array, arrays: dict, sampler, prediction: str = "flow",
           *, phases: Sequence[tuple[int, int]] | None = None, known: Known | None = None,
           on_step: Callable[[], None] | None = None, key: jax.Array | None = None) -> jax.Array:
    """Run every step of `sampler` from noise `x` (traceable: call it inside `jax.jit`).

    arrays: `schedule_arrays(sampler, schedule)` (jnp or np). denoise: one denoiser, or one per phase
    with `phases` [(start, stop), ...] covering 0..N: each phase is its own `lax.scan` (guidance whose
    active branches change at a step, e.g. HunyuanVideo-Avatar's). on_step: a host callback per step
    (progress bars). key: the stochastic samplers' noise key (`step_noise`)."""
    n = int(np.shape(arrays["t"])[0])
    stochastic = getattr(sampler, "stochastic", False)
    if stochastic and key is None:
        raise ValueError(f"the {sampler.name} sampler adds noise at every step: pass sample(..., key=...)")
    denoisers = list(denoise) if isinstance(denoise, (list, tuple)) else [denoise]
    phases = list(phases) if phases is not None else [(0, n)]
    if len(phases) != len(denoisers) or phases[0][0] != 0 or phases[-1][1] != n or any(
            a[1] != b[0] for a, b in zip(phases, phases[1:])):
        raise ValueError(f"phases {phases} must cover steps 0..{n} in order, one denoiser each")
    xs = {"i": jnp.arange(n), "t": jnp.asarray(arrays["t"], jnp.float32),
          "alpha": jnp.asarray(arrays["alpha"], jnp.float32), "sigma": jnp.asarray(arrays["sigma"], jnp.float32),
          "coef": {k: jnp.asarray(v, jnp.float32) for k, v in arrays["coef"].items()}}
    state = sampler.init(x.astype(jnp.float32))

    def body(denoiser, state, s):
        x = state["x"]
        if known is not None:
            x = jnp.where(known.mask, s["alpha"] * known.latents + s["sigma"] * known.noise, x)
            state = {**state, "x": x}
        out = denoiser(x, s["t"], s["i"]).astype(jnp.float32)
        noise = step_noise(key, s["i"], x.shape) if stochastic else None
        state = sampler.step(state, out, s["coef"], s["alpha"], s["sigma"], prediction, noise)
        if on_step is not None:
            jax.debug.callback(on_step)
        return state, None

    for (start, stop), denoiser in zip(phases, denoisers):
        if stop > start:
            part = jax.tree.map(lambda a: a[start:stop], xs)
            state, _ = jax.lax.scan(lambda st, s, d=denoiser: body(d, st, s), state, part)
    x = state["x"]
    if known is not None:
        x = jnp.where(known.mask, known.latents, x)
    return x
