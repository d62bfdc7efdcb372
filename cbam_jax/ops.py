"""Small array ops whose JAX defaults are slow or differ from PyTorch's semantics."""
import jax
import jax.numpy as jnp


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
    is_max = windows == y[:, :, None, :, None, :]
    # Keep only the first maximum of each window (ties after ReLU are common: all-zero windows).
    flat = is_max.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4, c)
    first = flat & (jnp.cumsum(flat, axis=3) == 1)
    first = first.reshape(b, h // 2, w // 2, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    grad = jnp.where(first, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
    grad = grad.reshape(b, 2 * (h // 2), 2 * (w // 2), c)
    grad = jnp.pad(grad, ((0, 0), (0, h - 2 * (h // 2)), (0, w - 2 * (w // 2)), (0, 0)))
    return (grad,)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)
