"""Rectified-flow objective pieces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hallojax.flow import flow_matching_loss, interpolate, sample_sigma, shift_sigma


def test_interpolation_endpoints_and_shift():
    x0, eps = jnp.ones((2, 3)), -jnp.ones((2, 3))
    np.testing.assert_array_equal(interpolate(x0, eps, jnp.array([0.0, 1.0])), np.array([[1.0] * 3, [-1.0] * 3]))
    s = jnp.array([0.0, 0.25, 1.0])
    np.testing.assert_allclose(shift_sigma(s, 5.0), [0.0, 5 * 0.25 / (1 + 4 * 0.25), 1.0], rtol=1e-6)
    np.testing.assert_allclose(shift_sigma(s, 1.0), s)


@pytest.mark.parametrize("mode", ["uniform", "logit_normal"])
def test_sigma_range(mode):
    s = sample_sigma(jax.random.key(0), 4096, mode=mode, shift=3.0)
    assert float(s.min()) >= 0.0 and float(s.max()) <= 1.0
    assert float(s.mean()) > 0.5  # shift > 1 pushes sigma towards noise


def test_loss_is_finite_at_batch_one_and_exact_for_a_perfect_model():
    x0 = jnp.full((1, 2, 2, 2, 4), 0.5)

    def oracle(x_t, t, ctx):  # knows x0, so returns the exact velocity eps - x0 = (x_t - x0) / sigma
        sigma = (t / 1000.0).reshape(-1, 1, 1, 1, 1)
        return (x_t - x0) / sigma

    loss = flow_matching_loss(oracle, x0, jnp.zeros((1, 1, 1)), jax.random.key(3))
    assert np.isfinite(float(loss)) and float(loss) < 1e-8
    zero = flow_matching_loss(lambda x, t, c: jnp.zeros_like(x), x0, jnp.zeros((1, 1, 1)), jax.random.key(3))
    assert float(zero) > 0.1
