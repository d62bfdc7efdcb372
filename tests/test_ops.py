"""cbam_jax.ops: the hand-written gradients give what autodiff of the plain formulas gives.

Tolerance 1e-5 relative: float32 sums taken in another order (a few ulps over ~100 terms).
Budget: a few seconds.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cbam_jax.ops import batch_norm_train, max_pool_2x2


def _plain_batch_norm(x, scale, bias, epsilon=1e-5):
    mean = x.mean(axis=(0, 1, 2))
    var = jnp.square(x - mean).mean(axis=(0, 1, 2))
    gain = lax.rsqrt(var + epsilon) * scale
    return x * gain + (bias - mean * gain), mean, var


def _rel_err(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


@pytest.mark.parametrize("with_stat_cotangents", [False, True])
def test_batch_norm_train_matches_autodiff_of_the_two_pass_formula(with_stat_cotangents):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1.0, 3.0, (8, 6, 5, 16)), jnp.float32)
    scale = jnp.asarray(rng.normal(size=16), jnp.float32)
    bias = jnp.asarray(rng.normal(size=16), jnp.float32)
    g_y = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    g_stats = jnp.asarray(rng.normal(size=(2, 16)), jnp.float32) * with_stat_cotangents
    ours, ours_vjp = jax.vjp(lambda *a: batch_norm_train(*a, 1e-5), x, scale, bias)
    plain, plain_vjp = jax.vjp(_plain_batch_norm, x, scale, bias)
    for a, b in zip(ours, plain):
        assert _rel_err(a, b) < 1e-5
    for a, b in zip(ours_vjp((g_y, *g_stats)), plain_vjp((g_y, *g_stats))):
        assert _rel_err(a, b) < 1e-5


def test_max_pool_gradient_goes_to_the_first_maximum_in_row_major_order():
    x = jnp.asarray([[0.0, 0.0], [0.0, 0.0]]).reshape(1, 2, 2, 1)  # all tied, as after ReLU
    x = jnp.concatenate([x, jnp.asarray([[1.0, 3.0], [3.0, 3.0]]).reshape(1, 2, 2, 1)], axis=-1)
    grad = jax.grad(lambda x: (max_pool_2x2(x) * jnp.asarray([2.0, 5.0])).sum())(x)
    np.testing.assert_array_equal(grad[0, :, :, 0], [[2.0, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(grad[0, :, :, 1], [[0.0, 5.0], [0.0, 0.0]])


def test_max_pool_drops_odd_edges_and_gives_them_zero_gradient():
    x = jnp.arange(5 * 3, dtype=jnp.float32).reshape(1, 5, 3, 1)
    y, vjp = jax.vjp(max_pool_2x2, x)
    np.testing.assert_array_equal(y[0, :, :, 0], [[4.0], [10.0]])
    (grad,) = vjp(jnp.ones_like(y))
    expected = np.zeros((5, 3))
    expected[1, 1] = expected[3, 1] = 1.0
    np.testing.assert_array_equal(grad[0, :, :, 0], expected)
