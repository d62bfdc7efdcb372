"""CBAMCNN: the tutorial's architecture, parameter table, train/eval behaviour and input
checks, and the same numbers as the model written as the tutorial's layers in a row
(`PlainCBAMCNN`).

Runtime: 27 tests, about 2 min on 2 CPU cores.
"""
import functools
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cbam_jax
from cbam_jax import CBAMCNN, parameter_report, torch_style_name, train
from cbam_jax.layers import ChannelAttention, torch_bias_init, torch_kernel_init
from cbam_jax.models import BLOCK_CHANNELS
from cbam_jax.ops.reference import spatial_attention

# The tutorial's printed parameter table, in its order.
TUTORIAL_PARAMETERS = {
    "conv1.weight": 864, "conv1.bias": 32, "bn1.weight": 32, "bn1.bias": 32,
    "cbam1.channel_attn.fc.0.weight": 64, "cbam1.channel_attn.fc.2.weight": 64,
    "cbam1.spatial_attn.conv.weight": 98,
    "conv2.weight": 18_432, "conv2.bias": 64, "bn2.weight": 64, "bn2.bias": 64,
    "cbam2.channel_attn.fc.0.weight": 256, "cbam2.channel_attn.fc.2.weight": 256,
    "cbam2.spatial_attn.conv.weight": 98,
    "conv3.weight": 73_728, "conv3.bias": 128, "bn3.weight": 128, "bn3.bias": 128,
    "cbam3.channel_attn.fc.0.weight": 1_024, "cbam3.channel_attn.fc.2.weight": 1_024,
    "cbam3.spatial_attn.conv.weight": 98,
    "fc1.weight": 1_048_576, "fc1.bias": 512, "fc2.weight": 5_120, "fc2.bias": 10,
}


@pytest.fixture(scope="module")
def variables():
    return CBAMCNN().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


def test_parameter_report_matches_tutorial_table_in_order(variables, capsys):
    report = parameter_report(variables["params"])
    assert list(report.items()) == list(TUTORIAL_PARAMETERS.items())
    assert sum(report.values()) == 1_150_896
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "Total trainable parameters: 1,150,896"
    assert "conv1.weight: 864" in printed
    assert "fc1.weight: 1,048,576" in printed
    assert printed[-1] == "fc2.bias: 10"


def test_parameter_report_can_stay_silent(variables, capsys):
    parameter_report(variables["params"], print_fn=None)
    assert capsys.readouterr().out == ""


def test_batch_stats_mirror_pytorch_buffers(variables):
    stats = variables["batch_stats"]
    assert set(stats) == {"bn1", "bn2", "bn3"}
    assert set(stats["bn2"]) == {"mean", "var", "num_batches_tracked"}
    assert stats["bn2"]["mean"].shape == (64,)
    assert torch_style_name(("bn2", "mean")) == "bn2.running_mean"
    assert torch_style_name(("bn2", "var")) == "bn2.running_var"


@pytest.mark.parametrize("batch", [1, 5])
def test_logits_shape_and_dtype(variables, batch):
    logits = CBAMCNN().apply(variables, jnp.ones((batch, 32, 32, 3)), train=False)
    assert logits.shape == (batch, 10) and logits.dtype == jnp.float32


@pytest.mark.slow
def test_eval_mode_is_deterministic_and_train_mode_uses_dropout(variables):
    model = CBAMCNN()
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))
    run = lambda seed: model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(seed)},
                                   mutable=["batch_stats"])
    (a, stats_a), (b, _) = run(0), run(1)
    assert not np.allclose(a, b)  # different dropout masks
    assert int(stats_a["batch_stats"]["bn1"]["num_batches_tracked"]) == 1
    assert not np.allclose(stats_a["batch_stats"]["bn3"]["mean"], 0)


def test_dropout_rate_zero_makes_training_forward_deterministic(variables):
    model = CBAMCNN(dropout_rate=0.0)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    run = lambda seed: model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(seed)},
                                   mutable=["batch_stats"])[0]
    np.testing.assert_array_equal(run(0), run(1))


@pytest.mark.slow
def test_spatial_attention_maps_of_every_block_are_available(variables):
    _, state = CBAMCNN().apply(variables, jnp.ones((2, 32, 32, 3)), mutable=["intermediates"])
    sizes = {name: state["intermediates"][name]["spatial_attn"]["spatial_attention"][0].shape
             for name in ("cbam1", "cbam2", "cbam3")}
    assert sizes == {"cbam1": (2, 16, 16, 1), "cbam2": (2, 8, 8, 1), "cbam3": (2, 4, 4, 1)}


@pytest.mark.parametrize("shape", [(32, 32, 3), (2, 3, 32, 32), (2, 28, 28, 3), (2, 32, 32, 1)])
def test_wrong_input_shape_names_the_expected_one(variables, shape):
    with pytest.raises(ValueError, match=r"\[batch, 32, 32, 3\]"):
        CBAMCNN().apply(variables, jnp.ones(shape))


def test_every_parameter_gets_a_gradient_but_the_conv_biases_get_exactly_zero(variables):
    """A conv bias before a train-mode BatchNorm cannot change the loss (the batch mean removes
    it): its gradient is 0, not float32 noise, so Adam leaves it where PyTorch's noise-driven
    steps would move it by up to lr per step."""
    model = CBAMCNN()
    x = jax.random.normal(jax.random.key(2), (8, 32, 32, 3))
    labels = jnp.arange(8) % 10

    @jax.jit
    def loss(params):
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                train=True, rngs={"dropout": jax.random.key(0)},
                                mutable=["batch_stats"])
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels])

    grads = jax.grad(loss)(variables["params"])
    for name, g in parameter_report(grads, print_fn=None).items():
        assert g > 0
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        name = jax.tree_util.keystr(path)
        if name in {f"['conv{i}']['bias']" for i in (1, 2, 3)}:
            np.testing.assert_array_equal(g, np.zeros_like(g), err_msg=name)
        else:
            assert np.abs(np.asarray(g)).max() > 0, name


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_logits(variables):
    x = jax.random.normal(jax.random.key(3), (4, 32, 32, 3))
    logits = CBAMCNN(dtype=jnp.bfloat16).apply(variables, x)
    reference = CBAMCNN().apply(variables, x)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    # bfloat16's 8-bit mantissa through ~10 layers: agreement to a few percent of the logit scale.
    scale = float(np.abs(reference).max())
    np.testing.assert_allclose(logits, reference, atol=0.1 * scale)


# --- the two paths against the plain composition -----------------------------------------------

class _PlainBatchNorm(nn.Module):
    """layers.BatchNorm's variables; the textbook formula, PyTorch's running update, autodiff."""

    @nn.compact
    def __call__(self, x, train):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        tracked = self.variable("batch_stats", "num_batches_tracked",
                                lambda: jnp.zeros((), jnp.int32))
        if not train:
            return (x - running_mean.value) / jnp.sqrt(running_var.value + 1e-5) * scale + bias
        mean = x.mean(axis=(0, 1, 2))
        var = jnp.square(x - mean).mean(axis=(0, 1, 2))
        if not self.is_initializing():
            n = x.size // c
            running_mean.value = 0.9 * running_mean.value + 0.1 * mean
            running_var.value = 0.9 * running_var.value + 0.1 * var * n / (n - 1)
            tracked.value = tracked.value + 1
        return (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias


class _PlainSpatialAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        conv = nn.Conv(1, (7, 7), padding=((3, 3), (3, 3)), use_bias=False,
                       kernel_init=torch_kernel_init, name="conv")
        y, attention = spatial_attention(x, conv, ("avg", "max"), nn.sigmoid)
        self.sow("intermediates", "spatial_attention", attention)
        return y


class _PlainCBAM(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = ChannelAttention(name="channel_attn")(x)
        return _PlainSpatialAttention(name="spatial_attn")(x)


class PlainCBAMCNN(nn.Module):
    """CBAMCNN written as the tutorial's layers in a row (nn.Conv with its bias, BatchNorm,
    ReLU, a reduce-window max-pool, the CBAM gates with a convolution), every gradient by
    autodiff, with no code of cbam_jax's model path: what both of CBAMCNN's paths must
    compute."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        in_channels = x.shape[-1]
        for i, channels in enumerate(BLOCK_CHANNELS, start=1):
            x = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), name=f"conv{i}",
                        kernel_init=torch_kernel_init,
                        bias_init=torch_bias_init(9 * in_channels))(x)
            x = _PlainBatchNorm(name=f"bn{i}")(x, train)
            x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
            x = _PlainCBAM(name=f"cbam{i}")(x)
            in_channels = channels
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(512, name="fc1", kernel_init=torch_kernel_init,
                     bias_init=torch_bias_init(x.shape[-1]))(x)
        return nn.Dense(10, name="fc2", kernel_init=torch_kernel_init,
                        bias_init=torch_bias_init(512))(nn.relu(x))


def _in_order(tree, prefix=()):
    """[(path, leaf)] in the dicts' own order (jax.tree sorts keys)."""
    out = []
    for key, value in tree.items():
        out += (_in_order(value, prefix + (key,)) if isinstance(value, dict)
                else [(prefix + (key,), value)])
    return out


def test_variables_names_order_and_initial_values_are_the_plain_models():
    """Checkpoints, parameter_report, parity.convert and inference see the same tree."""
    x = jnp.zeros((1, 32, 32, 3))
    ours = CBAMCNN().init(jax.random.key(0), x, train=False)
    plain = PlainCBAMCNN().init(jax.random.key(0), x, train=False)
    assert list(ours) == list(plain) == ["params", "batch_stats"]
    for collection in ours:
        got, expected = _in_order(ours[collection]), _in_order(plain[collection])
        assert [p for p, _ in got] == [p for p, _ in expected]
        for (path, a), (_, b) in zip(got, expected):
            assert a.dtype == b.dtype, path
            np.testing.assert_array_equal(a, b, err_msg=str(path))


@pytest.fixture(scope="module")
def perturbed():
    """CBAMCNN's initial variables with random BatchNorm affine params and running statistics
    (so that the folded evaluation is exercised), and a batch of 16."""
    rng = np.random.default_rng(0)
    variables = CBAMCNN().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    params, stats = dict(variables["params"]), dict(variables["batch_stats"])
    for i, c in enumerate(BLOCK_CHANNELS, start=1):
        params[f"bn{i}"] = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
                            "bias": jnp.asarray(rng.normal(0, 0.2, c), jnp.float32)}
        stats[f"bn{i}"] = dict(stats[f"bn{i}"],
                               mean=jnp.asarray(rng.normal(0, 0.2, c), jnp.float32),
                               var=jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32))
    x = jnp.asarray(rng.normal(size=(16, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 16))
    return {"params": params, "batch_stats": stats}, x, labels


def _train_step(model, variables, x, labels):
    """Train-mode logits, the gradients of the mean cross-entropy, the new batch_stats."""
    @jax.jit
    def step(params):
        def loss(params):
            logits, state = model.apply({**variables, "params": params}, x, train=True,
                                        mutable=["batch_stats"])
            return train.cross_entropy(logits, labels), (logits, state["batch_stats"])
        (_, (logits, stats)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return logits, grads, stats
    return step(variables["params"])


# Float32 tolerances, relative to each tensor's largest entry. The two models sum in other
# orders (the fused BatchNorm's gradient reductions run over the pooled tensors, the Toeplitz
# matmul replaces the 7x7 convolution, the folded eval rounds conv(x, k * gain) instead of
# conv(x, k) * gain), so they agree to float32 rounding amplified by depth. Observed over 3
# seeds: train logits <= 8e-7, gradients <= 1.8e-6 (the CBAM kernels'), batch statistics
# <= 7e-8, eval logits <= 3e-7; the tolerances leave >= 10x headroom.
FORWARD_TOLERANCE, GRADIENT_TOLERANCE = 1e-5, 2e-5


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_train_mode_gives_the_plain_models_logits_gradients_and_statistics(perturbed, fused):
    variables, x, labels = perturbed
    logits, grads, stats = _train_step(CBAMCNN(dropout_rate=0.0, fused=fused), variables, x,
                                       labels)
    plain_logits, plain_grads, plain_stats = _train_step(PlainCBAMCNN(), variables, x, labels)
    assert _rel(logits, plain_logits) < FORWARD_TOLERANCE
    assert jax.tree.structure(grads) == jax.tree.structure(plain_grads)
    for (path, g), expected in zip(jax.tree_util.tree_leaves_with_path(grads),
                                   jax.tree.leaves(plain_grads)):
        name = jax.tree_util.keystr(path)
        if fused and name in {f"['conv{i}']['bias']" for i in (1, 2, 3)}:
            # BatchNorm cancels the conv bias: its true gradient is 0, exactly the fused path's;
            # autodiff (the plain model, the reference path) gives float32 noise.
            np.testing.assert_array_equal(g, np.zeros_like(g), err_msg=name)
            assert np.abs(expected).max() < 1e-5 * np.abs(plain_grads["conv1"]["kernel"]).max()
        elif name in {f"['conv{i}']['bias']" for i in (1, 2, 3)}:
            assert np.abs(g).max() < 1e-5 * np.abs(plain_grads["conv1"]["kernel"]).max()
        else:
            assert _rel(g, expected) < GRADIENT_TOLERANCE, name
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(stats),
                            jax.tree.leaves(plain_stats)):
        if a.dtype == jnp.int32:
            np.testing.assert_array_equal(a, b)
        else:  # the running mean includes the conv bias, as PyTorch's
            assert _rel(a, b) < FORWARD_TOLERANCE, jax.tree_util.keystr(path)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_eval_mode_gives_the_plain_models_logits_and_gates(perturbed, fused):
    variables, x, _ = perturbed
    logits, state = jax.jit(lambda v: CBAMCNN(fused=fused).apply(
        v, x, mutable=["intermediates"]))(variables)
    plain, plain_state = jax.jit(
        lambda v: PlainCBAMCNN().apply(v, x, mutable=["intermediates"]))(variables)
    assert _rel(logits, plain) < FORWARD_TOLERANCE
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(plain_state)):
        assert _rel(a, b) < FORWARD_TOLERANCE


# --- choosing the path ---------------------------------------------------------------------------

def test_training_runs_the_fused_path_by_default():
    assert CBAMCNN().fused and train.build("float32")[0].fused


def _recorded(fused: bool, train: bool, perturbed):
    variables, x, _ = perturbed
    model = CBAMCNN(dropout_rate=0.0, fused=fused)
    apply = functools.partial(model.apply, train=train, capture_intermediates=True,
                              mutable=["intermediates", "batch_stats"])
    logits, state = jax.jit(apply)(variables, x)
    return logits, state["intermediates"]


@pytest.mark.parametrize("train", [True, False])
def test_capture_intermediates_records_every_layer_of_the_reference_path(perturbed, train):
    """`fused=False` runs each layer as its own module call, so capture_intermediates records
    the conv's, the BatchNorm's and each gate's output (parity's layer-by-layer report reads
    them); the fused path records the calls it makes: no conv{i} or bn{i} call, the same
    logits up to float32 rounding."""
    logits, recorded = _recorded(False, train, perturbed)
    fused_logits, fused_recorded = _recorded(True, train, perturbed)
    for i, (size, channels) in enumerate(zip((32, 16, 8), BLOCK_CHANNELS), start=1):
        full, pooled = (16, size, size, channels), (16, size // 2, size // 2, channels)
        assert recorded[f"conv{i}"]["__call__"][0].shape == full
        assert recorded[f"bn{i}"]["__call__"][0].shape == full
        for gate in ("channel_attn", "spatial_attn"):
            assert recorded[f"cbam{i}"][gate]["__call__"][0].shape == pooled
        assert f"conv{i}" not in fused_recorded and f"bn{i}" not in fused_recorded
    assert _rel(fused_logits, logits) < FORWARD_TOLERANCE


def test_recording_or_intercepting_calls_leaves_the_path_as_chosen(variables):
    """The path is the `fused` field's, whatever the caller records or intercepts: the fused
    ops are in the fused program under an interceptor and absent from the reference one."""
    x = jnp.zeros((2, 32, 32, 3))

    def jaxpr(fused):
        with nn.intercept_methods(lambda next_fun, args, kwargs, context: next_fun(*args,
                                                                                   **kwargs)):
            return str(jax.make_jaxpr(lambda v: CBAMCNN(fused=fused).apply(
                v, x, train=True, rngs={"dropout": jax.random.key(0)}, capture_intermediates=True,
                mutable=["batch_stats", "intermediates"]))(variables))

    fused, reference = jaxpr(True), jaxpr(False)
    for op in ("batch_norm_relu_pool_train", "cbam_tutorial", "_dense"):
        assert op in fused and op not in reference, op


def test_no_module_reads_a_private_flax_attribute():
    """The path is a field, not Flax's private state: no `_context`, interceptor stack or
    `__captures__` in the library (the check fails on the code that read them)."""
    private = re.compile(r"__captures__|\b(?:nn|nnx|flax|module|linen)\._\w"
                         r"|getattr\([^,]+,\s*[\"']_\w")
    package = pathlib.Path(cbam_jax.__file__).parent
    found = {str(path.relative_to(package)): private.findall(path.read_text())
             for path in package.rglob("*.py")}
    assert not {path: hits for path, hits in found.items() if hits}
    assert private.search("stack = getattr(getattr(module, '_context', None), 'capture_stack')")
    assert private.search("if hasattr(self, '__captures__'):")


# --- odd inputs ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_an_empty_batch_in_evaluation_gives_empty_logits(variables):
    for fused in (True, False):
        logits = CBAMCNN(fused=fused).apply(variables, jnp.zeros((0, 32, 32, 3)))
        assert logits.shape == (0, 10) and logits.dtype == jnp.float32


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int32])
def test_integer_input_is_refused_saying_how_to_cast(variables, dtype):
    # Computed, it would run on 0-255 values instead of normalised ones.
    with pytest.raises(ValueError, match=rf"CBAMCNN expects floating-point input \[batch, 32, "
                                         rf"32, 3\], got {jnp.dtype(dtype).name}: cast it first"):
        CBAMCNN().apply(variables, jnp.full((2, 32, 32, 3), 200, dtype))
