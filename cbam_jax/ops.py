"""The layers' arithmetic, once: pure array functions shared by the Linen layers (layers.py,
models.py) and the NNX ones (nnx.py), so that the two front ends cannot drift apart.

- checks of the input (NHWC, floating point, non-empty, the channels the weights were built
  for), of pool names and kernel sizes;
- CBAM's pools, hidden-width rule and gating (`channel_attention`, `spatial_attention`), and
  the tutorial's CBAM as one op with a hand-written gradient (`cbam_tutorial`);
- BatchNorm with PyTorch's semantics (`batch_norm`: batch or running statistics, and the
  running-statistics update), and CBAMCNN's conv -> BatchNorm -> ReLU -> max-pool block
  (`conv_bn_relu_pool`), which skips the conv bias in training and folds BatchNorm into the
  conv in evaluation;
- the kernels under them: `conv_same`, `conv_same_toeplitz` (CBAM's spatial conv as one
  matmul), `max_pool_2x2`, `conv_pool_shift_relu` (with `conv_max_pool_2x2` and
  `pooled_conv_windows`, evaluation's conv + pool), `batch_norm_train` and
  `batch_norm_relu_pool_train`;
- `dense_dot_general`, the Dense layers' contraction with the kernel gradient computed in the
  kernel's layout (fc1 and fc2 of CBAMCNN pass it as `dot_general`).

The hand-written gradients exist because autodiff of the plain versions takes XLA:CPU extra
passes over the largest activations, or a transpose (docs/benchmarks.md has the profiles).
Each computes what its plain-JAX counterpart computes, up to float32 summation order
(tests/test_ops.py checks each against autodiff of the plain composition).
"""
import functools
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

    `conv` maps the stacked maps [B, H, W, P] -> logits [B, H, W, 1] (`spatial_conv`, and a
    BatchNorm after it where a preset has one).
    """
    maps = jnp.stack([SPATIAL_POOLS[p](x) for p in pool_order], axis=-1)  # [B, H, W, P]
    attention = gate(conv(maps))
    return gate_input(x, attention), attention


def spatial_conv(maps, kernel, bias=None, dtype=None):
    """The spatial gate's k x k 'same' conv, maps [B, H, W, P] -> logits [B, H, W, 1], as
    `conv_same_toeplitz` (plus `bias`), in `dtype` (default: nn.Conv's promotion of its
    inputs), what nn.Conv(1, (k, k), padding=k // 2) computes."""
    dtype = dtype or jnp.result_type(*(a for a in (maps, kernel, bias) if a is not None))
    y = conv_same_toeplitz(maps.astype(dtype), kernel.astype(dtype))
    return y if bias is None else y + bias.astype(dtype)


# The tutorial's pools, in its order, for both gates (cbam_tutorial).
TUTORIAL_POOLS = ("avg", "max")


@jax.custom_vjp
def cbam_tutorial(x, w1, w2, kernel):
    """The tutorial's CBAM as one op: what `channel_attention` then `spatial_attention` compute
    with its options, with a hand-written gradient.

    x: [B, H, W, C] float32; w1 [C, hidden], w2 [hidden, C]: the bias-free channel MLP
    (fc_0, fc_2, ReLU between); kernel [k, k, 2, 1]: the bias-free spatial conv over the
    channel-wise [mean, max] maps; sigmoid gates. Returns (out [B, H, W, C], the spatial gate
    [B, H, W, 1]). The gradient is autodiff's, ties of the two max-pools included (split
    evenly between tied maxima, as JAX's reduce_max rule does).

    Why: autodiff of the two gates makes XLA:CPU pass over x many times in the backward (each
    gate's product rule, the max-pools' indicators and tie counts, the means); here the
    backward recomputes x * channel gate where it needs it and takes its reductions in a few
    passes (about 4% of a CBAMCNN train step on CPU).
    """
    out, spatial_gate, _ = _cbam_forward(x, w1, w2, kernel)
    return out, spatial_gate


def _cbam_forward(x, w1, w2, kernel):
    pooled = jnp.stack([CHANNEL_POOLS[p](x) for p in TUTORIAL_POOLS])  # [2, B, C]
    hidden = jax.nn.relu(pooled @ w1)  # [2, B, hidden]
    logits = hidden @ w2
    channel_gate = jax.nn.sigmoid(logits[0] + logits[1])  # [B, C]
    x1 = gate_input(x, channel_gate[:, None, None, :])
    maps = jnp.stack([SPATIAL_POOLS[p](x1) for p in TUTORIAL_POOLS], axis=-1)  # [B, H, W, 2]
    spatial_gate = jax.nn.sigmoid(conv_same_toeplitz(maps, kernel))  # [B, H, W, 1]
    return gate_input(x1, spatial_gate), spatial_gate, (pooled, hidden, channel_gate, maps)


def _cbam_fwd(x, w1, w2, kernel):
    out, spatial_gate, saved = _cbam_forward(x, w1, w2, kernel)
    return (out, spatial_gate), (x, w1, w2, kernel, spatial_gate, *saved)


def _tie_split(values, maxima, axes):
    """reduce_max's gradient indicator: 1 / (number of tied maxima) at each maximum, else 0."""
    hit = values == maxima
    return jnp.where(hit, 1.0, 0.0) / hit.sum(axis=axes, keepdims=True)


def _cbam_bwd(residuals, cotangents):
    x, w1, w2, kernel, spatial_gate, pooled, hidden, channel_gate, maps = residuals
    g, g_gate = cotangents  # g_gate: the returned spatial gate's (zero unless it is used)
    b, h, w, c = x.shape
    gate4 = channel_gate[:, None, None, :]
    x1 = x * gate4  # recomputed: cheaper than a saved full-size residual
    # Spatial gate: out = x1 * s, s = sigmoid(conv(maps(x1))).
    g_s = ((g * x1).sum(axis=-1, keepdims=True) + g_gate) * spatial_gate * (1.0 - spatial_gate)
    _, conv_vjp = jax.vjp(conv_same_toeplitz, maps, kernel)
    g_maps, g_kernel = conv_vjp(g_s)
    g_x1 = (g * spatial_gate + g_maps[..., :1] / c
            + g_maps[..., 1:] * _tie_split(x1, maps[..., 1:], (-1,)))
    # Channel gate: x1 = x * a, a = sigmoid(mlp(avg x) + mlp(max x)).
    g_logit = (g_x1 * x).sum(axis=(1, 2)) * channel_gate * (1.0 - channel_gate)  # [B, C]
    g_hidden = (g_logit @ w2.T)[None] * (hidden > 0)  # [2, B, hidden]
    g_w2 = jnp.einsum("pbh,bc->hc", hidden, g_logit)
    g_w1 = jnp.einsum("pbc,pbh->ch", pooled, g_hidden)
    g_pooled = g_hidden @ w1.T  # [2, B, C]
    g_x = (g_x1 * gate4 + (g_pooled[0] / (h * w))[:, None, None, :]
           + g_pooled[1][:, None, None, :] * _tie_split(x, pooled[1][:, None, None, :], (1, 2)))
    return g_x, g_w1, g_w2, g_kernel


cbam_tutorial.defvjp(_cbam_fwd, _cbam_bwd)


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
    if not train:
        gain, shift = _running_affine(scale, bias, running, epsilon)
        return (x.astype(jnp.float32) * gain + shift).astype(dtype), None
    n = _values_per_channel(x)
    y, mean, var = batch_norm_train(x, scale, bias, epsilon)  # biased var
    return y.astype(dtype), _updated_running(running, mean, var, n, momentum)


def conv_bn_relu_pool(x, kernel, conv_bias, scale, bias, running, *, train: bool,
                      momentum: float, epsilon: float, dtype=None):
    """`max_pool_2x2(relu(batch_norm(conv_same(x, kernel) + conv_bias)))`: CBAMCNN's block, with
    `batch_norm`'s arguments and result (y, updated running or None).

    x: [B, H, W, Cin], kernel [3, 3, Cin, C], conv_bias [C] -> y [B, H // 2, W // 2, C] in
    `dtype` (default: nn.Conv's promotion of x, kernel and bias). Two rewrites, exact in exact
    arithmetic, make it faster than the plain composition (issue 12's CPU measurements, CPU
    time per CBAMCNN image: 1.01-1.03x for the bias skip and 1.04-1.11x for the fused op per
    train step, 1.08-1.15x for the fold per evaluation):
    - training skips the conv bias: BatchNorm's centring removes any per-channel shift, so the
      output is BatchNorm(conv(x)), and the bias only enters the running mean (the batch mean
      of conv + bias is mean + bias, PyTorch's update). Its gradient is exactly 0, where
      autodiff of the plain composition gives float32 noise around 0. In float32 the rest runs
      as one op, `batch_norm_relu_pool_train`; bfloat16 takes the plain ops.
    - evaluation folds BatchNorm into the conv (conv(x, k * gain) + b * gain + shift) and pools
      before adding that shift and ReLU (`conv_pool_shift_relu`), on a quarter of the values.
    """
    dtype = dtype or jnp.result_type(x, kernel, conv_bias)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if not train:
        gain, shift = _running_affine(scale, bias, running, epsilon)
        folded = (kernel.astype(jnp.float32) * gain).astype(dtype)
        return conv_pool_shift_relu(x, folded,
                                    conv_bias.astype(jnp.float32) * gain + shift), None
    h = conv_same(x, kernel)  # no bias: see above
    n = _values_per_channel(h)
    if h.dtype == jnp.float32 and h.shape[1] % 2 == 0 and h.shape[2] % 2 == 0:
        y, mean, var = batch_norm_relu_pool_train(h, scale, bias, epsilon)
    else:
        z, mean, var = batch_norm_train(h, scale, bias, epsilon)
        y = max_pool_2x2(jax.nn.relu(z.astype(dtype)))
    mean = mean + conv_bias.astype(jnp.float32)
    return y.astype(dtype), _updated_running(running, mean, var, n, momentum)


def _values_per_channel(x) -> int:
    n = x.size // x.shape[-1]
    if n < 2:  # the unbiased variance would divide by zero; PyTorch raises too
        raise ValueError(f"BatchNorm in training needs more than 1 value per channel, "
                         f"got input of shape {x.shape}")
    return n


def _running_affine(scale, bias, running, epsilon):
    """Eval-mode BatchNorm as y = x * gain + shift per channel, float32."""
    running_mean, running_var = running
    gain = lax.rsqrt(running_var + epsilon) * scale.astype(jnp.float32)
    return gain, bias.astype(jnp.float32) - running_mean * gain


def _updated_running(running, mean, var, n: int, momentum: float):
    """PyTorch's update of (running mean, running var) from a batch's mean and biased var."""
    running_mean, running_var = running
    unbiased = var * (n / (n - 1))
    return ((1 - momentum) * running_mean + momentum * mean,
            (1 - momentum) * running_var + momentum * unbiased)


# --- convolutions ----------------------------------------------------------------------------

def conv_same(x, kernel):
    """Stride-1 'same' convolution, NHWC input and HWIO kernel: what nn.Conv computes with
    padding k // 2, without its bias."""
    kh, kw = kernel.shape[:2]
    pad = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    return lax.conv_general_dilated(x, kernel, (1, 1), pad,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_same_toeplitz(x, kernel):
    """`conv_same` for a few channels in and one out (CBAM's k x k spatial gate) as one matmul.

    x: [B, H, W, C] (C = 2 in CBAM), kernel [k, k, C, 1] -> [B, H, W, 1]. XLA:CPU runs this
    conv (2 -> 1 channels, 7x7) with its generic convolution at ~2 GFLOP/s, 5-8% of an eval
    pass of CBAMCNN; as a matmul over image rows it is a dense GEMM: each output row is the k
    padded input rows it sees, [k * (W + k - 1) * C], times a banded (Toeplitz) matrix built
    from the kernel, [k * (W + k - 1) * C, W]. The band is built by an einsum with a constant
    0/1 tensor, so the kernel's gradient is a small einsum too. It does W + k - 1 times the
    conv's multiplications per output, which pays for the small maps of CBAM's gates.
    """
    b, h, w, c = x.shape
    k = kernel.shape[0]
    p = k // 2
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))  # [B, H + 2p, W + 2p, C]
    wp = w + 2 * p
    rows = jnp.stack([xp[:, i:i + h] for i in range(k)], axis=2)  # [B, H, k, W + 2p, C]
    rows = rows.reshape(b * h, k * wp * c)
    # shift[j, u, v] = 1 where input column u feeds output column v through kernel column j.
    shift = (jnp.arange(wp)[None, :, None]
             == jnp.arange(w)[None, None, :] + jnp.arange(k)[:, None, None]).astype(x.dtype)
    band = jnp.einsum("ijco,juv->iucvo", kernel, shift)[..., 0]  # [k, W + 2p, C, W]
    out = rows @ band.reshape(k * wp * c, w)  # [B * H, W]
    return out.reshape(b, h, w, 1)


# --- dense ---------------------------------------------------------------------------------

def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                      out_sharding=None):
    """`lax.dot_general` as `nn.Dense` / `nnx.Linear` call it (lhs [..., in] @ kernel [in, out]),
    with the kernel's gradient computed in the kernel's own [in, out] layout (lhs^T @ g).

    Autodiff computes that gradient as g^T @ lhs, [out, in], and transposes it. On one device
    XLA folds the transpose into the dot; under a data-parallel mesh the all-reduce of the
    batch sum sits between them, so the transpose lands in the optimizer's update instead: a
    strided pass over fc1's 1M-parameter kernel per Adam moment, 18% of CBAMCNN's train step
    on 2 CPU devices (docs/benchmarks.md). Pass it as `dot_general=` to the Dense layer.
    """
    (lhs_contract, rhs_contract), batch_dims = dimension_numbers
    if (tuple(lhs_contract), tuple(rhs_contract)) != ((lhs.ndim - 1,), (0,)) or rhs.ndim != 2 \
            or any(batch_dims):
        raise ValueError("dense_dot_general computes lhs [..., in] @ kernel [in, out] "
                         "(dimension_numbers (((lhs.ndim - 1,), (0,)), ((), ()))), got "
                         f"{dimension_numbers} for shapes {lhs.shape} and {rhs.shape}")
    return _dense(lhs, rhs, precision, preferred_element_type, out_sharding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dense(lhs, rhs, precision, preferred_element_type, out_sharding):
    return _dense_forward(lhs, rhs, precision, preferred_element_type, out_sharding)


def _dense_forward(lhs, rhs, precision, preferred_element_type, out_sharding):
    return lax.dot_general(lhs, rhs, (((lhs.ndim - 1,), (0,)), ((), ())), precision,
                           preferred_element_type, out_sharding=out_sharding)


def _dense_fwd(lhs, rhs, precision, preferred_element_type, out_sharding):
    out = _dense_forward(lhs, rhs, precision, preferred_element_type, out_sharding)
    return out, (lhs, rhs)


def _dense_bwd(precision, _, __, residuals, g):
    lhs, rhs = residuals
    leading = tuple(range(lhs.ndim - 1))
    d_lhs = lax.dot_general(g, rhs, (((g.ndim - 1,), (1,)), ((), ())), precision)
    d_rhs = lax.dot_general(lhs, g, ((leading, leading), ((), ())), precision)  # [in, out]
    return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


# --- max-pooling -----------------------------------------------------------------------------

def _windows(x):
    b, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    x = x[:, : 2 * h2, : 2 * w2, :]
    return x.reshape(b, h2, 2, w2, 2, c)  # [B, H/2, dy, W/2, dx, C]


def _quadrants(x):
    """The 2x2 windows' four elements in row-major order: 4 x [B, H/2, W/2, C] (odd trailing
    rows/columns dropped). Slices of a reshape, which XLA fuses into the consumer's loop."""
    windows = _windows(x)
    return [windows[:, :, dy, :, dx, :] for dy in (0, 1) for dx in (0, 1)]


def _max_of_quadrants(quadrants):
    """The elementwise max of the four `_quadrants`: each 2x2 window's maximum."""
    return jnp.maximum(jnp.maximum(quadrants[0], quadrants[1]),
                       jnp.maximum(quadrants[2], quadrants[3]))


def _from_quadrants(parts, shape):
    """Inverse of `_quadrants`: the four [B, H/2, W/2, C] parts interleaved back to `shape`,
    zero on the odd trailing rows/columns."""
    b, h, w, c = shape
    full = jnp.stack([jnp.stack(parts[:2], axis=3), jnp.stack(parts[2:], axis=3)], axis=2)
    full = full.reshape(b, 2 * (h // 2), 2 * (w // 2), c)
    return jnp.pad(full, ((0, 0), (0, h - 2 * (h // 2)), (0, w - 2 * (w // 2)), (0, 0)))


def _first_maxima(quadrants, maxima, taken):
    """Per quadrant, where the window's gradient goes: the first element (row-major) equal to
    its window's `maxima`, in windows not already `taken`, as PyTorch's max-pool kernel routes.
    Plain compares fuse into one pass; a cumsum over the window did not."""
    hits = []
    for q in quadrants:
        hit = (q == maxima) & ~taken
        taken = taken | hit
        hits.append(hit)
    return hits


@jax.custom_vjp
def max_pool_2x2(x):
    """`nn.MaxPool2d(2)` on NHWC: 2x2 windows, stride 2, odd trailing rows/columns dropped.

    x: [B, H, W, C] -> [B, H // 2, W // 2, C]. The gradient goes to the first maximum of each
    window in row-major order, as PyTorch's kernel does; JAX's own `reduce_window` gradient
    (select-and-scatter) costs about 30% of a CPU train step, this mask version much less.
    """
    return _windows(x).max(axis=(2, 4))


def _max_pool_fwd(x):
    y = max_pool_2x2(x)
    return y, (x, y)


def _max_pool_bwd(residuals, g):
    return _max_pool_backward(residuals, g, _first_maxima)


def _max_pool_backward(residuals, g, route: Callable):
    """max_pool_2x2's gradient, sent where `route` (`_first_maxima`'s signature) says."""
    x, y = residuals
    # Ties after ReLU are common (all-zero windows): only the first maximum takes g.
    hits = route(_quadrants(x), y, jnp.zeros(y.shape, bool))
    return (_from_quadrants([jnp.where(hit, g, jnp.zeros((), g.dtype)) for hit in hits],
                            x.shape),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def conv_pool_shift_relu(x, kernel, shift):
    """`max_pool_2x2(relu(conv_same(x, kernel) + shift))` for a per-channel shift [C], pooling
    first. Evaluation only (no gradient is written).

    Eval mode of a conv block whose BatchNorm is folded into the conv: adding a per-channel
    constant and ReLU are monotone, so they commute exactly with the max (rounding is monotone
    too), and run on the pooled tensor, a quarter of the size. The pooled conv is
    `conv_max_pool_2x2`. The result is written once for CBAM's three passes over it
    (`computed_once`).
    """
    pooled = conv_max_pool_2x2(x, kernel)
    return computed_once(jnp.maximum(pooled + shift.astype(pooled.dtype), 0),
                         jnp.isfinite(shift[0]))


# Input channels up to which `conv_max_pool_2x2` takes the window matmul on a CPU: measured
# against XLA's convolution plus the pool (3x3 kernel, 32 output channels, 32x32 images, 256
# images on 2 CPU devices): 2.2x at 1 input channel, 1.65x at 3, 1.5x at 4, 1.2x at 6, 0.44x
# at 8 (docs/benchmarks.md).
WINDOW_MATMUL_MAX_CHANNELS = 4


def conv_max_pool_2x2(x, kernel):
    """`max_pool_2x2(conv_same(x, kernel))`: the direct conv, then the max of each 2x2 window's
    four elements; on a CPU, for float32 input of a few channels (CBAMCNN's RGB conv1),
    `pooled_conv_windows` instead. Evaluation only (no gradient is written).

    The max is four slices and an elementwise max, not a reduce: XLA:CPU's YNNPACK reduce
    fusion pulls the producing convolution into itself (even with YNNPACK convolutions off) and
    ran conv1 + pool there at a tenth of the Eigen convolution's speed.
    """
    def direct(x, kernel):
        return _max_of_quadrants(_quadrants(conv_same(x, kernel)))
    kh, kw = kernel.shape[:2]
    if (x.shape[-1] > WINDOW_MATMUL_MAX_CHANNELS or x.dtype != jnp.float32 or kh != kw
            or kh % 2 == 0 or min(x.shape[1:3]) < 2):
        return direct(x, kernel)
    return lax.platform_dependent(x, kernel, cpu=pooled_conv_windows, default=direct)


def pooled_conv_windows(x, kernel):
    """`max_pool_2x2(conv_same(x, kernel))` as one matmul over the input windows of the pooled
    pixels, for a square odd kernel k x k.

    The four conv outputs of a 2x2 pooling window see one (k + 1) x (k + 1) window of the padded
    input. That window, flattened to [(k + 1)^2 * Cin], times a [(k + 1)^2 * Cin, 4 * Cout]
    matrix holding the kernel at the four offsets (zeros elsewhere), gives the four outputs
    side by side; the max of the four column blocks is the pool. For k = 3 that is 16/9 of the
    conv's multiplications, but as one dense matmul, and the full-resolution conv output (33 MB
    per 256 CIFAR images after conv1) is never written: XLA:CPU's convolution with 3 input
    channels runs far below its speed with more. The sums are the conv's products plus exact
    zeros, so values equal the conv's up to float32 summation order; only a non-finite input
    differs in kind (0 * inf is NaN where the conv gives inf, within the same pooled pixel).
    """
    b, h, w, c = x.shape
    k, cout = kernel.shape[0], kernel.shape[-1]
    p, span = k // 2, k + 1
    h2, w2 = h // 2, w // 2  # odd trailing rows/columns are dropped, as max_pool_2x2 does
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    windows = jnp.concatenate([padded[:, dy:dy + 2 * h2 - 1:2, dx:dx + 2 * w2 - 1:2]
                               for dy in range(span) for dx in range(span)], axis=-1)
    at_offsets = jnp.stack([jnp.pad(kernel, ((dy, 1 - dy), (dx, 1 - dx), (0, 0), (0, 0)))
                            for dy in (0, 1) for dx in (0, 1)], axis=3)  # [span, span, C, 4, Cout]
    y = windows @ at_offsets.reshape(span * span * c, 4 * cout)  # [B, H/2, W/2, 4 * Cout]
    return _max_of_quadrants([y[..., i * cout:(i + 1) * cout] for i in range(4)])


def computed_once(x, flag):
    """x, written to memory once for all its readers on a CPU; elsewhere x itself.

    XLA:CPU fuses a cheap elementwise producer into each of its consumers, so CBAM's three
    passes over a pooled block output each recomputed the pooling from the 4x larger conv
    output (docs/benchmarks.md); the result of a conditional is a buffer of its own, which no
    fusion crosses. Both branches return x exactly (times 1 is exact in IEEE arithmetic, NaN and
    -0 included; XLA removes a conditional whose branches are identical), so the value is x
    whatever the predicate. `flag` is any boolean scalar computed at run time (XLA folds a
    constant predicate away) that every device holds, so that reading it needs no collective.
    """
    def own_buffer(x):
        return lax.cond(flag, lambda v: v, lambda v: v * 1, x)
    return lax.platform_dependent(x, cpu=own_buffer, default=lambda x: x)


# --- training-mode BatchNorm -----------------------------------------------------------------

def _batch_statistics(x32, scale, bias, epsilon):
    """Per-channel batch mean, biased var, 1 / std, and the affine map y = x * gain + shift that
    normalises (float32; over all axes but the last)."""
    axes = tuple(range(x32.ndim - 1))
    mean = x32.mean(axis=axes)
    var = jnp.square(x32 - mean).mean(axis=axes)
    inv = lax.rsqrt(var + epsilon)
    gain = inv * scale.astype(jnp.float32)
    return mean, var, inv, gain, bias.astype(jnp.float32) - mean * gain


def _input_gradient_terms(sum_g, sum_g_xhat, n, inv, gain, g_mean, g_var):
    """BatchNorm's input gradient, per channel, is g_x = gain * g_y - offset - (x - mean) * slope
    (g_y the output's gradient); returns (offset, slope), including the paths through the
    returned batch mean and var. sum_g = sum of g_y, sum_g_xhat = sum of g_y * x-hat."""
    offset = gain * sum_g / n - g_mean.astype(jnp.float32) / n
    slope = gain * inv * sum_g_xhat / n - 2.0 * g_var.astype(jnp.float32) / n
    return offset, slope


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
    x32 = x.astype(jnp.float32)
    mean, var, inv, gain, shift = _batch_statistics(x32, scale, bias, epsilon)
    return x32 * gain + shift, mean, var, (inv, gain)


def _bn_fwd(x, scale, bias, epsilon):
    y, mean, var, (inv, gain) = _bn_forward(x, scale, bias, epsilon)
    return (y, mean, var), (x, scale, bias, mean, inv, gain)


def _bn_bwd(residuals, cotangents):
    x, scale, bias, mean, inv, gain = residuals
    g_y, g_mean, g_var = cotangents
    axes = tuple(range(x.ndim - 1))
    centered = x.astype(jnp.float32) - mean
    g_y = g_y.astype(jnp.float32)
    sum_g = g_y.sum(axis=axes)
    sum_g_xhat = (g_y * centered).sum(axis=axes) * inv
    offset, slope = _input_gradient_terms(sum_g, sum_g_xhat, x.size // x.shape[-1], inv, gain,
                                          g_mean, g_var)
    g_x = gain * g_y - offset - centered * slope
    return (g_x.astype(x.dtype), sum_g_xhat.astype(scale.dtype), sum_g.astype(bias.dtype),
            None)


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


@jax.custom_vjp
def batch_norm_relu_pool_train(x, scale, bias, epsilon):
    """`max_pool_2x2(relu(batch_norm_train(x)))` in one custom-gradient op.

    x: [B, H, W, C] float32 with H and W even; scale, bias: [C]. Returns (y [B, H/2, W/2, C],
    batch mean [C], biased batch var [C]), the values of the three ops in a row. The gradient
    goes, as theirs, to the first maximum of each window in row-major order, and only where
    that maximum is positive (ReLU's gradient is 0 at 0); the maximum is taken on x (for
    scale < 0, the minimum), which can differ from the three ops' routing only where two
    distinct x of a window normalise to the same float32 value.

    Why: autodiff of the three ops makes XLA:CPU pass over the full-resolution activation
    [B, H, W, C] many times (normalise, ReLU, window copy, pool mask, select, BatchNorm's
    reductions). Here the forward reads it three times (mean, variance, and each window's
    maximum before normalisation) and the backward once: BatchNorm's gradient reductions run
    over the pooled tensors, since the pooled gradient is non-zero only at each window's
    maximum, whose x-hat the forward kept.
    """
    y, mean, var, _ = _bnrp_forward(x, scale, bias, epsilon)
    return y, mean, var


def _bnrp_forward(x, scale, bias, epsilon):
    b, h, w, c = x.shape
    if h % 2 or w % 2 or x.dtype != jnp.float32:
        raise ValueError(f"batch_norm_relu_pool_train needs float32 [B, H, W, C] with even H "
                         f"and W, got {x.dtype} {x.shape}")
    mean, var, inv, gain, shift = _batch_statistics(x, scale, bias, epsilon)
    # The window maximum before normalisation: the largest x where gain > 0, the smallest
    # where gain < 0 (the windows' maxima of x * sign(gain)), the first where gain == 0
    # (all tie; the gradient goes to the first). x-hat there is what BatchNorm's gradient needs,
    # and, rounding being monotone, max(x * gain + shift) == best_x * gain + shift exactly, so
    # the output needs no second pass. The max of four slices runs faster on XLA:CPU than a
    # reduce (YNNPACK's reduce fusion); `computed_once` keeps XLA from recomputing it inside
    # each of its consumers (the output, the saved residual, the next conv's input).
    sign = jnp.where(gain < 0, -1.0, 1.0).astype(jnp.float32)
    window_max = _max_of_quadrants(_quadrants(x * sign)) * sign
    best_x = computed_once(jnp.where(gain == 0, _quadrants(x)[0], window_max),
                           jnp.isfinite(scale[0]))
    y = jnp.maximum(best_x * gain + shift, 0.0)
    return y, mean, var, (inv, gain, best_x)


def _bnrp_fwd(x, scale, bias, epsilon):
    y, mean, var, (inv, gain, best_x) = _bnrp_forward(x, scale, bias, epsilon)
    return (y, mean, var), (x, scale, bias, y, mean, inv, gain, best_x)


def _bnrp_bwd(residuals, cotangents):
    x, scale, bias, y, mean, inv, gain, best_x = residuals
    g_y, g_mean, g_var = cotangents
    b, h, w, c = x.shape
    axes = (0, 1, 2)
    # The gradient of the BatchNorm output, pooled: g_y at each window's maximum where it is > 0.
    positive = y > 0
    g = jnp.where(positive, g_y.astype(jnp.float32), 0.0)  # [B, H/2, W/2, C]
    sum_g = g.sum(axis=axes)
    sum_g_xhat = (g * (best_x - mean)).sum(axis=axes) * inv
    offset, slope = _input_gradient_terms(sum_g, sum_g_xhat, b * h * w, inv, gain, g_mean,
                                          g_var)
    routed = gain * g
    # Route to the first window element equal to the maximum's x (exact: no arithmetic to
    # redo, so nothing depends on XLA contracting x * gain + shift the same way twice).
    quadrants = _quadrants(x)
    hits = _first_maxima(quadrants, best_x, ~positive)
    g_x = _from_quadrants([jnp.where(hit, routed, 0.0) - offset - (q - mean) * slope
                           for q, hit in zip(quadrants, hits)], x.shape)
    return g_x, sum_g_xhat.astype(scale.dtype), sum_g.astype(bias.dtype), None


batch_norm_relu_pool_train.defvjp(_bnrp_fwd, _bnrp_bwd)
