"""Samplers: Euler, UniPC (bh2, order 2) and DPM-Solver++ 2M, each one jitted loop over all steps.

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

    def step(self, state: dict, out: jax.Array, c: dict, alpha, sigma, prediction: str) -> dict:
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

    def step(self, state: dict, out: jax.Array, c: dict, alpha, sigma, prediction: str) -> dict:
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


SAMPLERS = {"euler": Euler, "unipc": UniPC, "dpm++": DPMSolverPP,
            "wan-unipc": UniPC}  # Wan's FlowUniPCMultistepScheduler: the same solver on Wan's σ grid (schedules.py)


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r}: expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]()


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
           on_step: Callable[[], None] | None = None) -> jax.Array:
    """Run every step of `sampler` from noise `x` (traceable: call it inside `jax.jit`).

    arrays: `schedule_arrays(sampler, schedule)` (jnp or np). denoise: one denoiser, or one per phase
    with `phases` [(start, stop), ...] covering 0..N: each phase is its own `lax.scan` (guidance whose
    active branches change at a step, e.g. HunyuanVideo-Avatar's). on_step: a host callback per step
    (progress bars)."""
    n = int(np.shape(arrays["t"])[0])
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
        state = sampler.step(state, out, s["coef"], s["alpha"], s["sigma"], prediction)
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
