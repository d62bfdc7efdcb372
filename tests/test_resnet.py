"""CBAM-ResNet-18/34/50: parameter counts against torchvision's ResNets, stems, names, a forward.

Counts use `jax.eval_shape` (no arrays are built); only ResNet-18 runs, on 16x16 inputs with
variables filled in from the shapes (a real `init` compiles every initialiser: tens of
seconds on 2 busy cores, for nothing the counts do not already check). Runtime: ~30 s.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbam_jax.models import CBAMCNN
from cbam_jax.naming import parameter_report
from cbam_jax.registry import create_model
from cbam_jax.resnet import CBAMResNet, cbam_resnet18, cbam_resnet34, cbam_resnet50

FACTORIES = {18: cbam_resnet18, 34: cbam_resnet34, 50: cbam_resnet50}
# torchvision.models.resnet{18,34,50}(num_classes=1000): sum(p.numel() for p in m.parameters()).
TORCHVISION_COUNTS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032}
# Output channels of every block, stage by stage: CBAM gates the block's output.
BLOCK_WIDTHS = {
    18: [64] * 2 + [128] * 2 + [256] * 2 + [512] * 2,
    34: [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3,
    50: [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3,
}
IMAGENET = (1, 224, 224, 3)


def official_cbam_parameters(c: int) -> int:
    """The official CBAM on c channels: Linear(c, c//16) + Linear(c//16, c) with biases, a
    bias-free 7x7 conv from 2 maps to 1, and its BatchNorm's weight and bias."""
    r = c // 16
    return (c * r + r) + (r * c + c) + 2 * 7 * 7 + 2


def _params(model, shape=IMAGENET):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))["params"]


def _count(model, shape=IMAGENET):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(_params(model, shape)))


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_without_cbam_the_counts_are_torchvision_resnets(depth):
    assert _count(FACTORIES[depth](cbam_preset=None)) == TORCHVISION_COUNTS[depth]


@pytest.mark.parametrize("depth", [18, 50])
def test_official_cbam_adds_one_gate_per_block(depth):
    additions = sum(official_cbam_parameters(c) for c in BLOCK_WIDTHS[depth])
    count = _count(FACTORIES[depth]())
    assert count == TORCHVISION_COUNTS[depth] + additions
    # The CBAM paper's Table: ResNet18 + CBAM 11.78M, ResNet50 + CBAM 28.09M parameters.
    assert round(count / 1e6, 2) == {18: 11.78, 50: 28.09}[depth]


def test_tutorial_cbam_in_a_resnet_has_no_biases_and_no_spatial_batchnorm():
    additions = sum(2 * c * (c // 16) + 2 * 7 * 7 for c in BLOCK_WIDTHS[18])
    assert _count(cbam_resnet18(cbam_preset="tutorial")) == TORCHVISION_COUNTS[18] + additions


def test_cifar_stem_is_a_3x3_conv_without_max_pool():
    imagenet, cifar = cbam_resnet18(num_classes=10), cbam_resnet18(num_classes=10, stem="cifar")
    assert _count(imagenet) - _count(cifar) == (7 * 7 - 3 * 3) * 3 * 64
    assert _params(cifar)["conv1"]["kernel"].shape == (3, 3, 3, 64)

    def layer1_output(model, hw):
        x = jnp.zeros((1, hw, hw, 3))
        variables = jax.eval_shape(model.init, jax.random.key(0), x)
        _, state = jax.eval_shape(lambda v: model.apply(
            v, x, capture_intermediates=lambda m, _: m.name == "layer1_1",
            mutable=["intermediates"]), variables)
        return state["intermediates"]["layer1_1"]["__call__"][0].shape

    assert layer1_output(imagenet, 64) == (1, 16, 16, 64)  # 7x7/2 conv, 3x3/2 max-pool
    assert layer1_output(cifar, 32) == (1, 32, 32, 64)  # full resolution


def test_parameter_names_follow_torchvision_with_the_gate_on_each_block():
    names18 = parameter_report(_params(cbam_resnet18()), print_fn=None)
    assert {"conv1.weight", "bn1.weight", "bn1.bias"} <= set(names18)
    assert "layer2.0.downsample.0.weight" in names18 and "layer1.0.downsample.0.weight" not in names18
    assert names18["layer3.1.cbam.channel_attn.fc.0.weight"] == 256 * 16
    assert names18["layer3.1.cbam.spatial_attn.bn.weight"] == 1
    assert names18["fc.weight"] == 512 * 1000
    names50 = parameter_report(_params(cbam_resnet50()), print_fn=None)
    assert names50["layer1.0.downsample.0.weight"] == 64 * 256  # 64 -> 4 * 64 channels
    assert names50["layer4.2.cbam.channel_attn.fc.0.weight"] == 2048 * 128
    assert names50["fc.weight"] == 2048 * 1000


def _filled_variables(model, x):
    """Variables of the right shapes: He-normal kernels, BatchNorm at its PyTorch init."""
    template = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name == "num_batches_tracked":
            return jnp.zeros((), jnp.int32)
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape)
        if name in ("bias", "mean"):
            return jnp.asarray(rng.normal(size=leaf.shape) * 0.1, jnp.float32)
        fan_in = math.prod(leaf.shape[:-1])
        return jnp.asarray(rng.normal(size=leaf.shape) * math.sqrt(2 / fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, template)


def test_resnet18_forward_in_train_and_eval_mode():
    model = create_model("cbam_resnet18", num_classes=10, stem="cifar")
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    variables = _filled_variables(model, x)

    @jax.jit
    def forward(variables, x):
        train_logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                            rngs={"dropout": jax.random.key(2)})
        return train_logits, updates["batch_stats"], model.apply(variables, x, train=False)

    train_logits, stats, eval_logits = forward(variables, x)
    for logits in (train_logits, eval_logits):
        assert logits.shape == (2, 10) and logits.dtype == jnp.float32
        assert np.all(np.isfinite(logits))
    assert not np.allclose(train_logits, eval_logits)  # batch vs running statistics
    counters = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(stats)
                if path[-1].key == "num_batches_tracked"]
    assert len(counters) == 1 + 2 * 8 + 3 + 8  # stem, 2 per block, 3 downsamples, 8 gates
    assert all(int(c) == 1 for c in counters)
    spatial_bn = stats["layer4_1"]["cbam"]["spatial_attn"]["bn"]
    old_mean = variables["batch_stats"]["layer4_1"]["cbam"]["spatial_attn"]["bn"]["mean"]
    assert not np.allclose(spatial_bn["mean"], old_mean)  # the official gate's own BatchNorm


def test_create_model_builds_each_name():
    assert isinstance(create_model("cbam_cnn", 10), CBAMCNN)
    resnet = create_model("cbam_resnet50", 100, dtype=jnp.bfloat16, stem="imagenet")
    assert isinstance(resnet, CBAMResNet)
    assert (resnet.num_classes, resnet.stem, resnet.dtype) == (100, "imagenet", jnp.bfloat16)
    assert create_model("cbam_resnet34", 10).stage_sizes == (3, 4, 6, 3)
    with pytest.raises(ValueError, match="cbam_resnet18"):
        create_model("resnet18", 10)


def test_bad_stem_and_rank_name_what_was_expected():
    with pytest.raises(ValueError, match="imagenet"):
        _params(cbam_resnet18(stem="tiny"))
    with pytest.raises(ValueError, match=r"\[batch, height, width, channels\]"):
        _params(cbam_resnet18(), (32, 32, 3))


def test_integer_input_is_refused_saying_how_to_cast():
    model = cbam_resnet18(num_classes=10, stem="cifar")
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match=r"CBAMResNet expects floating-point input .* got "
                                         r"uint8: cast it first"):
        jax.eval_shape(model.apply, variables, jnp.zeros((2, 16, 16, 3), jnp.uint8))


@pytest.mark.parametrize("fused", [True, False])
def test_an_empty_batch_in_evaluation_gives_empty_logits(fused):
    model = cbam_resnet18(num_classes=10, stem="cifar", fused=fused)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    logits = jax.eval_shape(model.apply, variables, jnp.zeros((0, 16, 16, 3)))
    assert (logits.shape, logits.dtype) == ((0, 10), jnp.float32)
