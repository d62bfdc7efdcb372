"""CBAMCNN: SPEC's architecture, parameter table, train/eval behaviour and input checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbam_jax import CBAMCNN, parameter_report, torch_style_name

# SPEC.md's table, in the tutorial's order.
SPEC_PARAMETERS = {
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


def test_parameter_report_matches_spec_table_in_order(variables, capsys):
    report = parameter_report(variables["params"])
    assert list(report.items()) == list(SPEC_PARAMETERS.items())
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


def test_spatial_attention_maps_of_every_block_are_available(variables):
    _, state = CBAMCNN().apply(variables, jnp.ones((2, 32, 32, 3)), mutable=["intermediates"])
    sizes = {name: state["intermediates"][name]["spatial_attn"]["spatial_attention"][0].shape
             for name in ("cbam1", "cbam2", "cbam3")}
    assert sizes == {"cbam1": (2, 16, 16, 1), "cbam2": (2, 8, 8, 1), "cbam3": (2, 4, 4, 1)}


@pytest.mark.parametrize("shape", [(32, 32, 3), (2, 3, 32, 32), (2, 28, 28, 3), (2, 32, 32, 1)])
def test_wrong_input_shape_names_the_expected_one(variables, shape):
    with pytest.raises(ValueError, match=r"\[batch, 32, 32, 3\]"):
        CBAMCNN().apply(variables, jnp.ones(shape))


def test_every_parameter_gets_a_gradient(variables):
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
        assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)


def test_bfloat16_compute_keeps_float32_params_and_logits(variables):
    x = jax.random.normal(jax.random.key(3), (4, 32, 32, 3))
    logits = CBAMCNN(dtype=jnp.bfloat16).apply(variables, x)
    reference = CBAMCNN().apply(variables, x)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    # bfloat16's 8-bit mantissa through ~10 layers: agreement to a few percent of the logit scale.
    scale = float(np.abs(reference).max())
    np.testing.assert_allclose(logits, reference, atol=0.1 * scale)
