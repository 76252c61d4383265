"""Variance-preserving (DDPM-family) diffusion: the noise tables and the "v" and "ddpm" training objectives.

x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε at integer t ∈ {0 .. T−1}, T = 1000, ᾱ_t = Π_{s≤t} (1 − β_s), t drawn uniform.

- "v" (CogVideoX / Hallo3, process "cogvideox"): β scaled-linear (√β linear 0.00085 .. 0.012), the SNR
  shift ᾱ ← ᾱ / (s + (1 − s)·ᾱ), then the zero-terminal-SNR rescale of √ᾱ (shifted so √ᾱ_{T−1} = 0, scaled so
  √ᾱ_0 stays). The model predicts v = √ᾱ·ε − √(1 − ᾱ)·x0. Hallo3's loss (1/(1 − ᾱ))·|x̂0 − x0|² with
  x̂0 = √ᾱ·x_t − √(1 − ᾱ)·v̂ is |v̂ − v|² exactly (x̂0 − x0 = −√(1 − ᾱ)·(v̂ − v)): computed as the latter.
- "ddpm" (LetsTalk; guided-diffusion / DiT / Latte, process "ddpm"): β linear 1e-4 .. 0.02. The model outputs
  2C channels [ε̂, y]: ε-prediction and the learned-range log variance f·log β_t + (1 − f)·log β̃_t with
  f = (y + 1)/2 (β̃_t the posterior variance, its log clipped at t = 0 to β̃_1). The hybrid loss is
  |ε̂ − ε|² + L_vb, L_vb = KL(q(x_{t−1} | x_t, x0) ‖ p(x_{t−1} | x_t)) for t > 0 and the discretised Gaussian
  decoder NLL (bins of width 2/255 on [−1, 1], the tanh approximation of the normal CDF) at t = 0, both in bits, with ε̂
  stop-gradiented inside L_vb (the bound trains the variance only). Without learned variance: |ε̂ − ε|².
  The terms are computed through exact identities that avoid guided-diffusion's float32 cancellations
  (see `ddpm_terms`); in float64 they equal its formulas to 1e-9 (tests/test_objectives.py).

Every per-element term is averaged per sample over its generated positions, then over samples
(`flow.masked_mean`): defined at batch 1, and equal microbatches average exactly to their union.
Tables are float64 on the host, as guided-diffusion and diffusers' scaled-linear schedule keep them; the
device gathers float32 rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from hallojax.flow import masked_mean

NUM_TRAIN_TIMESTEPS = 1000
# the noise process of each VP model family: beta schedule, range, zero-terminal-SNR rescale
PROCESSES = {
    "cogvideox": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, zero_snr=True),
    "ddpm": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, zero_snr=False),
}
OBJECTIVE_PROCESS = {"v": "cogvideox", "ddpm": "ddpm"}


# --- noise tables --------------------------------------------------------------------------------
def betas(schedule: str, start: float, end: float, steps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """float64 [steps]: "linear" (DDPM, guided-diffusion) or "scaled_linear" (√β linear; SD, CogVideoX)."""
    if schedule == "linear":
        return np.linspace(start, end, steps, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, steps, dtype=np.float64) ** 2
    raise ValueError(f"beta schedule {schedule!r}: expected 'linear' or 'scaled_linear'")


def rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1 on √ᾱ: the last level becomes pure noise, the first is kept."""
    s = np.sqrt(alphas_cumprod)
    s0, st = s[0], s[-1]
    s = (s - st) * (s0 / (s0 - st))
    return s**2


def alphas_cumprod(process: str, shift: float = 1.0) -> np.ndarray:
    """float64 [1000] ᾱ_t of a process (PROCESSES), with the SNR shift s (CogVideoX's snr_shift_scale:
    ᾱ / (s + (1 − s)·ᾱ), i.e. the SNR divided by s) before the zero-terminal-SNR rescale."""
    if process not in PROCESSES:
        raise ValueError(f"diffusion process {process!r}: expected one of {sorted(PROCESSES)}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"SNR shift {shift!r}: must be a positive number")
    p = PROCESSES[process]
    ab = np.cumprod(1.0 - betas(p["beta_schedule"], p["beta_start"], p["beta_end"]))
    ab = ab / (shift + (1.0 - shift) * ab)
    return rescale_zero_terminal_snr(ab) if p["zero_snr"] else ab


def posterior_tables(ab: np.ndarray, ab_prev: np.ndarray) -> dict[str, np.ndarray]:
    """float64 tables of q(x_{t−1} | x_t, x0) for steps from levels ᾱ (ab, ascending t) to ᾱ_prev (1 for t = 0):
    the step's β = 1 − ᾱ/ᾱ_prev, mean = coef_x0·x0 + coef_xt·x_t, variance β̃ = β(1 − ᾱ_prev)/(1 − ᾱ) and
    its log clipped at the first step to the second's (guided-diffusion's `posterior_log_variance_clipped`)."""
    beta = 1.0 - ab / ab_prev
    var = beta * (1.0 - ab_prev) / (1.0 - ab)
    with np.errstate(divide="ignore"):
        log_var = np.log(np.concatenate([var[1:2], var[1:]]))
        log_beta = np.log(beta)
    return {"beta": beta, "coef_x0": beta * np.sqrt(ab_prev) / (1.0 - ab),
            "coef_xt": (1.0 - ab_prev) * np.sqrt(1.0 - beta) / (1.0 - ab), "var": var,
            "log_var_clipped": log_var, "log_beta": log_beta}


def training_tables(process: str, shift: float = 1.0, dtype=np.float32) -> dict[str, np.ndarray]:
    """[1000] rows the device gathers by t (float32 unless `dtype`): √ᾱ, √(1 − ᾱ), and the posterior's tables."""
    ab = alphas_cumprod(process, shift)
    with np.errstate(divide="ignore", invalid="ignore"):  # ᾱ = 0 at the zero-terminal-SNR end
        post = posterior_tables(ab, np.concatenate([[1.0], ab[:-1]]))
    out = {"sqrt_ab": np.sqrt(ab), "sqrt_1m_ab": np.sqrt(1.0 - ab)}
    if not PROCESSES[process]["zero_snr"]:  # x̂0 from ε and the posterior: the ddpm objective (ᾱ > 0 throughout)
        out.update(sqrt_recipm1_ab=np.sqrt(1.0 / ab - 1.0), coef_x0=post["coef_x0"],
                   log_var_clipped=post["log_var_clipped"],
                   log_var_ratio=post["log_beta"] - post["log_var_clipped"])  # log(β/β̃), small at large t
    return {k: v.astype(dtype) for k, v in out.items()}


def sample_timesteps(rng: jax.Array, batch: int) -> jax.Array:
    """int32 [B], uniform over {0 .. 999}."""
    return jax.random.randint(rng, (batch,), 0, NUM_TRAIN_TIMESTEPS)


def _rows(tables: dict, name: str, t: jax.Array, ndim: int) -> jax.Array:
    return jnp.asarray(tables[name])[t].reshape((-1,) + (1,) * (ndim - 1))


def noised(tables: dict, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε."""
    return _rows(tables, "sqrt_ab", t, x0.ndim) * x0 + _rows(tables, "sqrt_1m_ab", t, x0.ndim) * noise


# --- the v objective -----------------------------------------------------------------------------
def v_target(tables: dict, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v = √ᾱ·ε − √(1 − ᾱ)·x0."""
    return _rows(tables, "sqrt_ab", t, x0.ndim) * noise - _rows(tables, "sqrt_1m_ab", t, x0.ndim) * x0


def v_loss(tables: dict, out: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array,
           generate: jax.Array | None = None) -> jax.Array:
    """Hallo3's x̂0 loss weighted by 1/(1 − ᾱ), as the equal |v̂ − v|² (no division at ᾱ → 1)."""
    err = jnp.square(out.astype(jnp.float32) - v_target(tables, x0, noise, t))
    return masked_mean(err, generate)


# --- the ddpm hybrid objective -------------------------------------------------------------------
# guided-diffusion's float32 formulas subtract nearly equal numbers: the two posterior means (x_t dominates
# both) and log β vs log β̃ (equal to 1e-6 at large t). Written with the identities
#   true mean − model mean = coef_x0·√(1/ᾱ − 1)·(ε̂ − ε),   log σ²_model − log β̃ = f·log(β/β̃)
# (log(β/β̃) from a float64 table) the same terms are well conditioned, and so are their gradients.
@jax.custom_jvp
def _kl_log_var_term(d):
    """d + e^{−d} − 1 (the KL's variance part for log-variance gap d), with the derivative −expm1(−d)."""
    return d + jnp.expm1(-d)


@_kl_log_var_term.defjvp
def _kl_log_var_term_jvp(primals, tangents):
    (d,), (dd,) = primals, tangents
    return _kl_log_var_term(d), -jnp.expm1(-d) * dd


def gaussian_kl(mean_gap, log_var_gap, log_var2):
    """KL(N(m1, e^{lv1}) ‖ N(m2, e^{lv2})) per element, in nats, from m1 − m2, lv2 − lv1 and lv2."""
    return 0.5 * (_kl_log_var_term(log_var_gap) + jnp.square(mean_gap) * jnp.exp(-log_var2))


def _cdf_logit(x):
    """guided-diffusion's approximate normal CDF is ½(1 + tanh(√(2/π)(x + 0.044715x³))) = sigmoid(this)."""
    return 2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)


def discretized_gaussian_nll(x, centered, log_scale):
    """−log P(x) per element, in nats, of N(mean, e^{2·log_scale}) integrated over x's bin of width 2/255
    (the outer bins open to ±∞ beyond ∓0.999; every probability floored at 1e-12), as guided-diffusion
    scores 8-bit data in [−1, 1]; centered = x − mean. Its formula's ½(1 + tanh(·)) differences, taken as
    sigmoids of the bin reflected into the lower tail (the CDF is odd about ½), keep their precision far
    from the mean."""
    inv_std = jnp.exp(-log_scale)
    floor = math.log(1e-12)
    # Φ(a) − Φ(b) = Φ(−b) − Φ(−a): the bin moved below the mean, where both CDF values are small and exact
    far = -jnp.abs(centered)
    upper, lower = _cdf_logit(inv_std * (far + 1.0 / 255.0)), _cdf_logit(inv_std * (far - 1.0 / 255.0))
    log_delta = jnp.log(jnp.maximum(jax.nn.sigmoid(upper) - jax.nn.sigmoid(lower), 1e-12))
    log_cdf_plus = jax.nn.log_sigmoid(_cdf_logit(inv_std * (centered + 1.0 / 255.0)))  # log Φ(a)
    log_one_minus_cdf_min = jax.nn.log_sigmoid(-_cdf_logit(inv_std * (centered - 1.0 / 255.0)))  # log(1 − Φ(b))
    return -jnp.where(x < -0.999, jnp.maximum(log_cdf_plus, floor),
                      jnp.where(x > 0.999, jnp.maximum(log_one_minus_cdf_min, floor), log_delta))


def ddpm_terms(tables: dict, out: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> dict:
    """Per-element {"mse", "vb"} of the hybrid loss (vb only with a 2C-channel output; in bits)."""
    out = out.astype(jnp.promote_types(out.dtype, jnp.float32))
    c = x0.shape[-1]
    eps = out[..., :c]
    terms = {"mse": jnp.square(eps - noise)}
    if out.shape[-1] == c:
        return terms
    if out.shape[-1] != 2 * c:
        raise ValueError(f"ddpm objective: the model outputs {out.shape[-1]} channels; expected {c} (ε) or "
                         f"{2 * c} (ε and the learned-range variance)")
    n = x0.ndim
    x0_gap = _rows(tables, "sqrt_recipm1_ab", t, n) * (jax.lax.stop_gradient(eps) - noise)  # x0 − x̂0; the
    # bound trains the variance, not the mean
    min_log = _rows(tables, "log_var_clipped", t, n)  # the true posterior's log variance
    gap = (out[..., c:] + 1.0) / 2.0 * _rows(tables, "log_var_ratio", t, n)  # model − true log variance
    kl = gaussian_kl(_rows(tables, "coef_x0", t, n) * x0_gap, gap, min_log + gap)
    nll = discretized_gaussian_nll(x0, x0_gap, 0.5 * (min_log + gap))  # t = 0: model mean = x̂0
    first = (t == 0).reshape((-1,) + (1,) * (n - 1))
    terms["vb"] = jnp.where(first, nll, kl) / math.log(2.0)
    return terms


def ddpm_loss(tables: dict, out: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array,
              generate: jax.Array | None = None) -> jax.Array:
    """MSE(ε) + L_vb, per sample over its generated positions, then the mean over samples."""
    terms = ddpm_terms(tables, out, x0.astype(jnp.promote_types(x0.dtype, jnp.float32)), noise, t)
    return masked_mean(sum(terms.values()), generate)
