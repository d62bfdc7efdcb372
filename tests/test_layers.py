"""The CBAM layers: shapes, gates, errors, gradients, bfloat16, and training inside a user's model."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbam_jax import CBAM, BatchNorm, ChannelAttention, SpatialAttention

SHAPES = [(2, 8, 8, 32), (1, 5, 7, 64), (3, 1, 1, 16), (4, 16, 3, 48)]  # incl. non-square, 1x1


def _init_apply(module, x, **kwargs):
    variables = module.init(jax.random.key(0), x)
    y, state = module.apply(variables, x, mutable=["intermediates"], **kwargs)
    return variables, y, state


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("module", [ChannelAttention(), SpatialAttention(), CBAM()],
                         ids=["channel", "spatial", "cbam"])
def test_output_shape_equals_input_shape(module, shape):
    x = jax.random.normal(jax.random.key(1), shape)
    _, y, _ = _init_apply(module, x)
    assert y.shape == shape
    assert y.dtype == x.dtype


@pytest.mark.parametrize("shape", SHAPES)
def test_channel_gate_lies_in_open_unit_interval(shape):
    x = jax.random.uniform(jax.random.key(2), shape, minval=0.5, maxval=2.0)  # no zeros to divide
    _, y, _ = _init_apply(ChannelAttention(), x)
    gate = np.asarray(y / x)
    assert np.all(gate > 0) and np.all(gate < 1)
    # one gate per (batch, channel): constant over the spatial positions
    np.testing.assert_allclose(gate, np.broadcast_to(gate[:, :1, :1, :], gate.shape), rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_spatial_gate_is_sown_and_lies_in_open_unit_interval(shape):
    x = jax.random.normal(jax.random.key(3), shape)
    _, y, state = _init_apply(SpatialAttention(), x)
    (gate,) = state["intermediates"]["spatial_attention"]
    assert gate.shape == shape[:3] + (1,)
    assert np.all(np.asarray(gate) > 0) and np.all(np.asarray(gate) < 1)
    np.testing.assert_allclose(y, x * gate, rtol=1e-6)


def test_channel_attention_matches_its_definition():
    """sigmoid(W2 relu(W1 avg) + W2 relu(W1 max)), written out in numpy."""
    x = jax.random.normal(jax.random.key(4), (2, 3, 5, 32))
    variables, y, _ = _init_apply(ChannelAttention(ratio=8), x)
    w1 = np.asarray(variables["params"]["fc_0"]["kernel"])  # [C, C // ratio]
    w2 = np.asarray(variables["params"]["fc_2"]["kernel"])
    assert w1.shape == (32, 4) and w2.shape == (4, 32)
    xn = np.asarray(x, np.float64)
    mlp = lambda v: np.maximum(v @ w1, 0) @ w2
    gate = 1 / (1 + np.exp(-(mlp(xn.mean(axis=(1, 2))) + mlp(xn.max(axis=(1, 2))))))
    np.testing.assert_allclose(y, xn * gate[:, None, None, :], rtol=1e-5, atol=1e-6)


def test_spatial_attention_pools_mean_then_max_with_same_padding():
    x = jax.random.normal(jax.random.key(5), (1, 6, 9, 4))
    variables, y, _ = _init_apply(SpatialAttention(kernel_size=3), x)
    w = np.asarray(variables["params"]["conv"]["kernel"])  # [3, 3, 2, 1], input order [avg, max]
    assert w.shape == (3, 3, 2, 1)
    xn = np.asarray(x, np.float64)[0]
    maps = np.pad(np.stack([xn.mean(-1), xn.max(-1)], -1), ((1, 1), (1, 1), (0, 0)))
    logits = np.array([[np.sum(maps[i:i + 3, j:j + 3] * w[..., 0]) for j in range(9)]
                       for i in range(6)])
    gate = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(y[0], xn * gate[..., None], rtol=1e-5, atol=1e-6)


def test_fewer_channels_than_ratio_floors_the_hidden_width_at_one():
    x = jnp.ones((2, 4, 4, 8))
    variables = CBAM(ratio=16).init(jax.random.key(0), x)
    fc = variables["params"]["channel_attn"]
    assert fc["fc_0"]["kernel"].shape == (8, 1)
    assert fc["fc_2"]["kernel"].shape == (1, 8)
    assert CBAM(ratio=16).apply(variables, x).shape == x.shape


def test_hidden_width_is_channels_over_ratio():
    variables = CBAM(ratio=16).init(jax.random.key(0), jnp.ones((1, 4, 4, 128)))
    assert variables["params"]["channel_attn"]["fc_0"]["kernel"].shape == (128, 8)
    assert variables["params"]["spatial_attn"]["conv"]["kernel"].shape == (7, 7, 2, 1)


@pytest.mark.parametrize("module", [ChannelAttention(), SpatialAttention(), CBAM()],
                         ids=["channel", "spatial", "cbam"])
@pytest.mark.parametrize("shape", [(8, 8, 32), (2, 8, 8, 32, 1)])
def test_wrong_rank_names_the_expected_layout(module, shape):
    with pytest.raises(ValueError, match=r"\[batch, height, width, channels\]"):
        module.init(jax.random.key(0), jnp.ones(shape))


@pytest.mark.parametrize("module", [ChannelAttention(), SpatialAttention(), CBAM()],
                         ids=["channel", "spatial", "cbam"])
@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int32])
def test_integer_input_is_refused_saying_how_to_cast(module, dtype):
    # Computed, it would be silently wrong: a gate in (0, 1) cast to an integer is 0.
    variables = module.init(jax.random.key(0), jnp.ones((2, 8, 8, 32)))
    with pytest.raises(ValueError, match=rf"expects floating-point input .* got "
                                         rf"{jnp.dtype(dtype).name}: cast it first, e\.g\. "
                                         r"x\.astype\(jnp\.float32\) / 255"):
        module.apply(variables, jnp.full((2, 8, 8, 32), 200, dtype))


@pytest.mark.parametrize("module", [ChannelAttention(), SpatialAttention(), CBAM()],
                         ids=["channel", "spatial", "cbam"])
@pytest.mark.parametrize("shape", [(2, 0, 0, 32), (2, 8, 0, 32), (2, 8, 8, 0)])
def test_zero_height_width_or_channels_is_refused_by_the_layer(module, shape):
    with pytest.raises(ValueError, match=r"expects height, width and channels >= 1 .* got "
                                         rf"shape {re.escape(str(shape))}"):
        module.init(jax.random.key(0), jnp.ones(shape))


def test_channel_count_other_than_built_for_names_the_expected_shape():
    variables = CBAM().init(jax.random.key(0), jnp.ones((1, 4, 4, 32)))
    with pytest.raises(ValueError, match=r"expected input \[B, H, W, 32\], got \(1, 4, 4, 64\)"):
        CBAM().apply(variables, jnp.ones((1, 4, 4, 64)))


@pytest.mark.parametrize("kernel_size", [0, 4])
def test_even_or_empty_spatial_kernel_is_rejected(kernel_size):
    with pytest.raises(ValueError, match="odd"):
        SpatialAttention(kernel_size=kernel_size).init(jax.random.key(0), jnp.ones((1, 8, 8, 4)))


def test_ratio_below_one_is_rejected():
    with pytest.raises(ValueError, match="ratio"):
        ChannelAttention(ratio=0).init(jax.random.key(0), jnp.ones((1, 8, 8, 4)))


@pytest.mark.parametrize("option", ["min_hidden", "hidden_features"])
def test_a_hidden_width_of_zero_is_refused(option):
    # A zero-width MLP is the tutorial's failure below 16 channels; here it is named.
    with pytest.raises(ValueError, match=rf"CBAM\.{option} must be .*int >= 1, got 0"):
        CBAM(**{option: 0}).init(jax.random.key(0), jnp.ones((1, 4, 4, 8)))


@pytest.mark.parametrize("module", [ChannelAttention(), SpatialAttention(), CBAM(),
                                    CBAM.preset("official")],
                         ids=["channel", "spatial", "cbam", "official"])
def test_an_empty_batch_in_evaluation_gives_an_empty_result(module):
    variables = module.init(jax.random.key(0), jnp.ones((1, 6, 6, 32)))
    y = module.apply(variables, jnp.ones((0, 6, 6, 32)))
    assert y.shape == (0, 6, 6, 32)


def test_options_are_keyword_only():
    with pytest.raises(TypeError, match="positional"):
        CBAM(16)


def test_jit_and_grad_reach_every_parameter():
    module = CBAM(ratio=4, kernel_size=5)
    x = jax.random.normal(jax.random.key(6), (2, 7, 5, 16))
    params = module.init(jax.random.key(0), x)["params"]

    @jax.jit
    def loss(params, x):
        return jnp.mean(module.apply({"params": params}, x) ** 2)

    grads = jax.grad(loss)(params, x)
    np.testing.assert_allclose(jax.jit(module.apply)({"params": params}, x),
                               module.apply({"params": params}, x), rtol=1e-6, atol=1e-6)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(g)), path
        assert np.abs(np.asarray(g)).max() > 0, f"zero gradient for {jax.tree_util.keystr(path)}"


def test_bfloat16_compute_with_float32_params():
    module = CBAM(dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(7), (2, 8, 8, 32)).astype(jnp.bfloat16)
    variables = module.init(jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    y = module.apply(variables, x)
    assert y.dtype == jnp.bfloat16
    reference = CBAM().apply(variables, x.astype(jnp.float32))
    # bfloat16 keeps 8 significant bits: relative error ~2^-8 per op.
    np.testing.assert_allclose(np.asarray(y, np.float32), reference, rtol=5e-2, atol=5e-2)


def test_bfloat16_cbam_on_float32_input_returns_float32():
    """The output follows the input's dtype (as the README says): the gates are computed in
    bfloat16, the product with the input in float32."""
    x = jax.random.normal(jax.random.key(7), (2, 8, 8, 32))
    module = CBAM(dtype=jnp.bfloat16)
    y, state = module.apply(module.init(jax.random.key(0), x), x, mutable=["intermediates"])
    assert y.dtype == jnp.float32
    (gate,) = state["intermediates"]["spatial_attn"]["spatial_attention"]
    assert gate.dtype == jnp.bfloat16


def test_batchnorm_uses_batch_statistics_in_training_and_running_ones_in_eval():
    x = jax.random.normal(jax.random.key(8), (4, 3, 3, 5)) * 3 + 1
    bn = BatchNorm()
    variables = bn.init(jax.random.key(0), x, train=False)
    y, updated = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y).mean(axis=(0, 1, 2)), 0, atol=1e-5)
    stats = updated["batch_stats"]
    n = 4 * 3 * 3
    batch_var = np.asarray(x).reshape(-1, 5).var(axis=0, ddof=1)  # unbiased, as PyTorch
    np.testing.assert_allclose(stats["var"], 0.9 * 1 + 0.1 * batch_var, rtol=1e-5)
    np.testing.assert_allclose(stats["mean"], 0.1 * np.asarray(x).reshape(n, 5).mean(0), rtol=1e-5)
    assert int(stats["num_batches_tracked"]) == 1
    y_eval = bn.apply(variables, x, train=False)
    np.testing.assert_allclose(y_eval, np.asarray(x) / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_batchnorm_training_on_one_value_per_channel_is_rejected():
    x = jnp.ones((1, 1, 1, 5))
    variables = BatchNorm().init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm().apply(variables, x, train=True, mutable=["batch_stats"])


class UserModel(nn.Module):
    """A user's own small Flax model with CBAM dropped in after a conv."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = CBAM(ratio=8)(x)
        return nn.Dense(3)(x.mean(axis=(1, 2)))


@pytest.mark.slow
def test_cbam_inside_a_user_model_trains_with_decreasing_loss():
    x = jax.random.normal(jax.random.key(9), (24, 8, 8, 3))
    labels = jnp.arange(24) % 3
    x = x + labels[:, None, None, None]  # learnable signal
    model = UserModel()
    params = model.init(jax.random.key(0), x)["params"]
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(15):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


# name -> (CBAM, input dtype, whether training runs it as ops.fused.cbam_tutorial)
ONE_OP_CASES = {
    "tutorial": (CBAM(), jnp.float32, True),
    "tutorial-width-and-kernel": (CBAM(ratio=4, kernel_size=3), jnp.float32, True),
    "reference": (CBAM(fused=False), jnp.float32, False),
    "official": (CBAM.preset("official"), jnp.float32, False),
    "spatial-bias": (CBAM(spatial_bias=True), jnp.float32, False),
    "hard-sigmoid-gates": (CBAM(gate=nn.hard_sigmoid), jnp.float32, False),
    "bfloat16-gates": (CBAM(dtype=jnp.bfloat16), jnp.float32, False),
    "bfloat16-input": (CBAM(), jnp.bfloat16, False),
}


@pytest.mark.parametrize("case", ONE_OP_CASES)
def test_training_runs_the_one_op_cbam_only_for_the_tutorials_arithmetic_in_float32(case):
    module, dtype, one_op = ONE_OP_CASES[case]
    x = jax.random.normal(jax.random.key(10), (2, 8, 8, 32)).astype(dtype)
    variables = module.init(jax.random.key(0), x)
    for train in (True, False):
        jaxpr = str(jax.make_jaxpr(lambda v: module.apply(v, x, train=train,
                                                          mutable=["batch_stats"]))(variables))
        assert ("cbam_tutorial" in jaxpr) == (one_op and train), (case, train)


@pytest.mark.slow
@pytest.mark.parametrize("module", [CBAM(), SpatialAttention()], ids=["cbam", "spatial"])
def test_the_fused_path_trains_like_the_reference(module):
    """Training with `fused=True` (ops.fused: the one-op CBAM, the Toeplitz spatial conv) and
    with `fused=False` (ops.reference, autodiff) give the same output, gate and gradients, to
    float32 rounding (1e-5 of the largest)."""
    x = jax.random.normal(jax.random.key(11), (3, 8, 8, 32))
    g = jax.random.normal(jax.random.key(12), x.shape)
    variables = module.init(jax.random.key(0), x)

    def run(params, x, fused):
        y, state = module.clone(fused=fused).apply({"params": params}, x, train=True,
                                                   mutable=["intermediates"])
        return jnp.sum(y * g), (y, state["intermediates"])

    results = {fused: jax.value_and_grad(run, argnums=(0, 1), has_aux=True)(
        variables["params"], x, fused) for fused in (True, False)}
    (_, fused), fused_grads = results[True]
    (_, reference), reference_grads = results[False]
    for a, b in zip(jax.tree.leaves((fused, fused_grads)),
                    jax.tree.leaves((reference, reference_grads))):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * float(jnp.abs(b).max())
