"""Small array ops whose JAX defaults are slow on XLA:CPU or differ from PyTorch's semantics.

Each op computes what its plain-JAX counterpart computes (up to float32 summation order); the
hand-written gradients exist because autodiff of the plain versions takes XLA:CPU extra passes
over the largest activations (docs/benchmarks.md has the profile).
"""
import jax
import jax.numpy as jnp
from jax import lax


@jax.custom_vjp
def max_pool_2x2(x):
    """`nn.MaxPool2d(2)` on NHWC: 2x2 windows, stride 2, odd trailing rows/columns dropped.

    x: [B, H, W, C] -> [B, H // 2, W // 2, C]. The gradient goes to the first maximum of each
    window in row-major order, as PyTorch's kernel does; JAX's own `reduce_window` gradient
    (select-and-scatter) costs about 30% of a CPU train step, this mask version much less.
    """
    return _windows(x).max(axis=(2, 4))


def _windows(x):
    b, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    x = x[:, : 2 * h2, : 2 * w2, :]
    return x.reshape(b, h2, 2, w2, 2, c)  # [B, H/2, dy, W/2, dx, C]


def _max_pool_fwd(x):
    y = max_pool_2x2(x)
    return y, (x, y)


def _max_pool_bwd(residuals, g):
    x, y = residuals
    b, h, w, c = x.shape
    windows = _windows(x)
    # Window elements in row-major order; each takes g only if it is the first maximum (ties
    # after ReLU are common: all-zero windows). Plain compares fuse into one pass, a cumsum
    # over the window did not.
    taken = jnp.zeros(y.shape, bool)
    grads = []
    for dy in (0, 1):
        for dx in (0, 1):
            hit = (windows[:, :, dy, :, dx, :] == y) & ~taken
            grads.append(jnp.where(hit, g, jnp.zeros((), g.dtype)))
            taken = taken | hit
    grad = jnp.stack([jnp.stack(grads[:2], axis=3), jnp.stack(grads[2:], axis=3)], axis=2)
    grad = grad.reshape(b, 2 * (h // 2), 2 * (w // 2), c)
    grad = jnp.pad(grad, ((0, 0), (0, h - 2 * (h // 2)), (0, w - 2 * (w // 2)), (0, 0)))
    return (grad,)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


@jax.custom_vjp
def batch_norm_train(x, scale, bias, epsilon):
    """Training-mode batch norm over all axes but the last, in float32.

    x: [..., C], scale/bias: [C] -> (y [..., C] float32, batch mean [C], biased batch var [C]).
    Same values as the two-pass formula; the gradient is the closed form (one reduction pass
    and one elementwise pass) instead of autodiff's chain of reductions.
    """
    y, mean, var, _ = _bn_forward(x, scale, bias, epsilon)
    return y, mean, var


def _bn_forward(x, scale, bias, epsilon):
    axes = tuple(range(x.ndim - 1))
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=axes)
    var = jnp.square(x32 - mean).mean(axis=axes)
    inv = lax.rsqrt(var + epsilon)
    gain = inv * scale.astype(jnp.float32)
    y = x32 * gain + (bias.astype(jnp.float32) - mean * gain)
    return y, mean, var, inv


def _bn_fwd(x, scale, bias, epsilon):
    y, mean, var, inv = _bn_forward(x, scale, bias, epsilon)
    return (y, mean, var), (x, scale, bias, mean, inv, epsilon)


def _bn_bwd(residuals, cotangents):
    x, scale, bias, mean, inv, epsilon = residuals
    g_y, g_mean, g_var = cotangents
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    centered = x.astype(jnp.float32) - mean
    g_y = g_y.astype(jnp.float32)
    sum_g = g_y.sum(axis=axes)
    sum_g_xhat = (g_y * centered).sum(axis=axes) * inv
    gain = inv * scale.astype(jnp.float32)
    # d/dx of (x - mean) * inv * scale + bias, plus the paths through the returned mean and var.
    g_x = (g_y - sum_g / n - centered * (inv * sum_g_xhat / n)) * gain
    g_x = g_x + g_mean / n + centered * (2.0 * g_var / n)
    return (g_x.astype(x.dtype), sum_g_xhat.astype(scale.dtype), sum_g.astype(bias.dtype),
            None)


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)

