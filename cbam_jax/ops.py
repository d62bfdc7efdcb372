"""The layers' arithmetic, once: pure array functions shared by the Linen layers (layers.py)
and the NNX ones (nnx.py), so that the two front ends cannot drift apart.

- checks of the input (NHWC, floating point, non-empty, the channels the weights were built
  for), of pool names and kernel sizes;
- CBAM's pools, hidden-width rule and gating (`channel_attention`, `spatial_attention`);
- BatchNorm with PyTorch's semantics (`batch_norm`: batch or running statistics, and the
  running-statistics update);
- `max_pool_2x2` and `batch_norm_train`, whose hand-written gradients exist because autodiff of
  the plain versions takes XLA:CPU extra passes over the largest activations
  (docs/benchmarks.md has the profile). Each computes what its plain-JAX counterpart computes,
  up to float32 summation order.
"""
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax


# --- input checks ----------------------------------------------------------------------------

def check_nhwc(x, module: str) -> None:
    """Raise a ValueError naming the expected input unless x is a non-empty floating NHWC batch.

    Integer input is refused rather than computed: a gate in (0, 1) cast back to an integer
    dtype is 0, so `CBAM` would silently return zeros for uint8 images. Cast first, e.g.
    `x.astype(jnp.float32) / 255`.
    """
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 4:
        raise ValueError(f"{module} expects NHWC input [batch, height, width, channels], got "
                         f"shape {shape} (rank {None if shape is None else len(shape)})")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{module} expects floating-point input [batch, height, width, "
                         f"channels], got {x.dtype}: cast it first, e.g. "
                         f"x.astype(jnp.float32) / 255 for uint8 images")
    if 0 in shape[1:]:
        raise ValueError(f"{module} expects height, width and channels >= 1 in its NHWC input "
                         f"[batch, height, width, channels], got shape {tuple(shape)}")


def check_channels(x, channels: int, module: str) -> None:
    """Raise a ValueError naming the expected shape unless x has the `channels` its weights were
    built for (a Linen module learns them at `init`, an NNX module at construction)."""
    if x.shape[-1] != channels:
        raise ValueError(f"{module} params were built for {channels} channels: expected input "
                         f"[B, H, W, {channels}], got {tuple(x.shape)}")


def check_names(names, allowed: dict, field: str) -> None:
    if isinstance(names, str) or not names or any(n not in allowed for n in names):
        raise ValueError(f"{field} must be a non-empty sequence of {sorted(allowed)}, got {names!r}")


def check_kernel_size(k: int, module: str) -> None:
    if k < 1 or k % 2 == 0:
        # PyTorch's padding=k//2 with an even k makes the gate one pixel larger than x.
        raise ValueError(f"{module}.kernel_size must be odd and >= 1, got {k}")


# --- CBAM ------------------------------------------------------------------------------------

# Global pools over H, W for the channel gate: x [B, H, W, C] -> [B, C].
CHANNEL_POOLS = {
    "avg": lambda x: x.mean(axis=(1, 2)),
    "max": lambda x: x.max(axis=(1, 2)),
    # The official code's F.lp_pool2d(x, 2, (H, W)): sqrt of the sum (not the mean) of squares.
    "lp": lambda x: jnp.sqrt(jnp.square(x).sum(axis=(1, 2))),
    "lse": lambda x: jax.nn.logsumexp(x, axis=(1, 2)),
}
# Channel-wise pools for the spatial gate: x [B, H, W, C] -> [B, H, W].
SPATIAL_POOLS = {"avg": lambda x: x.mean(axis=-1), "max": lambda x: x.max(axis=-1)}


def reduced_width(channels: int, ratio: float = 16, hidden_features: int | None = None,
                  min_hidden: int = 1, rd_round: str = "floor") -> int:
    """Channel-MLP hidden width: `hidden_features`, else C // ratio ('floor') or round(C / ratio) ('nearest', timm)."""
    if hidden_features is not None:
        width = hidden_features
    elif ratio <= 0:
        raise ValueError(f"ChannelAttention.ratio must be > 0, got {ratio}")
    elif rd_round == "floor":  # the tutorial's and the official `C // ratio`
        width = int(channels // ratio)
    elif rd_round == "nearest":  # timm's make_divisible(C / ratio, 1, round_limit=0.)
        width = int(channels / ratio + 0.5)
    else:
        raise ValueError(f"rd_round must be 'floor' or 'nearest', got {rd_round!r}")
    return max(min_hidden, width)


def gate_input(x, attention):
    """x * attention, in x's dtype: the output follows the input's dtype (a bfloat16 module on
    float32 input computes its gate in bfloat16 and returns float32)."""
    return x * attention.astype(x.dtype)


def channel_attention(x, mlp: Callable, pool_types: Sequence[str], gate: Callable):
    """x [B, H, W, C] times gate(sum over pools p of mlp(p(x))), one gate per (batch, channel).

    `mlp` maps the stacked descriptors [P, B, C] -> [P, B, C] (one call for all pools); the
    sum runs in pool order, as the official loop adds them.
    """
    pooled = jnp.stack([CHANNEL_POOLS[p](x) for p in pool_types])  # [P, B, C]
    logits = mlp(pooled)
    summed = logits[0]
    for more in logits[1:]:
        summed = summed + more
    return gate_input(x, gate(summed)[:, None, None, :])


def spatial_attention(x, conv: Callable, pool_order: Sequence[str], gate: Callable):
    """(x times gate(conv(channel pools of x)), the gate [B, H, W, 1]).

    `conv` maps the stacked maps [B, H, W, P] -> logits [B, H, W, 1] (a BatchNorm after it,
    where a preset has one, belongs to `conv`).
    """
    maps = jnp.stack([SPATIAL_POOLS[p](x) for p in pool_order], axis=-1)  # [B, H, W, P]
    attention = gate(conv(maps))
    return gate_input(x, attention), attention


# --- BatchNorm with PyTorch's semantics ------------------------------------------------------

def batch_norm(x, scale, bias, running, *, train: bool, momentum: float, epsilon: float,
               dtype=None):
    """BatchNorm2d over the last axis with running = (mean, var): (y, updated running or None).

    Training normalises with the biased batch variance but, as PyTorch does, updates the running
    variance with the unbiased one (n / (n - 1)); Flax's own BatchNorm uses the biased one, which
    drifts the running statistics away from the tutorial's. `momentum` is PyTorch's:
    running = (1 - momentum) * running + momentum * batch. Statistics are float32; y is `dtype`
    (default: x's). Eval mode applies the running statistics as one affine map.
    """
    dtype = dtype or x.dtype
    running_mean, running_var = running
    if not train:
        inv = lax.rsqrt(running_var + epsilon) * scale.astype(jnp.float32)
        shift = bias.astype(jnp.float32) - running_mean * inv
        return (x.astype(jnp.float32) * inv + shift).astype(dtype), None
    n = x.size // x.shape[-1]
    if n < 2:  # the unbiased variance would divide by zero; PyTorch raises too
        raise ValueError(f"BatchNorm in training needs more than 1 value per channel, "
                         f"got input of shape {x.shape}")
    y, mean, var = batch_norm_train(x, scale, bias, epsilon)  # biased var
    unbiased = var * (n / (n - 1))
    new_mean = (1 - momentum) * running_mean + momentum * mean
    new_var = (1 - momentum) * running_var + momentum * unbiased
    return y.astype(dtype), (new_mean, new_var)


# --- custom-gradient kernels -----------------------------------------------------------------

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

