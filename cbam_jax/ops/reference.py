"""The reference arithmetic: what CBAM, the tutorial's CBAM CNN and PyTorch's layers compute,
written plainly, with autodiff's gradients. Layers built with `fused=False` run it;
`cbam_jax.ops.fused` holds faster forms of these functions, each tested against them.

What to check it against:
- CBAM (Woo et al., ECCV 2018), eqs. (1)-(3): F' = M_c(F) * F, F'' = M_s(F') * F', with
  M_c(F) = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F))) over H x W, and
  M_s(F) = sigmoid(conv7x7([AvgPool(F); MaxPool(F)])) over channels;
- the tutorial's modules (parity/reference.py): the same, the MLP and conv bias-free;
- PyTorch's BatchNorm2d, ReLU, MaxPool2d(2), Conv2d(padding=k // 2) and Linear.

Arrays are NHWC: x [B, H, W, C].
"""
import jax
import jax.numpy as jnp
from jax import lax

# --- input checks ----------------------------------------------------------------------------

NHWC = "[batch, height, width, channels]"


def check_floating(x, module: str, layout: str = NHWC) -> None:
    """Raise a ValueError saying how to cast unless x is floating point.

    Integer input is refused rather than computed: a gate in (0, 1) cast back to an integer
    dtype is 0, so `CBAM` would silently return zeros for uint8 images, and a model would
    compute on 0-255 values.
    """
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{module} expects floating-point input {layout}, got {x.dtype}: "
                         f"cast it first, e.g. x.astype(jnp.float32) / 255 for uint8 images")


def check_nhwc(x, module: str) -> None:
    """Raise a ValueError naming the expected input unless x is a floating NHWC batch with
    height, width and channels >= 1 (any batch size, 0 included)."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 4:
        raise ValueError(f"{module} expects NHWC input {NHWC}, got shape {shape} (rank "
                         f"{None if shape is None else len(shape)})")
    check_floating(x, module)
    if 0 in shape[1:]:
        raise ValueError(f"{module} expects height, width and channels >= 1 in its NHWC input "
                         f"{NHWC}, got shape {tuple(shape)}")


def check_channels(x, channels: int, module: str) -> None:
    """Raise a ValueError naming the expected shape unless x has the `channels` its weights were
    built for (a Linen module learns them at `init`, an NNX module at construction)."""
    if x.shape[-1] != channels:
        raise ValueError(f"{module} params were built for {channels} channels: expected input "
                         f"[B, H, W, {channels}], got {tuple(x.shape)}")


def check_features(n: int, module: str, name: str = "in_features") -> None:
    """Raise a ValueError unless a layer is built for a channel count `n` >= 1."""
    if n < 1:
        raise ValueError(f"{module} expects {name} >= 1, got {n}")


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
# The tutorial's pools, in its order, for both gates.
TUTORIAL_POOLS = ("avg", "max")


def gate_input(x, attention):
    """x * attention, in x's dtype: the output follows the input's dtype (a bfloat16 module on
    float32 input computes its gate in bfloat16 and returns float32)."""
    return x * attention.astype(x.dtype)


def channel_attention(x, mlp, pool_types, gate):
    """x [B, H, W, C] times gate(sum over pools p of mlp(p(x))), one gate per (batch, channel).

    `mlp` maps the stacked descriptors [P, B, C] -> [P, B, C] (one call for all pools: the
    MLP is shared); the sum runs in pool order, as the official loop adds them.
    """
    pooled = jnp.stack([CHANNEL_POOLS[p](x) for p in pool_types])  # [P, B, C]
    logits = mlp(pooled)
    summed = logits[0]
    for more in logits[1:]:
        summed = summed + more
    return gate_input(x, gate(summed)[:, None, None, :])


def spatial_attention(x, conv, pool_order, gate):
    """(x times gate(conv(channel pools of x)), the gate [B, H, W, 1]).

    `conv` maps the stacked maps [B, H, W, P] -> logits [B, H, W, 1] (the k x k conv, and a
    BatchNorm after it where a preset has one).
    """
    maps = jnp.stack([SPATIAL_POOLS[p](x) for p in pool_order], axis=-1)  # [B, H, W, P]
    attention = gate(conv(maps))
    return gate_input(x, attention), attention


# --- convolution, dense, max-pool ------------------------------------------------------------

def conv_same(x, kernel):
    """Conv2d(padding=k // 2) without its bias, NHWC input and HWIO kernel: x [B, H, W, Cin],
    kernel [k, k, Cin, Cout] -> [B, H, W, Cout] (stride 1, odd k)."""
    kh, kw = kernel.shape[:2]
    pad = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    return lax.conv_general_dilated(x, kernel, (1, 1), pad,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


# The Dense layers' contraction, lhs [..., in] @ kernel [in, out]: nn.Dense's and nnx.Linear's
# own default.
dot_general = lax.dot_general


def max_pool_2x2(x):
    """MaxPool2d(2) on NHWC: 2x2 windows, stride 2, odd trailing rows/columns dropped.

    x: [B, H, W, C] -> [B, H // 2, W // 2, C]. The gradient of each window goes to its first
    maximum in row-major order, as PyTorch's: the window is scanned in that order and an
    element replaces the chosen one only if strictly greater (XLA's select-and-scatter with
    `ge`, autodiff's rule for reduce_window's max).
    """
    window = (1, 2, 2, 1)
    return lax.reduce_window(x, -jnp.inf, lax.max, window, window, "VALID")


# --- BatchNorm with PyTorch's semantics ------------------------------------------------------

def values_per_channel(x) -> int:
    """n, the values a training BatchNorm averages per channel (all axes but the last)."""
    n = x.size // x.shape[-1]
    if n < 2:  # the unbiased variance would divide by zero; PyTorch raises too
        raise ValueError(f"BatchNorm in training needs more than 1 value per channel, "
                         f"got input of shape {x.shape}")
    return n


def updated_running(running, mean, var, n: int, momentum: float):
    """PyTorch's update of (running mean, running var) from a batch's mean and biased var over
    n values: the variance enters unbiased (n / (n - 1)), where Flax's own BatchNorm keeps it
    biased; running = (1 - momentum) * running + momentum * batch."""
    running_mean, running_var = running
    unbiased = var * (n / (n - 1))
    return ((1 - momentum) * running_mean + momentum * mean,
            (1 - momentum) * running_var + momentum * unbiased)


def batch_norm(x, scale, bias, running, *, train: bool, momentum: float, epsilon: float,
               dtype=None):
    """BatchNorm2d over the last axis with running = (mean, var): (y, updated running or None).

    Training normalises with the batch mean and biased variance and updates the running
    statistics (`updated_running`); evaluation normalises with the running ones. Statistics
    are float32; y is `dtype` (default: x's).
    """
    dtype = dtype or x.dtype
    x32 = x.astype(jnp.float32)
    if train:
        axes = tuple(range(x.ndim - 1))
        mean = x32.mean(axis=axes)
        var = jnp.square(x32 - mean).mean(axis=axes)
        updated = updated_running(running, mean, var, values_per_channel(x), momentum)
    else:
        (mean, var), updated = running, None
    y = (x32 - mean) * lax.rsqrt(var + epsilon) * scale.astype(jnp.float32)
    return (y + bias.astype(jnp.float32)).astype(dtype), updated


# --- the tutorial's block --------------------------------------------------------------------

def conv_bn_relu_pool(x, kernel, conv_bias, scale, bias, running, *, train: bool,
                      momentum: float, epsilon: float, dtype=None):
    """`max_pool_2x2(relu(batch_norm(conv_same(x, kernel) + conv_bias)))`: CBAMCNN's block, with
    `batch_norm`'s arguments and result (y, updated running or None).

    x: [B, H, W, Cin], kernel [3, 3, Cin, C], conv_bias [C] -> y [B, H // 2, W // 2, C] in
    `dtype` (default: nn.Conv's promotion of x, kernel and bias).
    """
    dtype = dtype or jnp.result_type(x, kernel, conv_bias)
    h = conv_same(x.astype(dtype), kernel.astype(dtype)) + conv_bias.astype(dtype)
    z, updated = batch_norm(h, scale, bias, running, train=train, momentum=momentum,
                            epsilon=epsilon, dtype=dtype)
    return max_pool_2x2(jax.nn.relu(z)), updated
