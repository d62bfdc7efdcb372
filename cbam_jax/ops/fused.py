"""Faster forms of `cbam_jax.ops.reference`'s functions: what the layers run with `fused=True`
(the default).

Each function here says which reference function it equals and which measurement in
docs/benchmarks.md keeps it. "Equals" means the same values up to float32 summation order, and
the same gradients, ties of max-pools included; tests/test_ops.py holds each to its reference.
They exist because XLA:CPU runs the plain compositions with extra passes over the largest
activations (autodiff of BatchNorm, ReLU and the pools; the gates' product rules), a slow
generic convolution for CBAM's 2 -> 1 channel 7x7 conv, or a transpose under data
parallelism. Most are hand-written gradients (`jax.custom_vjp`); a few choose a form per
backend (`lax.platform_dependent`), keeping the plain one elsewhere.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from cbam_jax.ops import reference

# --- CBAM ------------------------------------------------------------------------------------


def conv_same_toeplitz(x, kernel):
    """Equals `reference.conv_same` for one output channel: CBAM's k x k spatial conv as one
    matmul. Kept by docs/benchmarks.md, "Design decisions", row "CBAM's 7x7 spatial conv as one
    matmul".

    x: [B, H, W, C] (C = 2 in CBAM), kernel [k, k, C, 1] -> [B, H, W, 1]. XLA:CPU runs this
    conv (2 -> 1 channels, 7x7) with its generic convolution at ~2 GFLOP/s; as a matmul over
    image rows it is a dense GEMM: each output row is the k padded input rows it sees,
    [k * (W + k - 1) * C], times a banded (Toeplitz) matrix built from the kernel,
    [k * (W + k - 1) * C, W]. The band is built by an einsum with a constant 0/1 tensor, so the
    kernel's gradient is a small einsum too. It does W + k - 1 times the conv's multiplications
    per output, which pays for the small maps of CBAM's gates.
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


@jax.custom_vjp
def cbam_tutorial(x, w1, w2, kernel):
    """Equals `reference.channel_attention` then `reference.spatial_attention` with the
    tutorial's options, as one op with a hand-written gradient. Kept by docs/benchmarks.md,
    "Design decisions", row "the tutorial's CBAM as one custom-gradient op".

    x: [B, H, W, C] float32; w1 [C, hidden], w2 [hidden, C]: the bias-free channel MLP
    (fc_0, fc_2, ReLU between); kernel [k, k, 2, 1]: the bias-free spatial conv over the
    channel-wise [mean, max] maps; sigmoid gates. Returns (out [B, H, W, C], the spatial gate
    [B, H, W, 1]). The gradient is autodiff's, ties of the two max-pools included (split
    evenly between tied maxima, as JAX's reduce_max rule does).

    Autodiff of the two gates makes XLA:CPU pass over x many times in the backward (each gate's
    product rule, the max-pools' indicators and tie counts, the means); here the backward
    recomputes x * channel gate where it needs it and takes its reductions in a few passes.
    """
    out, spatial_gate, _ = _cbam_forward(x, w1, w2, kernel)
    return out, spatial_gate


def _cbam_forward(x, w1, w2, kernel):
    pools = reference.TUTORIAL_POOLS
    pooled = jnp.stack([reference.CHANNEL_POOLS[p](x) for p in pools])  # [2, B, C]
    hidden = jax.nn.relu(pooled @ w1)  # [2, B, hidden]
    logits = hidden @ w2
    channel_gate = jax.nn.sigmoid(logits[0] + logits[1])  # [B, C]
    x1 = reference.gate_input(x, channel_gate[:, None, None, :])
    maps = jnp.stack([reference.SPATIAL_POOLS[p](x1) for p in pools], axis=-1)  # [B, H, W, 2]
    spatial_gate = jax.nn.sigmoid(conv_same_toeplitz(maps, kernel))  # [B, H, W, 1]
    return (reference.gate_input(x1, spatial_gate), spatial_gate,
            (pooled, hidden, channel_gate, maps))


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


# --- BatchNorm -------------------------------------------------------------------------------

def batch_norm(x, scale, bias, running, *, train: bool, momentum: float, epsilon: float,
               dtype=None):
    """Equals `reference.batch_norm`: training through `batch_norm_train`'s closed-form
    gradient (kept as that op is), evaluation as one affine map per channel
    (`_running_affine`, as the folded blocks apply it)."""
    dtype = dtype or x.dtype
    if not train:
        gain, shift = _running_affine(scale, bias, running, epsilon)
        return (x.astype(jnp.float32) * gain + shift).astype(dtype), None
    n = reference.values_per_channel(x)
    y, mean, var = batch_norm_train(x, scale, bias, epsilon)  # biased var
    return y.astype(dtype), reference.updated_running(running, mean, var, n, momentum)


def _running_affine(scale, bias, running, epsilon):
    """Eval-mode BatchNorm as y = x * gain + shift per channel, float32."""
    running_mean, running_var = running
    gain = lax.rsqrt(running_var + epsilon) * scale.astype(jnp.float32)
    return gain, bias.astype(jnp.float32) - running_mean * gain


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
    """Equals `reference.batch_norm`'s training statistics and output (in float32), with the
    closed-form gradient (one reduction pass and one elementwise pass) instead of autodiff's
    chain of reductions. `batch_norm_relu_pool_train` builds on its gradient; on its own
    (bfloat16, odd sizes) it has no row in docs/benchmarks.md: an in-process ablation on 2 CPU
    cores measured the model without it at 0.88x, in CPU time per image.

    x: [..., C], scale/bias: [C] -> (y [..., C] float32, batch mean [C], biased batch var [C]).
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


# --- CBAMCNN's block -------------------------------------------------------------------------

def conv_bn_relu_pool(x, kernel, conv_bias, scale, bias, running, *, train: bool,
                      momentum: float, epsilon: float, dtype=None):
    """Equals `reference.conv_bn_relu_pool` (same arguments and result). Kept by
    docs/benchmarks.md, "Design decisions", rows "no conv bias in training", "BatchNorm + ReLU +
    max-pool as one custom-gradient op" and "BatchNorm folded into the conv in evaluation".

    Two rewrites, exact in exact arithmetic:
    - training skips the conv bias: BatchNorm's centring removes any per-channel shift, so the
      output is BatchNorm(conv(x)), and the bias only enters the running mean (the batch mean
      of conv + bias is mean + bias, PyTorch's update). Its gradient is exactly 0, where
      autodiff of the reference gives float32 noise around 0. In float32 the rest runs as one
      op, `batch_norm_relu_pool_train`; bfloat16 and odd sizes take `batch_norm_train` and
      `max_pool_2x2`.
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
    h = reference.conv_same(x, kernel)  # no bias: see above
    n = reference.values_per_channel(h)
    if h.dtype == jnp.float32 and h.shape[1] % 2 == 0 and h.shape[2] % 2 == 0:
        y, mean, var = batch_norm_relu_pool_train(h, scale, bias, epsilon)
    else:
        z, mean, var = batch_norm_train(h, scale, bias, epsilon)
        y = max_pool_2x2(jax.nn.relu(z.astype(dtype)))
    mean = mean + conv_bias.astype(jnp.float32)
    return y.astype(dtype), reference.updated_running(running, mean, var, n, momentum)


@jax.custom_vjp
def batch_norm_relu_pool_train(x, scale, bias, epsilon):
    """Equals `reference.max_pool_2x2(relu(...))` of `batch_norm_train`'s output, with its
    batch statistics, as one op with a hand-written gradient. Kept by docs/benchmarks.md,
    "Design decisions", row "BatchNorm + ReLU + max-pool as one custom-gradient op"; its window
    max as four slices written once by row "the training window max as four slices, written
    once".

    x: [B, H, W, C] float32 with H and W even; scale, bias: [C]. Returns (y [B, H/2, W/2, C],
    batch mean [C], biased batch var [C]). The gradient goes, as theirs, to the first maximum
    of each window in row-major order, and only where that maximum is positive (ReLU's gradient
    is 0 at 0); the maximum is taken on x (for scale < 0, the minimum), which can differ from
    the three ops' routing only where two distinct x of a window normalise to the same float32
    value.

    Autodiff of the three ops makes XLA:CPU pass over the full-resolution activation
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


def conv_pool_shift_relu(x, kernel, shift):
    """Equals `reference.max_pool_2x2(relu(reference.conv_same(x, kernel) + shift))` for a
    per-channel shift [C], pooling first. Evaluation only (no gradient is written). Kept by
    docs/benchmarks.md, "Design decisions", row "BatchNorm folded into the conv in evaluation".

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
# at 8 (the engine's evaluation: docs/benchmarks.md, row "conv1 + pool as one matmul in
# evaluation").
WINDOW_MATMUL_MAX_CHANNELS = 4


def conv_max_pool_2x2(x, kernel):
    """Equals `reference.max_pool_2x2(reference.conv_same(x, kernel))`: the direct conv, then
    the max of each 2x2 window's four elements; on a CPU, for float32 input of a few channels
    (CBAMCNN's RGB conv1), `pooled_conv_windows` instead. Evaluation only (no gradient is
    written). Kept by docs/benchmarks.md, "Design decisions", row "conv1 + pool as one matmul in
    evaluation"; the four-slice max by the row "the evaluation pool as `lax.reduce_window`, or as
    a reduce over the window axes" (0.995x, 0.869x) of the forms tried and not kept.

    The max is four slices and an elementwise max, not a reduce: XLA:CPU's YNNPACK reduce
    fusion pulls the producing convolution into itself (even with YNNPACK convolutions off) and
    ran conv1 + pool there at a tenth of the Eigen convolution's speed.
    """
    def direct(x, kernel):
        return _max_of_quadrants(_quadrants(reference.conv_same(x, kernel)))
    kh, kw = kernel.shape[:2]
    if (x.shape[-1] > WINDOW_MATMUL_MAX_CHANNELS or x.dtype != jnp.float32 or kh != kw
            or kh % 2 == 0 or min(x.shape[1:3]) < 2):
        return direct(x, kernel)
    return lax.platform_dependent(x, kernel, cpu=pooled_conv_windows, default=direct)


def pooled_conv_windows(x, kernel):
    """Equals `reference.max_pool_2x2(reference.conv_same(x, kernel))` for a square odd kernel,
    as one matmul over the input windows of the pooled pixels. Kept by
    docs/benchmarks.md, "Design decisions", row "conv1 + pool as one matmul in evaluation" (the
    engine's evaluation 1.073x).

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
    """Equals x, written to memory once for all its readers on a CPU; elsewhere x itself. Kept
    by docs/benchmarks.md, "Design decisions", rows "each pooled block output written once"
    (evaluation 1.048x) and "the training window max as four slices, written once".

    XLA:CPU fuses a cheap elementwise producer into each of its consumers, so CBAM's three
    passes over a pooled block output each recomputed the pooling from the 4x larger conv
    output; the result of a conditional is a buffer of its own, which no fusion crosses. Both
    branches return x exactly (times 1 is exact in IEEE arithmetic, NaN and -0 included; XLA
    removes a conditional whose branches are identical), so the value is x whatever the
    predicate. `flag` is any boolean scalar computed at run time (XLA folds a constant
    predicate away) that every device holds, so that reading it needs no collective.
    """
    def own_buffer(x):
        return lax.cond(flag, lambda v: v, lambda v: v * 1, x)
    return lax.platform_dependent(x, cpu=own_buffer, default=lambda x: x)


# --- max-pool --------------------------------------------------------------------------------

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
    """Equals `reference.max_pool_2x2`, its gradient routed by compares (the first maximum of
    each window in row-major order) instead of XLA's select-and-scatter. It has no row of its
    own in docs/benchmarks.md: an in-process ablation on 2 CPU cores measured the model without
    it at 0.88x, in CPU time per image.

    x: [B, H, W, C] -> [B, H // 2, W // 2, C]; odd trailing rows/columns dropped.
    """
    return _windows(x).max(axis=(2, 4))


def _max_pool_fwd(x):
    y = max_pool_2x2(x)
    return y, (x, y)


def _max_pool_bwd(residuals, g):
    x, y = residuals
    # Ties after ReLU are common (all-zero windows): only the first maximum takes g.
    hits = _first_maxima(_quadrants(x), y, jnp.zeros(y.shape, bool))
    return (_from_quadrants([jnp.where(hit, g, jnp.zeros((), g.dtype)) for hit in hits],
                            x.shape),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


# --- dense -----------------------------------------------------------------------------------

def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                      out_sharding=None):
    """Equals `reference.dot_general` as `nn.Dense` / `nnx.Linear` call it (lhs [..., in] @
    kernel [in, out]), with the kernel's gradient computed in the kernel's own [in, out] layout
    (lhs^T @ g). Kept by docs/benchmarks.md, "Design decisions", row "fc1/fc2 kernel gradients in
    the kernels' layout".

    Autodiff computes that gradient as g^T @ lhs, [out, in], and transposes it. On one device
    XLA folds the transpose into the dot; under a data-parallel mesh the all-reduce of the
    batch sum sits between them, so the transpose lands in the optimizer's update instead: a
    strided pass over fc1's 1M-parameter kernel per Adam moment. Pass it as `dot_general=` to
    the Dense layer.
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
