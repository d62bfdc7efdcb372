"""CBAM's options and its presets: tutorial (default), official, timm. Runtime: ~40 s of CPU."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cbam_jax
from cbam_jax import CBAM, ChannelAttention, SpatialAttention
from cbam_jax import nnx as cbam_nnx
from cbam_jax.options import CBAM_PRESETS, CBAMOptions, ChannelOptions, SpatialOptions


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _init_apply(module, x, **kwargs):
    variables = module.init(jax.random.key(0), x)
    return variables, module.apply(variables, x, **kwargs)


def _shapes(module, shape):
    """`init`'s variables as shapes only: no arrays are computed."""
    return jax.eval_shape(module.init, jax.random.key(0), jnp.ones(shape))


def timm_make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    """timm.layers.helpers.make_divisible, as published."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def test_tutorial_preset_is_the_default_module():
    assert CBAM.preset("tutorial") == CBAM()
    assert CBAM.preset("tutorial", ratio=8) == CBAM(ratio=8)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match=r"\['official', 'timm', 'tutorial'\]"):
        CBAM.preset("paper")


def test_presets_differ_from_the_tutorial_only_where_documented():
    assert CBAM_PRESETS["official"] == dict(mlp_bias=True, spatial_pool_order=("max", "avg"),
                                            spatial_bn=True, bn_momentum=0.01)
    assert CBAM_PRESETS["timm"] == dict(rd_round="nearest", spatial_bn=True)
    official, timm = CBAM.preset("official"), CBAM.preset("timm")
    assert official.pool_types == ("avg", "max") and official.bn_epsilon == 1e-5
    assert (timm.bn_momentum, timm.bn_epsilon, timm.mlp_bias) == (0.1, 1e-5, False)
    assert CBAM.preset("official", pool_types=("avg", "max", "lp", "lse")).pool_types[-1] == "lse"


def test_official_preset_variables():
    variables = _shapes(CBAM.preset("official"), (1, 5, 5, 64))
    params = variables["params"]
    assert params["channel_attn"]["fc_0"]["kernel"].shape == (64, 4)
    assert params["channel_attn"]["fc_0"]["bias"].shape == (4,)
    assert params["channel_attn"]["fc_2"]["bias"].shape == (64,)
    assert set(params["spatial_attn"]["conv"]) == {"kernel"}  # conv without bias
    assert params["spatial_attn"]["conv"]["kernel"].shape == (7, 7, 2, 1)
    assert set(params["spatial_attn"]["bn"]) == {"scale", "bias"}
    assert set(variables["batch_stats"]["spatial_attn"]["bn"]) == {"mean", "var",
                                                                  "num_batches_tracked"}


@pytest.mark.parametrize("channels", [8, 24, 40, 56, 64, 100, 2048])
def test_timm_preset_width_is_timms_make_divisible(channels):
    expected = timm_make_divisible(channels / 16, 1, round_limit=0.0)
    variables = _shapes(CBAM.preset("timm"), (1, 2, 2, channels))
    fc = variables["params"]["channel_attn"]
    assert fc["fc_0"]["kernel"].shape == (channels, expected)
    assert set(fc["fc_0"]) == {"kernel"} and set(fc["fc_2"]) == {"kernel"}  # bias-free
    assert variables["batch_stats"]["spatial_attn"]["bn"]["mean"].shape == (1,)


@pytest.mark.parametrize(("channels", "expected"), [(24, (1, 2)), (40, (2, 3)), (8, (1, 1))])
def test_floor_and_nearest_rounding_of_the_hidden_width(channels, expected):
    widths = (ChannelOptions().hidden_width(channels),
              ChannelOptions(rd_round="nearest").hidden_width(channels))
    assert widths == expected


def test_explicit_hidden_features_and_the_floor():
    assert ChannelOptions(hidden_features=5).hidden_width(64) == 5
    assert ChannelOptions(min_hidden=4).hidden_width(8) == 4
    variables = _shapes(ChannelAttention(hidden_features=5), (1, 3, 3, 64))
    assert variables["params"]["fc_0"]["kernel"].shape == (64, 5)


@pytest.mark.parametrize("pool_types", [("lp",), ("lse",), ("avg", "max", "lp", "lse")],
                         ids="+".join)
def test_channel_pools_bias_and_activation_match_their_definition(pool_types):
    """gate = sigmoid(sum_p W2 act(W1 pool_p(x) + b1) + b2); lp = sqrt(sum x^2), lse = log sum exp."""
    x = jax.random.normal(jax.random.key(4), (2, 3, 5, 32))
    module = ChannelAttention(ratio=8, pool_types=pool_types, mlp_bias=True, act=nn.tanh)
    variables, y = _init_apply(module, x)
    p = {k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in variables["params"].items()}
    xn = np.asarray(x, np.float64)
    pools = {"avg": xn.mean(axis=(1, 2)), "max": xn.max(axis=(1, 2)),
             "lp": np.sqrt((xn ** 2).sum(axis=(1, 2))),
             "lse": np.log(np.exp(xn).sum(axis=(1, 2)))}
    mlp = lambda v: np.tanh(v @ p["fc_0"]["kernel"] + p["fc_0"]["bias"]) @ p["fc_2"]["kernel"] \
        + p["fc_2"]["bias"]
    gate = _sigmoid(sum(mlp(pools[name]) for name in pool_types))
    np.testing.assert_allclose(y, xn * gate[:, None, None, :], rtol=1e-5, atol=1e-6)


def test_gate_function_is_used_by_both_gates():
    x = jax.random.normal(jax.random.key(5), (2, 4, 4, 16))
    _, y = _init_apply(CBAM(gate=lambda z: jnp.ones_like(z)), x)
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("order", [("avg", "max"), ("max", "avg")])
def test_spatial_pool_order_sets_the_conv_inputs(order):
    x = jax.random.normal(jax.random.key(6), (1, 4, 6, 8))
    module = SpatialAttention(kernel_size=1, spatial_pool_order=order)
    variables = {"params": {"conv": {"kernel": jnp.array([1.0, 0.0]).reshape(1, 1, 2, 1)}}}
    y = module.apply(variables, x)  # the 1x1 conv reads only the first map
    xn = np.asarray(x, np.float64)
    first = xn.mean(-1) if order[0] == "avg" else xn.max(-1)
    np.testing.assert_allclose(y, xn * _sigmoid(first)[..., None], rtol=1e-5, atol=1e-6)


def test_spatial_batchnorm_trains_with_its_momentum_and_evaluates_with_running_stats():
    x = jax.random.normal(jax.random.key(7), (4, 6, 6, 16)) + 1
    module = CBAM.preset("official")
    variables = module.init(jax.random.key(0), x)
    y_eval = module.apply(variables, x)  # train defaults to False: running statistics
    y_train, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(y_eval, y_train)
    stats = updates["batch_stats"]["spatial_attn"]["bn"]
    assert int(stats["num_batches_tracked"]) == 1

    # The conv's output, recomputed: the BatchNorm's input.
    gated = ChannelAttention(mlp_bias=True).apply(
        {"params": variables["params"]["channel_attn"]}, x)
    maps = jnp.stack([gated.max(-1), gated.mean(-1)], -1)
    conv = nn.Conv(1, (7, 7), padding=3, use_bias=False)
    logits = np.asarray(conv.apply({"params": variables["params"]["spatial_attn"]["conv"]}, maps))
    np.testing.assert_allclose(stats["mean"], 0.01 * logits.mean(), rtol=1e-4)
    np.testing.assert_allclose(stats["var"], 0.99 + 0.01 * logits.var(ddof=1), rtol=1e-5)


def test_no_spatial_is_channel_attention_alone():
    x = jax.random.normal(jax.random.key(8), (2, 4, 4, 32))
    variables, y = _init_apply(CBAM.preset("official", no_spatial=True), x)
    assert set(variables) == {"params"} and set(variables["params"]) == {"channel_attn"}
    expected = ChannelAttention(mlp_bias=True).apply({"params": variables["params"]["channel_attn"]},
                                                     x)
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("preset", ["official", "timm"])
def test_presets_compute_in_bfloat16_with_float32_params(preset):
    module = CBAM.preset(preset, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(9), (2, 6, 6, 32)).astype(jnp.bfloat16)
    variables = module.init(jax.random.key(0), x)
    assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree.leaves(variables))
    y = module.apply(variables, x)
    assert y.dtype == jnp.bfloat16
    reference = CBAM.preset(preset).apply(variables, x.astype(jnp.float32))
    # bfloat16 keeps 8 significant bits: relative error ~2^-8 per op.
    np.testing.assert_allclose(np.asarray(y, np.float32), reference, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize(("module", "match"), [
    (ChannelAttention(pool_types=("avg", "min")), r"pool_types must be .*\['avg', 'lp', 'lse', 'max'\]"),
    (ChannelAttention(pool_types=()), "pool_types"),
    (SpatialAttention(spatial_pool_order="max"), r"spatial_pool_order must be .*\['avg', 'max'\]"),
    (SpatialAttention(bn_momentum=1.5), r"bn_momentum must be in \[0, 1\]"),
    (ChannelAttention(rd_round="ceil"), "rd_round must be 'floor' or 'nearest'"),
])
def test_bad_options_name_what_was_expected(module, match):
    with pytest.raises(ValueError, match=match):
        module.init(jax.random.key(0), jnp.ones((1, 4, 4, 32)))


# --- one definition of the options, for every layer and both APIs ------------------------------

LAYER_OPTIONS = {"ChannelAttention": ChannelOptions, "SpatialAttention": SpatialOptions,
                 "CBAM": CBAMOptions}


@pytest.mark.parametrize("layer", LAYER_OPTIONS)
def test_each_layer_takes_its_options_with_their_names_and_defaults(layer):
    """The Linen layers' option fields are the options classes' (one name and default each);
    the NNX constructors build the same class from their keywords."""
    module_fields = {f.name: f.default for f in dataclasses.fields(getattr(cbam_jax, layer))}
    options = {f.name: f.default for f in dataclasses.fields(LAYER_OPTIONS[layer])}
    assert {k: module_fields[k] for k in options} == options
    assert set(module_fields) - set(options) <= {"dtype", "param_dtype", "fused", "parent", "name"}
    kwargs = {"in_features": 32} if layer != "SpatialAttention" else {}
    built = nnx.eval_shape(lambda: getattr(cbam_nnx, layer)(rngs=nnx.Rngs(0), **kwargs))
    assert built.options == LAYER_OPTIONS[layer]()


def test_the_cbam_options_are_the_channel_and_spatial_ones_and_no_spatial():
    channel = {f.name for f in dataclasses.fields(ChannelOptions)}
    spatial = {f.name for f in dataclasses.fields(SpatialOptions)}
    assert {f.name for f in dataclasses.fields(CBAMOptions)} == channel | spatial | {"no_spatial"}
    assert channel & spatial == {"gate"}  # one gate function for both


def test_a_layer_refuses_an_option_it_does_not_have():
    with pytest.raises(TypeError, match="kernel_size"):
        ChannelAttention(kernel_size=3)
    with pytest.raises(TypeError, match="kernel_size"):
        cbam_nnx.ChannelAttention(32, kernel_size=3, rngs=nnx.Rngs(0))
