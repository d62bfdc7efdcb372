"""CBAM-ResNet-18/34/50 (Woo et al., 2018; Jongchan/attention-module MODELS/model_resnet.py), NHWC.

CBAM gates each block's residual branch after its last BatchNorm, before the addition. Names
follow torchvision's / the official state_dict (`layer2_0.downsample_1` <-> `layer2.0.downsample.1`),
so `parameter_report` prints PyTorch-style names. The ImageNet stem is the 7x7/2 conv and the
3x3/2 max-pool; the CIFAR stem is a 3x3/1 conv without max-pool. The head is a global average
pool, which is the official AvgPool2d(7) at 224 px and avg_pool2d(4) at 32 px.
Initialisation is torchvision's; the official code also zeroes the spatial gates' BatchNorm
scale (each gate starts at sigmoid(0) = 0.5), which this port leaves at one, as standalone CBAM.

The architecture is written once: the blocks (`BasicBlock`, `Bottleneck`: their layers and
forward pass) and the network (`resnet_layers`, `resnet_forward`), built by the Linen
`CBAMResNet` here and the NNX one in `cbam_jax.nnx`. As in timm, the attention is a factory
(`attn_layer`): for Linen, any callable that builds a module from `name=`, `dtype=`,
`param_dtype=` and `fused=` and is applied as `attn(x, train=...)`; None is the plain ResNet.
"""
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbam_jax import ops
from cbam_jax.layers import LinenLayers
from cbam_jax.registry import attention_layer

# torchvision's and the official code's init: kaiming_normal(mode='fan_out') for convs,
# kaiming_normal (fan_in) with zero bias for the classifier.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
fc_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

STEMS = ("imagenet", "cifar")


def check_input(x, stem: str) -> None:
    ops.reference.check_nhwc(x, "CBAMResNet")
    check_stem(stem)


def check_stem(stem: str) -> None:
    if stem not in STEMS:
        raise ValueError(f"CBAMResNet.stem must be one of {STEMS}, got {stem!r}")


def imagenet_stem_pool(x):
    """The ImageNet stem's 3x3/2 max-pool with PyTorch's padding 1 (pads with -inf)."""
    return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))


# --- the blocks ------------------------------------------------------------------------------

def _conv(make, name, in_features, features, kernel_size, strides=1):
    return make.conv(name, in_features, features, kernel_size, strides, kernel_init=conv_init)


def _attention_and_shortcut(make, in_features: int, out_features: int, strides: int) -> dict:
    """The block's `cbam` (None without attention) and its projection `downsample_0/1` (None
    where the input already has the output's shape)."""
    projected = strides != 1 or in_features != out_features
    return {"cbam": make.attention("cbam", out_features),
            "downsample_0": (_conv(make, "downsample_0", in_features, out_features, 1, strides)
                             if projected else None),
            "downsample_1": make.batch_norm("downsample_1", out_features) if projected else None}


def _residual(layers, out, x, modal):
    """relu(attention(out) + the (projected) input)."""
    if layers["cbam"] is not None:
        out = modal(layers["cbam"], out)
    if layers["downsample_0"] is not None:
        x = modal(layers["downsample_1"], layers["downsample_0"](x))
    return jax.nn.relu(out + x)


class BasicBlock:
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> attention, plus the (projected) input, then ReLU."""

    expansion = 1

    @staticmethod
    def layers(make, in_features: int, features: int, strides: int) -> dict:
        return {"conv1": _conv(make, "conv1", in_features, features, 3, strides),
                "bn1": make.batch_norm("bn1", features),
                "conv2": _conv(make, "conv2", features, features, 3),
                "bn2": make.batch_norm("bn2", features),
                **_attention_and_shortcut(make, in_features, features, strides)}

    @staticmethod
    def forward(layers, x, modal):
        out = jax.nn.relu(modal(layers["bn1"], layers["conv1"](x)))
        out = modal(layers["bn2"], layers["conv2"](out))
        return _residual(layers, out, x, modal)


class Bottleneck:
    """conv1x1 -> conv3x3 (strided) -> conv1x1 (x4 channels), each with BN; attention; residual; ReLU."""

    expansion = 4

    @staticmethod
    def layers(make, in_features: int, features: int, strides: int) -> dict:
        return {"conv1": _conv(make, "conv1", in_features, features, 1),
                "bn1": make.batch_norm("bn1", features),
                "conv2": _conv(make, "conv2", features, features, 3, strides),
                "bn2": make.batch_norm("bn2", features),
                "conv3": _conv(make, "conv3", features, features * 4, 1),
                "bn3": make.batch_norm("bn3", features * 4),
                **_attention_and_shortcut(make, in_features, features * 4, strides)}

    @staticmethod
    def forward(layers, x, modal):
        out = jax.nn.relu(modal(layers["bn1"], layers["conv1"](x)))
        out = jax.nn.relu(modal(layers["bn2"], layers["conv2"](out)))
        out = modal(layers["bn3"], layers["conv3"](out))
        return _residual(layers, out, x, modal)


# --- the network -----------------------------------------------------------------------------

def block_names(stage_sizes: Sequence[int]) -> list[str]:
    """The blocks' names in order: layer1_0, layer1_1, ..., layer2_0, ..."""
    return [f"layer{stage + 1}_{i}" for stage, blocks in enumerate(stage_sizes)
            for i in range(blocks)]


def resnet_layers(make, stage_sizes: Sequence[int], block, num_classes: int, stem: str,
                  in_features: int | None) -> dict:
    """The ResNet's layers in order, {name: layer}, made by `make` (a `layers.LinenLayers` or an
    `nnx.NNXLayers`; `in_features` is the input's channels, which Linen reads from the input)."""
    check_stem(stem)
    layers = {"conv1": (_conv(make, "conv1", in_features, 64, 7, 2) if stem == "imagenet"
                        else _conv(make, "conv1", in_features, 64, 3)),
              "bn1": make.batch_norm("bn1", 64)}
    names, features = iter(block_names(stage_sizes)), 64
    for stage, blocks in enumerate(stage_sizes):
        for i in range(blocks):
            name, width = next(names), 64 * 2**stage
            layers[name] = make.block(name, block, features, width,
                                      2 if stage > 0 and i == 0 else 1)
            features = width * block.expansion
    layers["fc"] = make.dense("fc", features, num_classes, kernel_init=fc_init)
    return layers


def resnet_forward(layers, x, modal, stage_sizes: Sequence[int], stem: str):
    """x [B, H, W, C] -> logits [B, num_classes] (float32) through `layers` (as `resnet_layers`
    makes them); `modal(layer, *args)` calls a layer in the model's mode."""
    check_input(x, stem)
    x = jax.nn.relu(modal(layers["bn1"], layers["conv1"](x)))
    if stem == "imagenet":
        x = imagenet_stem_pool(x)
    for name in block_names(stage_sizes):
        x = layers[name](x)
    return layers["fc"](x.mean(axis=(1, 2))).astype(jnp.float32)


class CBAMResNet(nn.Module):
    """ResNet with attention in every block: x [B, H, W, 3] -> logits [B, num_classes] (float32).

    `attn_layer=None` is the plain ResNet (torchvision's parameter count); the default is the
    official CBAM (MLP with biases, spatial BatchNorm), as in the official model_resnet.py.
    `fused` is passed to the BatchNorms, the attention and the classifier.
    """

    stage_sizes: Sequence[int]
    block: type = BasicBlock
    num_classes: int = 1000
    stem: str = "imagenet"  # or "cifar": 3x3/1 conv, no max-pool
    attn_layer: Callable[..., nn.Module] | None = attention_layer("official")
    dtype: Any = None
    param_dtype: Any = jnp.float32
    fused: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        make = LinenLayers(train, self.dtype, self.param_dtype, self.fused, self.attn_layer)
        layers = resnet_layers(make, self.stage_sizes, self.block, self.num_classes, self.stem,
                               in_features=None)
        return resnet_forward(layers, x, make.modal, self.stage_sizes, self.stem)


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
