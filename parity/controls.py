"""Negative controls: deliberate bugs on the JAX side that the parity report must catch.

`python -m parity --negative-control NAME` runs the report with one of them in place and must
exit 1, on random and on trained weights alike (tests/test_parity.py asserts it for each, and
scripts/parity_sweep.py on every checkpoint of its sweep). A check that no bug can fail proves
nothing; these are the mistakes a port of the tutorial most plausibly makes.
"""
import contextlib
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import optax

from cbam_jax.layers import BatchNorm
from cbam_jax.models import CBAM
from cbam_jax.ops import fused, reference
from parity import convert


# The originals, taken before any control patches them (a patched name would call itself).
_torch_to_flax_array = convert._torch_to_flax_array
_updated_running = reference.updated_running
_max_pool_2x2 = reference.max_pool_2x2


def _fc1_unpermuted(kind, a):
    """The converter without fc1's flatten permutation: PyTorch's (C, H, W) input order read
    as NHWC's (H, W, C), a plain transpose like any other Linear."""
    return a.T if kind == "fc1" else _torch_to_flax_array(kind, a)


def _biased_running_update(running, mean, var, n, momentum):
    """BatchNorm's running-statistics update (every BatchNorm goes through it, reference and
    fused alike) fed the batch variance scaled by (n - 1) / n: the running variance then
    follows the biased batch variance, as flax.linen.BatchNorm's does. Normalisation is
    unchanged."""
    return _updated_running(running, mean, var * ((n - 1) / n), n, momentum)


def _adam_without_bias_correction(learning_rate: float) -> optax.GradientTransformation:
    """Adam's moments, but the update m / (sqrt(v) + eps) without dividing them by 1 - beta^t
    (3.2 times too long on the first step)."""
    b1, b2, eps = 0.9, 0.999, 1e-8

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update(grads, state, params=None):
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
        updates = jax.tree.map(lambda m, v: -learning_rate * m / (jnp.sqrt(v) + eps), mu, nu)
        return updates, optax.ScaleByAdamState(state.count + 1, mu, nu)

    return optax.GradientTransformation(init, update)


@jax.custom_vjp
def _max_pool_to_every_maximum(x):
    """reference.max_pool_2x2, but every element equal to its window's max takes the whole
    window's gradient, not the first one only."""
    return _max_pool_2x2(x)


def _every_maximum_fwd(x):
    y = _max_pool_2x2(x)
    return y, (x, y)


def _every_maximum_bwd(residuals, g):
    x, y = residuals
    b, h, w, c = x.shape
    up = lambda a: jnp.repeat(jnp.repeat(a, 2, axis=1), 2, axis=2)  # each window's value, 2x2
    hit = x[:, :h // 2 * 2, :w // 2 * 2] == up(y)
    g_x = jnp.where(hit, up(g), jnp.zeros((), g.dtype))
    return (jnp.pad(g_x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


_max_pool_to_every_maximum.defvjp(_every_maximum_fwd, _every_maximum_bwd)


def _batch_norm_relu_pool_train(x, scale, bias, epsilon):
    """CBAMCNN's fused BatchNorm + ReLU + max-pool (float32 training of its blocks) as
    BatchNorm, ReLU and that max-pool: the fused op's backward assumes one element per window
    takes the gradient."""
    y, mean, var = fused.batch_norm_train(x, scale, bias, epsilon)
    return _max_pool_to_every_maximum(jax.nn.relu(y)), mean, var


@contextlib.contextmanager
def _gradient_to_every_maximum():
    """Every max-pool of both paths: the reference's, and the fused blocks' ops."""
    with mock.patch("cbam_jax.ops.reference.max_pool_2x2", _max_pool_to_every_maximum), \
            mock.patch("cbam_jax.ops.fused.max_pool_2x2", _max_pool_to_every_maximum), \
            mock.patch("cbam_jax.ops.fused.batch_norm_relu_pool_train",
                       _batch_norm_relu_pool_train):
        yield


# name: (what is wrong, how to make it so while the report runs)
NEGATIVE_CONTROLS = {
    "fc1-unpermuted": (
        "converter: fc1 without the (C, H, W) -> (H, W, C) flatten permutation",
        lambda: mock.patch("parity.convert._torch_to_flax_array", _fc1_unpermuted)),
    "flax-running-variance": (
        "BatchNorm: running_var updated with the biased batch variance, as Flax's does",
        lambda: mock.patch("cbam_jax.ops.reference.updated_running", _biased_running_update)),
    "adam-no-bias-correction": (
        "optimizer: Adam without bias correction",
        lambda: mock.patch("parity.report.make_optimizer", _adam_without_bias_correction)),
    "batchnorm-momentum-0.9": (
        "BatchNorm: momentum 0.9 (Flax's convention) where PyTorch's is 0.1",
        lambda: mock.patch("cbam_jax.layers.BatchNorm",
                           functools.partial(BatchNorm, momentum=0.9))),
    "spatial-gate-max-avg": (
        "spatial gate: its conv reads the [max, avg] maps where the tutorial has [avg, max]",
        lambda: mock.patch("cbam_jax.models.CBAM",
                           functools.partial(CBAM, spatial_pool_order=("max", "avg")))),
    "max-pool-gradient-to-every-maximum": (
        "max-pool: the gradient of a tied window sent to every maximum, not the first",
        _gradient_to_every_maximum),
}


def applied(name: str | None):
    """A context in which the JAX side has the named bug (none for None)."""
    if name is None:
        return contextlib.nullcontext()
    if name not in NEGATIVE_CONTROLS:
        raise ValueError(f"unknown negative control {name!r}: expected one of "
                         f"{', '.join(NEGATIVE_CONTROLS)}")
    return NEGATIVE_CONTROLS[name][1]()
