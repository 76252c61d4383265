"""Noise schedules for sampling: the σ grid a sampler walks and the time value the model is given.

A `Schedule` holds, for N steps, the noise levels σ_0 > … > σ_N = 0 (N + 1 values), the signal scale
α_i of each level and the model's time input t_i (N values), all on the host as numpy. Samplers only see
(α, σ) pairs and a prediction type, so the same solver code runs flow-matching models (α = 1 − σ,
prediction "flow": the model returns the velocity ε − x0) and, later, VP diffusion models (α = √ᾱ,
σ = √(1 − ᾱ), prediction "v" or "epsilon").

The flow schedules reproduce diffusers' schedulers value for value (tested for steps ∈ {5, 8, 25, 50},
shift ∈ {1, 3, 5}), including where diffusers rounds:

- "euler" = `FlowMatchEulerDiscreteScheduler(shift=s)`: σ = linspace(1, σ_min, N) with σ_min the float32
  value of shift(1/1000), shifted again (so the low end is shifted twice, as diffusers does), float32;
  the model gets float t = 1000·σ (float32).
- "unipc" = `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
  flow_shift=s)`: σ = shift(linspace(1, 1/1000, N + 1)[:-1]), σ_0 nudged below 1 by 1e-6 when it is 1;
  the model gets t = int(1000·σ) (diffusers keeps integer timesteps: truncated, not rounded).
- "dpm++" = `DPMSolverMultistepScheduler(..., use_flow_sigmas=True, flow_shift=s)`:
  σ = flip(shift(1 − linspace(1, 1/1000, N + 1)))[:-1]; t = int(1000·σ).
- "wan-unipc" = Wan's `FlowUniPCMultistepScheduler` (Wan2.1 `fm_solvers_unipc.py`, EchoMimicV3 Flash) built with
  shift 1 and `set_timesteps(N, shift=s)`: σ = shift(linspace(0.999, 0, N + 1)[:-1]) (its grid starts at
  1 − 1/1000 and ends at 0, unlike diffusers'), t = int(1000·σ); the solver is "unipc".
Every schedule ends with σ_N = 0, so the last step returns the clean prediction.

VP schedules (`vp_schedule`; α = √ᾱ, σ = √(1 − ᾱ) over `hallojax.diffusion`'s float64 ᾱ tables, integer
model times t, and per step the level it lands on, ᾱ_to, which is not always the next step's level):

- "cogvideox-ddim" / "cogvideox-dpm" = diffusers' `CogVideoXDDIMScheduler` / `CogVideoXDPMScheduler` as the
  CogVideoX pipelines build them (scaled-linear β, zero-terminal SNR, `timestep_spacing="trailing"`,
  snr_shift_scale = `shift`): t = round(arange(1000, 0, −1000/N)) − 1 (50 steps: 999, 979, …, 19), each step
  landing on t − 1000 // N (ᾱ = 1 below 0). When N does not divide 1000 that is not the next step's t
  (N = 30: from 966 to 933, then the model is asked at 932): diffusers does so and so do we.
- "ddpm" / "ddim" (LetsTalk, guided-diffusion's `space_timesteps(1000, [N])`: t_k = round(k·999/(N − 1)), so
  250 steps visit 999, 995, …, 4, 0) or spacing "leading" (diffusers' default and guided-diffusion's "ddimN":
  t = k·(1000 // N), 996 … 0 for 250); each step lands on the next visited t, the last on ᾱ = 1. The respaced
  chain's β_k = 1 − ᾱ_{t_k}/ᾱ_{t_{k−1}} gives the posterior and learned-range variance of each step.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
PREDICTIONS = ("flow", "v", "epsilon")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """sigmas [N + 1] (σ_N = 0), alphas [N + 1], timesteps [N] (the model's time input), all float32.
    VP schedules also hold float64 ᾱ [N] (each step's level) and ᾱ_to [N] (the level it lands on)."""

    sigmas: np.ndarray
    alphas: np.ndarray
    timesteps: np.ndarray
    prediction: str = "flow"
    abar: np.ndarray | None = None
    abar_to: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.timesteps)
        if n < 1 or self.sigmas.shape != (n + 1,) or self.alphas.shape != (n + 1,):
            raise ValueError(f"schedule: {n} timesteps need {n + 1} sigmas and alphas, got "
                             f"{self.sigmas.shape}, {self.alphas.shape}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"schedule prediction {self.prediction!r}: expected one of {PREDICTIONS}")

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """σ' = s·σ / (1 + (s − 1)·σ): more steps at high noise for s > 1 (Wan, HunyuanVideo-Avatar)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _flow(sigmas: np.ndarray, timesteps: np.ndarray) -> Schedule:
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return Schedule(sigmas=sigmas, alphas=(1.0 - sigmas.astype(np.float64)).astype(np.float32),
                    timesteps=np.asarray(timesteps, np.float32), prediction="flow")


def euler_flow(steps: int, shift: float) -> Schedule:
    # the scheduler's training grid is float32 and shifted once; its last value is σ_min
    train = np.linspace(1, NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS, dtype=np.float32)[::-1] / np.float32(
        NUM_TRAIN_TIMESTEPS)
    train = (np.float32(shift) * train / (np.float32(1) + np.float32(shift - 1) * train)).astype(np.float32)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    t = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, steps)
    sigmas = shift_sigmas(t / NUM_TRAIN_TIMESTEPS, shift).astype(np.float32)
    return _flow(sigmas, sigmas * np.float32(NUM_TRAIN_TIMESTEPS))


def unipc_flow(steps: int, shift: float) -> Schedule:
    sigmas = shift_sigmas(np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, steps + 1)[:-1], shift)
    if abs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6
    return _flow(sigmas, np.trunc(sigmas * NUM_TRAIN_TIMESTEPS))


def dpm_flow(steps: int, shift: float) -> Schedule:
    sigmas = 1.0 - np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, steps + 1)
    sigmas = np.flip(shift_sigmas(sigmas, shift))[:-1].copy()
    return _flow(sigmas, np.trunc(sigmas * NUM_TRAIN_TIMESTEPS))


def wan_unipc_flow(steps: int, shift: float) -> Schedule:
    # the scheduler's training grid, float32, at shift 1: 1 − linspace(1, 1/1000, 1000) reversed, so 0.999 .. 0
    train = (1.0 - np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS)[::-1]).astype(np.float32)
    sigmas = shift_sigmas(np.linspace(float(train[0]), float(train[-1]), steps + 1)[:-1], shift)
    return _flow(sigmas, np.trunc(sigmas * NUM_TRAIN_TIMESTEPS))


FLOW_SCHEDULES = {"euler": euler_flow, "unipc": unipc_flow, "dpm++": dpm_flow, "wan-unipc": wan_unipc_flow}


def flow_schedule(sampler: str, steps: int, shift: float) -> Schedule:
    """The σ grid diffusers' scheduler for `sampler` uses with `steps` steps and `shift`."""
    if sampler not in FLOW_SCHEDULES:
        raise ValueError(f"sampler {sampler!r}: expected one of {sorted(FLOW_SCHEDULES)}")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps {steps!r}: must be an integer >= 1")
    if not shift > 0:
        raise ValueError(f"shift {shift!r}: must be > 0")
    return FLOW_SCHEDULES[sampler](int(steps), float(shift))


# --- VP (DDPM-family) schedules ------------------------------------------------------------------
VP_SAMPLERS = {"cogvideox-ddim": "cogvideox", "cogvideox-dpm": "cogvideox", "ddpm": "ddpm", "ddim": "ddpm"}
SPACINGS = ("trailing", "respace", "leading")


def respace(steps: int, spacing: str, train: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """int64 [N] visited timesteps, descending: "respace" (guided-diffusion's section count, one section),
    "leading" (k·(T // N)) or "trailing" (round(arange(T, 0, −T/N)) − 1)."""
    if not 1 <= steps <= train:
        raise ValueError(f"steps {steps}: a VP schedule takes 1 .. {train} steps")
    if spacing == "respace":
        stride = (train - 1) / (steps - 1) if steps > 1 else 1.0
        cur, out = 0.0, []
        for _ in range(steps):  # accumulated and rounded half-to-even in Python floats, as guided-diffusion does
            out.append(round(cur))
            cur += stride
        return np.array(out[::-1], np.int64)
    if spacing == "leading":
        return (np.arange(steps) * (train // steps))[::-1].astype(np.int64)
    if spacing == "trailing":
        return np.round(np.arange(train, 0, -train / steps)).astype(np.int64) - 1
    raise ValueError(f"timestep spacing {spacing!r}: expected one of {SPACINGS}")


def vp_schedule(sampler: str, steps: int, shift: float = 1.0, *, prediction: str = "v",
                spacing: str | None = None) -> Schedule:
    """The VP schedule of `sampler` (VP_SAMPLERS) with `steps` steps; `shift` is the SNR shift of the
    CogVideoX process (the DDPM process has none: 1)."""
    from hallojax.diffusion import alphas_cumprod

    if sampler not in VP_SAMPLERS:
        raise ValueError(f"sampler {sampler!r}: expected one of {sorted(VP_SAMPLERS)}")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps {steps!r}: must be an integer >= 1")
    if prediction not in ("v", "epsilon"):
        raise ValueError(f"sampler {sampler!r} takes a VP model (prediction 'v' or 'epsilon'), not {prediction!r}")
    process = VP_SAMPLERS[sampler]
    if process == "ddpm" and shift != 1:
        raise ValueError(f"shift {shift}: the DDPM process (linear betas) has no shift; use 1")
    ab = alphas_cumprod(process, shift)
    cog = process == "cogvideox"
    t = respace(int(steps), spacing or ("trailing" if cog else "respace"))
    if cog:  # diffusers' CogVideoX schedulers: prev = t − T // N, whatever the next visited t is
        to = t - NUM_TRAIN_TIMESTEPS // int(steps)
    else:
        to = np.concatenate([t[1:], [-1]])
    abar, abar_to = ab[t], np.where(to >= 0, ab[np.maximum(to, 0)], 1.0)
    levels = np.concatenate([abar, abar_to[-1:]])
    return Schedule(sigmas=np.sqrt(1.0 - levels).astype(np.float32), alphas=np.sqrt(levels).astype(np.float32),
                    timesteps=t.astype(np.float32), prediction=prediction, abar=abar, abar_to=abar_to)


def make_schedule(sampler: str, steps: int, shift: float, prediction: str = "flow") -> Schedule:
    """The schedule a generation sampler walks: a flow one (FLOW_SCHEDULES) or a VP one (VP_SAMPLERS)."""
    if sampler in VP_SAMPLERS:
        return vp_schedule(sampler, steps, shift, prediction=prediction)
    if prediction != "flow":
        raise ValueError(f"sampler {sampler!r} is a flow-matching sampler; this model predicts {prediction!r} "
                         f"(use one of {sorted(VP_SAMPLERS)})")
    return flow_schedule(sampler, steps, shift)
