"""Rectified-flow (flow-matching) objective, as Wan and HunyuanVideo-Avatar train.

x_t = (1 − σ)·x0 + σ·ε, target v = ε − x0, the model sees t = 1000·σ. σ is drawn uniform or
logit-normal and optionally shifted: σ' = s·σ / (1 + (s − 1)·σ). The loss is a mean per sample (over
the generated positions only, when a known-frame mask is given), optionally weighted by a function of
that sample's σ, then a mean over samples: nothing is normalised over the batch, so it is well defined
at any batch size, including 1, and k equal microbatches average to the loss of their union.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shift_sigma(sigma: jax.Array, shift: float) -> jax.Array:
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sample_sigma(rng: jax.Array, batch: int, *, mode: str = "logit_normal", shift: float = 1.0,
                 mean: float = 0.0, std: float = 1.0) -> jax.Array:
    if mode == "uniform":
        sigma = jax.random.uniform(rng, (batch,))
    elif mode == "logit_normal":
        sigma = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,)))
    else:
        raise ValueError(f"sigma sampling mode {mode!r}: expected 'uniform' or 'logit_normal'")
    return shift_sigma(sigma, shift)


def interpolate(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    s = sigma.reshape((-1,) + (1,) * (x0.ndim - 1))
    return (1.0 - s) * x0 + s * noise


WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def loss_weight(sigma: jax.Array, weighting: str = "none") -> jax.Array:
    """Per-sample weight of the velocity loss: none (1), sigma_sqrt (σ⁻², clipped at 1e4), cosmap
    (2 / (π(1 − 2σ + 2σ²))), the SD3 family's choices."""
    if weighting == "none":
        return jnp.ones_like(sigma)
    if weighting == "sigma_sqrt":
        return jnp.minimum(sigma.astype(jnp.float32) ** -2.0, 1e4)
    if weighting == "cosmap":
        return 2.0 / (jnp.pi * (1.0 - 2.0 * sigma + 2.0 * sigma**2))
    raise ValueError(f"loss weighting {weighting!r}: expected one of {WEIGHTINGS}")


def masked_mse(pred: jax.Array, target: jax.Array, generate: jax.Array | None = None,
               weights: jax.Array | None = None) -> jax.Array:
    """mean_b w_b · mean over sample b's generated elements of (pred − target)².

    pred/target [B, F, ...]; generate [B, F] (1 = generated, 0 = known frame, excluded) or None;
    weights [B] or None. A sample with no generated frame contributes 0."""
    return masked_mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), generate, weights)


def masked_mean(values: jax.Array, generate: jax.Array | None = None, weights: jax.Array | None = None) -> jax.Array:
    """mean_b w_b · mean over sample b's generated elements of `values` [B, F, ...] (see `masked_mse`)."""
    per_elem = values.reshape(values.shape[0], values.shape[1], -1)  # [B, F, E]
    if generate is None:
        per_sample = per_elem.mean(axis=(1, 2))
    else:
        g = generate.astype(jnp.float32)
        per_sample = (per_elem.sum(-1) * g).sum(-1) / jnp.maximum(g.sum(-1) * per_elem.shape[-1], 1.0)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def sample_noise(rng: jax.Array, x0: jax.Array, *, shift: float = 1.0, mode: str = "logit_normal"):
    """(σ [B], ε like x0) for a batch: drawn once per global batch, so microbatches can share them."""
    r_sigma, r_noise = jax.random.split(rng)
    return (sample_sigma(r_sigma, x0.shape[0], mode=mode, shift=shift),
            jax.random.normal(r_noise, x0.shape, jnp.float32))


def flow_matching_loss(model, x0: jax.Array, context: jax.Array, rng: jax.Array, *, shift: float = 1.0,
                       mode: str = "logit_normal", **model_kwargs) -> jax.Array:
    """Mean squared error between the model's velocity and ε − x0 at a random σ per sample."""
    sigma, noise = sample_noise(rng, x0, shift=shift, mode=mode)
    return velocity_loss(model, x0, context, sigma, noise, **model_kwargs)


def velocity_loss(model, x0: jax.Array, context: jax.Array, sigma: jax.Array, noise: jax.Array,
                  **model_kwargs) -> jax.Array:
    """The loss at given σ [B] and ε (see `flow_matching_loss`)."""
    x_t = interpolate(x0.astype(jnp.float32), noise, sigma)
    v = model(x_t, 1000.0 * sigma, context, **model_kwargs).astype(jnp.float32)
    return masked_mse(v, noise - x0.astype(jnp.float32))
