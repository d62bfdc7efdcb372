"""CBAM-ResNet-18/34/50 (Woo et al., 2018; Jongchan/attention-module MODELS/model_resnet.py), NHWC.

CBAM gates each block's residual branch after its last BatchNorm, before the addition. Names
follow torchvision's / the official state_dict (`layer2_0.downsample_1` <-> `layer2.0.downsample.1`),
so `parameter_report` prints PyTorch-style names. The ImageNet stem is the 7x7/2 conv and the
3x3/2 max-pool; the CIFAR stem is a 3x3/1 conv without max-pool. The head is a global average
pool, which is the official AvgPool2d(7) at 224 px and avg_pool2d(4) at 32 px.
Initialisation is torchvision's; the official code also zeroes the spatial gates' BatchNorm
scale (each gate starts at sigmoid(0) = 0.5), which this port leaves at one, as standalone CBAM.

As in Flax's own ResNet example, the blocks take their conv and norm as module factories, and
the attention as one too (`attn_layer`, timm's name): any callable that builds a module from
`name=` and is applied as `attn(x, train)`, or None for the plain ResNet.
"""
import functools
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cbam_jax.layers import BatchNorm
from cbam_jax.registry import attention_layer

ModuleDef = Callable[..., nn.Module]

# torchvision's and the official code's init: kaiming_normal(mode='fan_out') for convs,
# kaiming_normal (fan_in) with zero bias for the classifier.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
fc_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

STEMS = ("imagenet", "cifar")


def check_input(x, stem: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"CBAMResNet expects NHWC input [batch, height, width, channels], "
                         f"got shape {x.shape}")
    check_stem(stem)


def check_stem(stem: str) -> None:
    if stem not in STEMS:
        raise ValueError(f"CBAMResNet.stem must be one of {STEMS}, got {stem!r}")


def imagenet_stem_pool(x):
    """The ImageNet stem's 3x3/2 max-pool with PyTorch's padding 1 (pads with -inf)."""
    return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))


def torch_conv(features: int, kernel: int, strides: int = 1, **kwargs) -> nn.Conv:
    """A bias-free conv with PyTorch's symmetric padding k // 2 ('SAME' would pad stride-2 convs
    unevenly) and torchvision's init."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), (strides, strides), padding=((pad, pad), (pad, pad)),
                   use_bias=False, kernel_init=conv_init, **kwargs)


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> attention, plus the (projected) input, then ReLU."""

    features: int
    conv: ModuleDef
    norm: ModuleDef
    attn_layer: ModuleDef | None = None
    strides: int = 1
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        out = nn.relu(self.norm(name="bn1")(self.conv(self.features, 3, self.strides,
                                                      name="conv1")(x), train))
        out = self.norm(name="bn2")(self.conv(self.features, 3, name="conv2")(out), train)
        return nn.relu(_attend(self, out, train) + _shortcut(self, x, train))


class Bottleneck(nn.Module):
    """conv1x1 -> conv3x3 (strided) -> conv1x1 (x4 channels), each with BN; attention; residual; ReLU."""

    features: int
    conv: ModuleDef
    norm: ModuleDef
    attn_layer: ModuleDef | None = None
    strides: int = 1
    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        out = nn.relu(self.norm(name="bn1")(self.conv(self.features, 1, name="conv1")(x), train))
        out = nn.relu(self.norm(name="bn2")(self.conv(self.features, 3, self.strides,
                                                      name="conv2")(out), train))
        out = self.norm(name="bn3")(self.conv(self.features * 4, 1, name="conv3")(out), train)
        return nn.relu(_attend(self, out, train) + _shortcut(self, x, train))


def _attend(block, out, train):
    return out if block.attn_layer is None else block.attn_layer(name="cbam")(out, train)


def _shortcut(block, x, train):
    out_features = block.features * block.expansion
    if block.strides == 1 and x.shape[-1] == out_features:
        return x
    x = block.conv(out_features, 1, block.strides, name="downsample_0")(x)
    return block.norm(name="downsample_1")(x, train)


class CBAMResNet(nn.Module):
    """ResNet with attention in every block: x [B, H, W, 3] -> logits [B, num_classes] (float32).

    `attn_layer=None` is the plain ResNet (torchvision's parameter count); the default is the
    official CBAM (MLP with biases, spatial BatchNorm), as in the official model_resnet.py.
    """

    stage_sizes: Sequence[int]
    block: type = BasicBlock
    num_classes: int = 1000
    stem: str = "imagenet"  # or "cifar": 3x3/1 conv, no max-pool
    attn_layer: ModuleDef | None = attention_layer("official")
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_input(x, self.stem)
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv = functools.partial(torch_conv, **dtypes)
        norm = functools.partial(BatchNorm, **dtypes)
        attn = (None if self.attn_layer is None
                else functools.partial(self.attn_layer, **dtypes))
        if self.stem == "imagenet":
            x = conv(64, 7, 2, name="conv1")(x)
        else:
            x = conv(64, 3, name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x, train))
        if self.stem == "imagenet":
            x = imagenet_stem_pool(x)
        for stage, blocks in enumerate(self.stage_sizes):
            for i in range(blocks):
                x = self.block(64 * 2**stage, conv=conv, norm=norm, attn_layer=attn,
                               strides=2 if stage > 0 and i == 0 else 1,
                               name=f"layer{stage + 1}_{i}")(x, train)
        x = x.mean(axis=(1, 2))
        x = nn.Dense(self.num_classes, kernel_init=fc_init, name="fc", **dtypes)(x)
        return x.astype(jnp.float32)


def _resnet(stage_sizes, block, num_classes: int, cbam_preset: str | None, **kwargs):
    attn = None if cbam_preset is None else attention_layer(cbam_preset)
    return CBAMResNet(stage_sizes, block, num_classes, attn_layer=attn, **kwargs)


def cbam_resnet18(num_classes: int = 1000, cbam_preset: str | None = "official",
                  **kwargs) -> CBAMResNet:
    """CBAM-ResNet-18: basic blocks [2, 2, 2, 2]; `cbam_preset` names the CBAM (None: plain)."""
    return _resnet((2, 2, 2, 2), BasicBlock, num_classes, cbam_preset, **kwargs)


def cbam_resnet34(num_classes: int = 1000, cbam_preset: str | None = "official",
                  **kwargs) -> CBAMResNet:
    """CBAM-ResNet-34: basic blocks [3, 4, 6, 3]."""
    return _resnet((3, 4, 6, 3), BasicBlock, num_classes, cbam_preset, **kwargs)


def cbam_resnet50(num_classes: int = 1000, cbam_preset: str | None = "official",
                  **kwargs) -> CBAMResNet:
    """CBAM-ResNet-50: bottleneck blocks [3, 4, 6, 3]."""
    return _resnet((3, 4, 6, 3), Bottleneck, num_classes, cbam_preset, **kwargs)
