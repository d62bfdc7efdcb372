"""CBAM-ResNet-18/34/50 (Woo et al., 2018; Jongchan/attention-module MODELS/model_resnet.py), NHWC.

CBAM gates each block's residual branch after its last BatchNorm, before the addition. Names
follow torchvision's / the official state_dict (`layer2_0.downsample_1` <-> `layer2.0.downsample.1`),
so `parameter_report` prints PyTorch-style names. The ImageNet stem is the 7x7/2 conv and the
3x3/2 max-pool; the CIFAR stem is a 3x3/1 conv without max-pool. The head is a global average
pool, which is the official AvgPool2d(7) at 224 px and avg_pool2d(4) at 32 px.
Initialisation is torchvision's; the official code also zeroes the spatial gates' BatchNorm
scale (each gate starts at sigmoid(0) = 0.5), which this port leaves at one, as standalone CBAM.
"""
import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cbam_jax.layers import CBAM, BatchNorm

Dtype = Any

# torchvision's and the official code's init: kaiming_normal(mode='fan_out') for convs,
# kaiming_normal (fan_in) with zero bias for the classifier.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
fc_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

STEMS = ("imagenet", "cifar")


def _conv(features, kernel, strides, name, dtype, param_dtype):
    pad = kernel // 2  # PyTorch's symmetric padding; 'SAME' would pad stride-2 convs unevenly
    return nn.Conv(features, (kernel, kernel), (strides, strides), padding=((pad, pad), (pad, pad)),
                   use_bias=False, kernel_init=conv_init, dtype=dtype, param_dtype=param_dtype,
                   name=name)


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> CBAM, plus the (projected) input, then ReLU."""

    features: int
    strides: int = 1
    cbam_preset: str | None = "official"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(_conv, dtype=self.dtype, param_dtype=self.param_dtype)
        bn = functools.partial(BatchNorm, dtype=self.dtype, param_dtype=self.param_dtype)
        out = nn.relu(bn(name="bn1")(conv(self.features, 3, self.strides, "conv1")(x), train))
        out = bn(name="bn2")(conv(self.features, 3, 1, "conv2")(out), train)
        return nn.relu(_attend(self, out, train) + _shortcut(self, x, train))


class Bottleneck(nn.Module):
    """conv1x1 -> conv3x3 (strided) -> conv1x1 (x4 channels), each with BN; CBAM; residual; ReLU."""

    features: int
    strides: int = 1
    cbam_preset: str | None = "official"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(_conv, dtype=self.dtype, param_dtype=self.param_dtype)
        bn = functools.partial(BatchNorm, dtype=self.dtype, param_dtype=self.param_dtype)
        out = nn.relu(bn(name="bn1")(conv(self.features, 1, 1, "conv1")(x), train))
        out = nn.relu(bn(name="bn2")(conv(self.features, 3, self.strides, "conv2")(out), train))
        out = bn(name="bn3")(conv(self.features * 4, 1, 1, "conv3")(out), train)
        return nn.relu(_attend(self, out, train) + _shortcut(self, x, train))


def _attend(block, out, train):
    if block.cbam_preset is None:
        return out
    return CBAM.preset(block.cbam_preset, dtype=block.dtype, param_dtype=block.param_dtype,
                       parent=block, name="cbam")(out, train)


def _shortcut(block, x, train):
    out_features = block.features * block.expansion
    if block.strides == 1 and x.shape[-1] == out_features:
        return x
    x = _conv(out_features, 1, block.strides, "downsample_0", block.dtype, block.param_dtype)(x)
    return BatchNorm(dtype=block.dtype, param_dtype=block.param_dtype, name="downsample_1")(x, train)


class CBAMResNet(nn.Module):
    """ResNet with CBAM in every block: x [B, H, W, 3] -> logits [B, num_classes] (float32).

    `cbam_preset=None` is the plain ResNet (torchvision's parameter count); the default is the
    official CBAM (MLP with biases, spatial BatchNorm), as in the official model_resnet.py.
    """

    stage_sizes: Sequence[int]
    block: type = BasicBlock
    num_classes: int = 1000
    stem: str = "imagenet"  # or "cifar": 3x3/1 conv, no max-pool
    cbam_preset: str | None = "official"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 4:
            raise ValueError(f"CBAMResNet expects NHWC input [batch, height, width, channels], "
                             f"got shape {x.shape}")
        if self.stem not in STEMS:
            raise ValueError(f"CBAMResNet.stem must be one of {STEMS}, got {self.stem!r}")
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.stem == "imagenet":
            x = _conv(64, 7, 2, "conv1", **dtypes)(x)
        else:
            x = _conv(64, 3, 1, "conv1", **dtypes)(x)
        x = nn.relu(BatchNorm(name="bn1", **dtypes)(x, train))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
        for stage, blocks in enumerate(self.stage_sizes):
            for i in range(blocks):
                strides = 2 if stage > 0 and i == 0 else 1
                x = self.block(64 * 2**stage, strides, self.cbam_preset,
                               name=f"layer{stage + 1}_{i}", **dtypes)(x, train)
        x = x.mean(axis=(1, 2))
        x = nn.Dense(self.num_classes, kernel_init=fc_init, name="fc", **dtypes)(x)
        return x.astype(jnp.float32)


def cbam_resnet18(num_classes: int = 1000, **kwargs) -> CBAMResNet:
    """CBAM-ResNet-18: basic blocks [2, 2, 2, 2]."""
    return CBAMResNet((2, 2, 2, 2), BasicBlock, num_classes, **kwargs)


def cbam_resnet34(num_classes: int = 1000, **kwargs) -> CBAMResNet:
    """CBAM-ResNet-34: basic blocks [3, 4, 6, 3]."""
    return CBAMResNet((3, 4, 6, 3), BasicBlock, num_classes, **kwargs)


def cbam_resnet50(num_classes: int = 1000, **kwargs) -> CBAMResNet:
    """CBAM-ResNet-50: bottleneck blocks [3, 4, 6, 3]."""
    return CBAMResNet((3, 4, 6, 3), Bottleneck, num_classes, **kwargs)


_RESNETS = {"cbam_resnet18": cbam_resnet18, "cbam_resnet34": cbam_resnet34,
            "cbam_resnet50": cbam_resnet50}
MODEL_NAMES = ("cbam_cnn", *_RESNETS)


def create_model(name: str, num_classes: int = 10, dtype: Dtype | None = None,
                 stem: str = "cifar") -> nn.Module:
    """A model by name, each called as `apply(variables, x, train=...)` with 'batch_stats'."""
    if name == "cbam_cnn":
        from cbam_jax.models import CBAMCNN  # models.py re-exports this module: import late

        return CBAMCNN(num_classes=num_classes, dtype=dtype)
    if name not in _RESNETS:
        raise ValueError(f"unknown model {name!r}: expected one of {MODEL_NAMES}")
    return _RESNETS[name](num_classes, stem=stem, dtype=dtype)
