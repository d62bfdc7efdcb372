"""The tutorial's CBAM CNN for CIFAR-10, in NHWC: its layers and its forward pass, written once
(`cbamcnn_layers`, `cbamcnn_forward`) and built by the Linen `CBAMCNN` here and the NNX one in
`cbam_jax.nnx`. Modules only: the registry picks models by name, `cbam_jax.naming` prints
their parameters with PyTorch's names."""
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbam_jax import ops
from cbam_jax.data import IMAGE_SHAPE
from cbam_jax.layers import CBAM, LinenLayers, torch_bias_init, torch_kernel_init

BLOCK_CHANNELS = (32, 64, 128)
BLOCKS = tuple(range(1, len(BLOCK_CHANNELS) + 1))
HIDDEN_FEATURES = 512  # fc1's width
# The smallest image the three 2x2 max-pools leave a pixel of (each drops an odd last row).
MIN_IMAGE_SIZE = 2 ** len(BLOCKS)


def feature_shape(image_size: int = IMAGE_SHAPE[0]) -> tuple[int, int, int]:
    """fc1's input [H, W, C]: three 2x2 max-pools halve the image, rounding down (32 -> 4)."""
    side = image_size // 2 ** len(BLOCKS)
    return side, side, BLOCK_CHANNELS[-1]


FEATURE_SHAPE = feature_shape()  # [4, 4, 128] at the recipe's 32x32


def check_image_size(image_size: int) -> None:
    """Refuses a size the blocks cannot take, naming the smallest they can."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"CBAMCNN cannot take {image_size}x{image_size} images: its "
                         f"{len(BLOCKS)} max-pools need at least {MIN_IMAGE_SIZE}x"
                         f"{MIN_IMAGE_SIZE} (the smallest image size it takes)")


def check_input(x, image_size: int = IMAGE_SHAPE[0]) -> None:
    """CBAMCNN reads normalised floats [batch, S, S, 3] at the size it was built for (fc1's
    width follows from it); any batch size, 0 included."""
    expected = f"[batch, {image_size}, {image_size}, 3]"
    if x.ndim != 4 or x.shape[1:] != (image_size, image_size, 3):
        raise ValueError(f"CBAMCNN expects input {expected} (NHWC), got {x.shape}")
    ops.reference.check_floating(x, "CBAMCNN", expected)


def cbamcnn_layers(make, num_classes: int, dropout_rate: float,
                   image_size: int = IMAGE_SHAPE[0]) -> dict:
    """CBAMCNN's layers in the tutorial's order, {name: layer}, made by `make` (a
    `layers.LinenLayers` or an `nnx.NNXLayers`), for square images of `image_size`."""
    check_image_size(image_size)
    layers, in_features = {}, IMAGE_SHAPE[-1]
    for i, features in zip(BLOCKS, BLOCK_CHANNELS):
        layers[f"conv{i}"] = make.conv_same(f"conv{i}", in_features, features, 3,
                                            bias_init=torch_bias_init(9 * in_features))
        layers[f"bn{i}"] = make.batch_norm(f"bn{i}", features)
        layers[f"cbam{i}"] = make.attention(f"cbam{i}", features)
        in_features = features
    flat = math.prod(feature_shape(image_size))  # 4 * 4 * 128 at 32, in (H, W, C) order
    layers["fc1"] = make.dense("fc1", flat, HIDDEN_FEATURES, kernel_init=torch_kernel_init,
                               bias_init=torch_bias_init(flat))
    layers["dropout"] = make.dropout(dropout_rate)
    layers["fc2"] = make.dense("fc2", HIDDEN_FEATURES, num_classes,
                               kernel_init=torch_kernel_init,
                               bias_init=torch_bias_init(HIDDEN_FEATURES))
    return layers


def conv_bn_relu_pool(conv, bn, x, modal, fused: bool):
    """A block, conv -> BatchNorm -> ReLU -> 2x2 max-pool, on its `conv` (a ConvSame) and `bn`
    layers: their own calls (`fused=False`: capture_intermediates records each layer's output),
    or `ops.fused.conv_bn_relu_pool` on their weights and statistics."""
    if not fused:
        return ops.reference.max_pool_2x2(jax.nn.relu(modal(bn, conv(x))))
    block = functools.partial(ops.fused.conv_bn_relu_pool, x, *conv.weights(x.shape[-1]))
    return modal(bn.normalize, block, conv.features)


def cbamcnn_forward(layers, x, modal, fused: bool, image_size: int = IMAGE_SHAPE[0]):
    """x: [B, S, S, 3] -> logits [B, num_classes] (float32), through `layers` (as
    `cbamcnn_layers` makes them for S = `image_size`); `modal(layer, *args)` calls a layer in
    the model's mode."""
    check_input(x, image_size)
    for i in BLOCKS:
        x = conv_bn_relu_pool(layers[f"conv{i}"], layers[f"bn{i}"], x, modal, fused)
        x = modal(layers[f"cbam{i}"], x)
    x = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # [B, 4 * 4 * 128] at 32, (H, W, C)
    x = layers["dropout"](jax.nn.relu(layers["fc1"](x)))
    return layers["fc2"](x).astype(jnp.float32)


class CBAMCNN(nn.Module):
    """Three blocks of conv3x3 -> BatchNorm -> ReLU -> max-pool 2x2 -> CBAM, then a 2-layer head.

    x: [B, S, S, 3] normalised floats -> logits [B, num_classes] (float32); S is
    `image_size` (the recipe's 32; at least MIN_IMAGE_SIZE), which sets fc1's width.
    `train=True` uses batch statistics (and updates `batch_stats`) and needs a 'dropout' rng.
    fc1's input is flattened in NHWC order (H, W, C); PyTorch flattens (C, H, W), which the
    parity converter accounts for.

    `fused=True` (the default, what training and inference run): each block's conv ->
    BatchNorm -> ReLU -> max-pool is one op on conv{i}'s weights and bn{i}'s variables
    (`ops.fused.conv_bn_relu_pool`: no conv bias in training, whose gradient is then exactly 0;
    BatchNorm folded into the conv in evaluation), each CBAM trains as one op, and fc1 and fc2
    compute their kernel gradients in the kernels' layout. `fused=False` runs
    `ops.reference`, layer by layer. `capture_intermediates` records the module calls of the
    path chosen: every layer's output only with `fused=False`.
    """

    num_classes: int = 10
    dropout_rate: float = 0.5
    dtype: Any = None  # compute dtype, e.g. jnp.bfloat16; params stay param_dtype
    param_dtype: Any = jnp.float32
    fused: bool = True
    image_size: int = IMAGE_SHAPE[0]

    @nn.compact
    def __call__(self, x, train: bool = False):
        make = LinenLayers(train, self.dtype, self.param_dtype, self.fused, attn_layer=CBAM)
        layers = cbamcnn_layers(make, self.num_classes, self.dropout_rate, self.image_size)
        return cbamcnn_forward(layers, x, make.modal, self.fused, self.image_size)
