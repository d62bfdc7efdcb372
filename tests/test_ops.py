"""cbam_jax.ops: the reference's rules that are easy to get wrong (the max-pool's tie rule, odd
edges), then each fast form of `ops.fused` against the reference function it names, values
and gradients.

Tolerance 1e-5 relative to the largest entry: float32 sums taken in another order (a few ulps
over ~100 terms). Ties (tied max-pool windows, all-zero maps) and negative BatchNorm scales are
included, since that is where routing could differ.
Budget: about 2 minutes on 2 CPU cores, most of it
compiling CBAMCNN four times and the CBAM op's gradients.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cbam_jax.models import CBAMCNN
from cbam_jax.ops import fused, reference


def _rel(a, b):
    """max |a - b| / max |b|, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _assert_vjps_match(ours, plain, args, cotangents, tol=1e-5):
    """Outputs and the gradients of every argument agree to `tol` (relative, per tensor)."""
    ours_out, ours_vjp = jax.vjp(ours, *args)
    plain_out, plain_vjp = jax.vjp(plain, *args)
    for a, b in zip(jax.tree.leaves(ours_out), jax.tree.leaves(plain_out)):
        assert _rel(a, b) <= tol
    for i, (a, b) in enumerate(zip(ours_vjp(cotangents), plain_vjp(cotangents))):
        assert _rel(a, b) <= tol, f"gradient of argument {i}"


# --- the reference's max-pool, and the fused one: PyTorch's rules ----------------------------

MAX_POOLS = {"reference": reference.max_pool_2x2, "fused": fused.max_pool_2x2}


@pytest.mark.parametrize("pool", MAX_POOLS)
def test_max_pool_gradient_goes_to_the_first_maximum_in_row_major_order(pool):
    x = jnp.asarray([[0.0, 0.0], [0.0, 0.0]]).reshape(1, 2, 2, 1)  # all tied, as after ReLU
    x = jnp.concatenate([x, jnp.asarray([[1.0, 3.0], [3.0, 3.0]]).reshape(1, 2, 2, 1)], axis=-1)
    grad = jax.jit(jax.grad(lambda x: (MAX_POOLS[pool](x) * jnp.asarray([2.0, 5.0])).sum()))(x)
    np.testing.assert_array_equal(grad[0, :, :, 0], [[2.0, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(grad[0, :, :, 1], [[0.0, 5.0], [0.0, 0.0]])


@pytest.mark.parametrize("pool", MAX_POOLS)
def test_max_pool_drops_odd_edges_and_gives_them_zero_gradient(pool):
    x = jnp.arange(5 * 3, dtype=jnp.float32).reshape(1, 5, 3, 1)
    y, vjp = jax.vjp(MAX_POOLS[pool], x)
    np.testing.assert_array_equal(y[0, :, :, 0], [[4.0], [10.0]])
    (grad,) = vjp(jnp.ones_like(y))
    expected = np.zeros((5, 3))
    expected[1, 1] = expected[3, 1] = 1.0
    np.testing.assert_array_equal(grad[0, :, :, 0], expected)


def _block_inputs(case, shape=(4, 6, 8, 5)):
    """x, BatchNorm scale and bias; 'ties_and_signs' adds tied windows, negative scales and a
    zero scale (every window ties after normalising)."""
    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 2.0, shape).astype(np.float32)
    scale = rng.normal(size=shape[-1]).astype(np.float32)
    bias = rng.normal(size=shape[-1]).astype(np.float32)
    if case == "ties_and_signs":
        x[:, :2] = 1.25  # whole windows tied
        x[0, 2:4, 2:4, :] = 3.0
        scale[:2] = -np.abs(scale[:2])
        scale[2], bias[2] = 0.0, 0.5
    return jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias)


@pytest.mark.parametrize("case, shape", [("random", (4, 6, 8, 5)), ("ties_and_signs", (4, 6, 8, 5)),
                                         ("random", (2, 5, 7, 3))])
def test_fused_max_pool_equals_the_reference(case, shape):
    x, _, _ = _block_inputs(case, shape)
    g = jnp.asarray(np.random.default_rng(2).normal(size=(shape[0], shape[1] // 2,
                                                          shape[2] // 2, shape[3])), jnp.float32)
    _assert_vjps_match(fused.max_pool_2x2, reference.max_pool_2x2, (x,), g, tol=0.0)


# --- BatchNorm -------------------------------------------------------------------------------

def _plain_batch_norm(x, scale, bias, epsilon=1e-5):
    """The two-pass formula with its statistics: (y, batch mean, biased batch var)."""
    mean = x.mean(axis=(0, 1, 2))
    var = jnp.square(x - mean).mean(axis=(0, 1, 2))
    return (x - mean) * lax.rsqrt(var + epsilon) * scale + bias, mean, var


@pytest.mark.parametrize("with_stat_cotangents", [False, True])
def test_batch_norm_train_matches_autodiff_of_the_two_pass_formula(with_stat_cotangents):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1.0, 3.0, (8, 6, 5, 16)), jnp.float32)
    scale = jnp.asarray(rng.normal(size=16), jnp.float32)
    bias = jnp.asarray(rng.normal(size=16), jnp.float32)
    g_y = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    g_stats = jnp.asarray(rng.normal(size=(2, 16)), jnp.float32) * with_stat_cotangents
    _assert_vjps_match(lambda *a: fused.batch_norm_train(*a, 1e-5), _plain_batch_norm,
                       (x, scale, bias), (g_y, *g_stats))


BN = dict(momentum=0.1, epsilon=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_fused_batch_norm_equals_the_reference(train):
    """Output, running statistics and the gradients of x, scale and bias."""
    x, scale, bias = _block_inputs("ties_and_signs")
    rng = np.random.default_rng(3)
    running = (jnp.asarray(rng.normal(size=5), jnp.float32),
               jnp.asarray(rng.uniform(0.5, 2.0, 5), jnp.float32))
    g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    run = lambda ops: lambda *a: ops.batch_norm(*a, running, train=train, **BN)
    ours, plain = jax.vjp(run(fused), x, scale, bias), jax.vjp(run(reference), x, scale, bias)
    for a, b in zip(jax.tree.leaves(ours[0]), jax.tree.leaves(plain[0])):
        assert _rel(a, b) < 1e-5
    zero_stats = jax.tree.map(jnp.zeros_like, ours[0][1])  # the running statistics are no loss
    for i, (a, b) in enumerate(zip(ours[1]((g, zero_stats)), plain[1]((g, zero_stats)))):
        assert _rel(a, b) < 1e-5, f"gradient of argument {i}"


@pytest.mark.parametrize("case", ["random", "ties_and_signs"])
def test_batch_norm_relu_pool_matches_autodiff_of_the_three_ops(case):
    x, scale, bias = _block_inputs(case)
    rng = np.random.default_rng(2)
    cotangents = (jnp.asarray(rng.normal(size=(4, 3, 4, 5)), jnp.float32),
                  *jnp.asarray(rng.normal(size=(2, 5)), jnp.float32))  # y, mean, var

    def plain(x, scale, bias):
        y, mean, var = _plain_batch_norm(x, scale, bias)
        return reference.max_pool_2x2(jax.nn.relu(y)), mean, var

    _assert_vjps_match(lambda *a: fused.batch_norm_relu_pool_train(*a, 1e-5), plain,
                       (x, scale, bias), cotangents)


def test_batch_norm_relu_pool_refuses_odd_sizes_and_bfloat16():
    x, scale, bias = _block_inputs("random", (2, 5, 4, 5))
    with pytest.raises(ValueError, match="even H and W"):
        fused.batch_norm_relu_pool_train(x, scale, bias, 1e-5)
    with pytest.raises(ValueError, match="float32"):
        fused.batch_norm_relu_pool_train(jnp.zeros((2, 4, 4, 5), jnp.bfloat16), scale, bias,
                                         1e-5)


# --- CBAMCNN's block -------------------------------------------------------------------------

def _conv_block_inputs(case, shape):
    x, scale, bias = _block_inputs(case, shape[:3] + (3,))
    rng = np.random.default_rng(6)
    kernel = jnp.asarray(rng.normal(0, 0.3, (3, 3, 3, 5)), jnp.float32)
    scale, bias = (jnp.concatenate([v, v[:2]]) for v in (scale, bias))  # 5 output channels
    conv_bias = jnp.asarray(rng.normal(size=5), jnp.float32)
    running = (jnp.asarray(rng.normal(size=5), jnp.float32),
               jnp.asarray(rng.uniform(0.5, 2.0, 5), jnp.float32))
    return x, kernel, conv_bias, scale, bias, running


# (4, 6, 8): the fused op; (2, 5, 7): odd sizes, BatchNorm and max-pool as separate ops.
@pytest.mark.slow
@pytest.mark.parametrize("case, shape", [("random", (4, 6, 8)), ("ties_and_signs", (4, 6, 8)),
                                         ("random", (2, 5, 7))])
def test_conv_block_trains_like_the_reference(case, shape):
    """Output, running statistics and every gradient; the conv bias's gradient is exactly 0."""
    x, kernel, conv_bias, scale, bias, running = _conv_block_inputs(case, shape)
    ours = lambda *a: fused.conv_bn_relu_pool(*a, running, train=True, **BN)
    plain = lambda *a: reference.conv_bn_relu_pool(*a, running, train=True, **BN)
    args = (x, kernel, conv_bias, scale, bias)
    g = jnp.asarray(np.random.default_rng(7).normal(size=ours(*args)[0].shape), jnp.float32)
    (y, stats), ours_vjp = jax.vjp(ours, *args)
    (plain_y, plain_stats), plain_vjp = jax.vjp(plain, *args)
    assert _rel(y, plain_y) < 1e-5
    for a, b in zip(stats, plain_stats):
        assert _rel(a, b) < 1e-5
    zero_stats = jax.tree.map(jnp.zeros_like, stats)  # the running statistics are not a loss
    grads, plain_grads = ours_vjp((g, zero_stats)), plain_vjp((g, zero_stats))
    for i in (0, 1, 3, 4):
        assert _rel(grads[i], plain_grads[i]) < 1e-5, f"gradient of argument {i}"
    # BatchNorm removes any per-channel shift: the true gradient of the conv bias is 0, which
    # autodiff of the reference misses by float32 rounding.
    np.testing.assert_array_equal(grads[2], np.zeros(5, np.float32))
    assert np.abs(plain_grads[2]).max() < 1e-5 * np.abs(plain_grads[4]).max()


@pytest.mark.parametrize("shape", [(4, 6, 8), (2, 5, 7)])
def test_conv_block_evaluates_like_the_reference(shape):
    x, kernel, conv_bias, scale, bias, running = _conv_block_inputs("random", shape)
    kw = dict(train=False, **BN)
    y, updated = fused.conv_bn_relu_pool(x, kernel, conv_bias, scale, bias, running, **kw)
    expected, none = reference.conv_bn_relu_pool(x, kernel, conv_bias, scale, bias, running, **kw)
    assert updated is None and none is None
    assert _rel(y, expected) < 1e-5


def test_conv_block_in_bfloat16_computes_in_bfloat16():
    x, kernel, conv_bias, scale, bias, running = _conv_block_inputs("random", (4, 6, 8))
    expected = reference.conv_bn_relu_pool(x, kernel, conv_bias, scale, bias, running,
                                           train=True, **BN)[0]
    for train in (True, False):
        for ops in (fused, reference):
            y, _ = ops.conv_bn_relu_pool(x, kernel, conv_bias, scale, bias, running, train=train,
                                         dtype=jnp.bfloat16, **BN)
            assert y.dtype == jnp.bfloat16
            if train:  # bfloat16's 8-bit mantissa: about 1% of the scale
                assert _rel(y, expected) < 3e-2


# (3, 8, 6, 3), (2, 5, 7, 3): the window matmul on a CPU, even and odd (edges dropped) sizes;
# (3, 8, 6, 8): more input channels than WINDOW_MATMUL_MAX_CHANNELS, the direct conv.
@pytest.mark.parametrize("shape", [(3, 8, 6, 3), (2, 5, 7, 3), (3, 8, 6, 8)])
def test_conv_pool_shift_relu_is_within_float32_rounding_of_the_exact_value(shape):
    """Against the reference in float64, within the classic bound on a float32 sum of n terms:
    gamma_n times the sum of their magnitudes, n = the window matmul's (k + 1)^2 * Cin products
    (the conv's 9 * Cin and exact zeros) plus the shift; the max-pool and ReLU add no error."""
    rng = np.random.default_rng(3)
    x, kernel, shift = (rng.normal(size=s) for s in (shape, (3, 3, shape[-1], 5), (5,)))
    out = jax.jit(fused.conv_pool_shift_relu)(
        *(jnp.asarray(a, jnp.float32) for a in (x, kernel, shift)))
    with jax.enable_x64():
        conv = reference.conv_same(jnp.asarray(x), jnp.asarray(kernel))
        exact = reference.max_pool_2x2(jax.nn.relu(conv + shift))
        magnitude = reference.conv_same(jnp.abs(jnp.asarray(x)), jnp.abs(jnp.asarray(kernel)))
        n = 16 * shape[-1] + 1
        unit = np.finfo(np.float32).eps / 2
        bound = n * unit / (1 - n * unit) * float((magnitude + np.abs(shift)).max())
        assert out.shape == exact.shape
        assert float(jnp.abs(out - exact).max()) <= bound


@pytest.mark.parametrize("channels, convolutions", [(3, 0), (4, 0), (5, 1)])
def test_the_pooled_conv_of_a_few_channels_is_one_matmul_on_cpu(channels, convolutions):
    """`conv_max_pool_2x2` takes the window matmul up to WINDOW_MATMUL_MAX_CHANNELS input
    channels on a CPU (1.5-2.2x XLA:CPU's convolution there, docs/benchmarks.md), the direct
    conv above it and on other platforms."""
    x = jnp.zeros((2, 8, 8, channels))
    kernel = jnp.zeros((3, 3, channels, 4))
    hlo = jax.jit(fused.conv_max_pool_2x2).lower(x, kernel).compile().as_text()
    on_cpu = jax.default_backend() == "cpu"
    assert hlo.count("convolution(") == (convolutions if on_cpu else 1)


@pytest.mark.slow
@pytest.mark.parametrize("k, shape", [(3, (2, 2, 3, 1)), (5, (2, 9, 8, 2)), (1, (1, 4, 6, 3))])
def test_pooled_conv_windows_equals_the_pooled_conv_for_any_odd_kernel(k, shape):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, shape[-1], 4)), jnp.float32)
    expected = reference.max_pool_2x2(reference.conv_same(x, kernel))
    assert _rel(fused.pooled_conv_windows(x, kernel), expected) < 1e-6


@pytest.mark.parametrize("flag", [True, False])
def test_computed_once_returns_its_input_bit_for_bit_whatever_the_flag(flag):
    x = jnp.asarray([1.5, -0.0, 0.0, np.nan, np.inf, -np.inf, 1e-45], jnp.float32)
    out = jax.jit(fused.computed_once)(x, jnp.asarray(flag))
    np.testing.assert_array_equal(np.asarray(out).view(np.uint32), np.asarray(x).view(np.uint32))


def test_the_model_writes_each_pooled_block_output_once_on_cpu():
    """One conditional per block on a CPU (`computed_once`, in `conv_pool_shift_relu` for
    evaluation and `batch_norm_relu_pool_train` for training), none elsewhere: without them
    XLA:CPU recomputes the pooling inside each consumer of the block's output (5% of evaluation
    and 2-6% of a train step, docs/benchmarks.md). A JAX whose XLA folds them away fails here;
    the control, the reference path (`fused=False`), has none."""
    x = jnp.zeros((2, 32, 32, 3))
    variables = CBAMCNN().init(jax.random.PRNGKey(0), x)

    def conditionals(train, fused=True):
        model = CBAMCNN(fused=fused)
        fn = lambda v, x: model.apply(v, x, train=train, rngs={"dropout": jax.random.PRNGKey(1)},
                                      mutable=["batch_stats"] if train else False)
        return jax.jit(fn).lower(variables, x).compile().as_text().count("conditional(")
    per_block = 1 if jax.default_backend() == "cpu" else 0
    assert conditionals(False) == conditionals(True) == 3 * per_block
    assert conditionals(False, fused=False) == conditionals(True, fused=False) == 0


# --- CBAM ------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw, channels, k", [((16, 16), 2, 7), ((4, 4), 2, 7), ((5, 7), 2, 7),
                                             ((1, 1), 2, 7), ((6, 3), 1, 3)])
def test_toeplitz_conv_matches_the_convolution_and_its_gradients(hw, channels, k):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(3, *hw, channels)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, channels, 1)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(3, *hw, 1)), jnp.float32)
    _assert_vjps_match(fused.conv_same_toeplitz, reference.conv_same, (x, kernel), g)


def _reference_cbam(x, w1, w2, kernel):
    """The tutorial's CBAM from the reference's gates, the spatial conv as a convolution."""
    mlp = lambda pooled: jax.nn.relu(pooled @ w1) @ w2
    x = reference.channel_attention(x, mlp, reference.TUTORIAL_POOLS, jax.nn.sigmoid)
    return reference.spatial_attention(x, lambda maps: reference.conv_same(maps, kernel),
                                       reference.TUTORIAL_POOLS, jax.nn.sigmoid)


# Float32: each output and gradient is a short chain of sums over at most H x W x C = 2048
# values (the channel gate's reductions), rounded in other orders on the two sides; 1e-5 of the
# largest entry is ~80 float32 ulps. Float64 checks the formulas themselves: 1e-12 (~4500 ulps).
CBAM_TOLERANCE = {"float32": 1e-5, "float64": 1e-12}


@pytest.mark.parametrize("dtype", ["float32", pytest.param("float64", marks=pytest.mark.slow)])
@pytest.mark.parametrize("shape, hidden, k", [((3, 8, 8, 32), 2, 7),  # the tutorial's CBAM
                                              ((2, 5, 7, 12), 3, 3)])  # odd sizes, other k
@pytest.mark.parametrize("ties", [False, True])
def test_cbam_tutorial_matches_autodiff_of_the_two_gates(ties, shape, hidden, k, dtype):
    rng = np.random.default_rng(5)
    x = rng.normal(size=shape)
    if ties:  # as after ReLU and pooling: all-zero maps and repeated maxima
        x = np.maximum(x, 0.0)
        x[0] = 0.0
        x[1, :, :, :4] = x[1].max()
    c = shape[-1]
    weights = [rng.normal(0, 0.3, s) for s in ((c, hidden), (hidden, c), (k, k, 2, 1))]
    cotangents = (rng.normal(size=shape), rng.normal(size=shape[:3] + (1,)))  # output, gate
    with jax.enable_x64(dtype == "float64"):
        cast = lambda a: jnp.asarray(np.asarray(a, dtype))
        _assert_vjps_match(fused.cbam_tutorial, _reference_cbam, tuple(map(cast, (x, *weights))),
                           tuple(map(cast, cotangents)), tol=CBAM_TOLERANCE[dtype])


# --- dense ---------------------------------------------------------------------------------

DENSE = (((1,), (0,)), ((), ()))


@pytest.mark.parametrize("lhs_shape", [(6, 20), (2, 3, 20)])
def test_dense_matches_autodiff_of_dot_general(lhs_shape):
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=lhs_shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(20, 7)), jnp.float32)
    numbers = (((lhs.ndim - 1,), (0,)), ((), ()))
    g = jnp.asarray(rng.normal(size=lhs_shape[:-1] + (7,)), jnp.float32)
    ours, ours_vjp = jax.vjp(lambda a, w: fused.dense_dot_general(a, w, numbers), lhs, kernel)
    plain, plain_vjp = jax.vjp(lambda a, w: reference.dot_general(a, w, numbers), lhs, kernel)
    assert _rel(ours, plain) == 0.0  # the forward is the same dot
    for a, b in zip(ours_vjp(g), plain_vjp(g)):
        assert a.shape == b.shape and _rel(a, b) < 1e-5


def test_dense_keeps_a_bfloat16_computation_in_bfloat16():
    lhs, kernel = jnp.ones((4, 8), jnp.bfloat16), jnp.ones((8, 3), jnp.bfloat16)
    y, vjp = jax.vjp(lambda a, w: fused.dense_dot_general(a, w, DENSE), lhs, kernel)
    d_lhs, d_kernel = vjp(jnp.ones_like(y))
    assert (y.dtype, d_lhs.dtype, d_kernel.dtype) == (jnp.bfloat16,) * 3
    assert float(d_kernel[0, 0]) == 4.0  # the sum over the batch of 1 * 1


@pytest.mark.parametrize("numbers", [(((0,), (0,)), ((), ())),      # contracts the batch
                                     (((1,), (1,)), ((), ())),      # a transposed kernel
                                     (((1,), (0,)), ((0,), (0,)))])  # batch dimensions
def test_dense_refuses_other_contractions(numbers):
    with pytest.raises(ValueError, match=r"lhs \[\.\.\., in\] @ kernel \[in, out\]"):
        fused.dense_dot_general(jnp.ones((4, 4)), jnp.ones((4, 4)), numbers)


# --- the two modules -------------------------------------------------------------------------

def test_the_reference_imports_nothing_from_the_fast_forms():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(reference))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any("cbam_jax" in name for name in imported), imported
    assert len(inspect.getsource(reference).splitlines()) <= 250
