"""The tutorial's CBAM CNN for CIFAR-10, in NHWC (modules only: the registry picks models by
name, `cbam_jax.naming` prints their parameters with PyTorch's names)."""
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cbam_jax import ops
from cbam_jax.data import IMAGE_SHAPE
from cbam_jax.layers import (CBAM, BatchNorm, ConvSame, layer_by_layer, torch_bias_init,
                             torch_kernel_init)

BLOCK_CHANNELS = (32, 64, 128)
# fc1's input [H, W, C] = [4, 4, 128]: three 2x2 max-pools halve 32 to 4.
FEATURE_SHAPE = (IMAGE_SHAPE[0] // 8, IMAGE_SHAPE[1] // 8, BLOCK_CHANNELS[-1])
HIDDEN_FEATURES = 512  # fc1's width


def check_input(x) -> None:
    """CBAMCNN reads [batch, 32, 32, 3] (fc1's width is fixed by the image size)."""
    if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"CBAMCNN expects input [batch, 32, 32, 3] (NHWC), got {x.shape}")


class CBAMCNN(nn.Module):
    """Three blocks of conv3x3 -> BatchNorm -> ReLU -> max-pool 2x2 -> CBAM, then a 2-layer head.

    x: [B, 32, 32, 3] normalised floats -> logits [B, num_classes] (float32).
    `train=True` uses batch statistics (and updates `batch_stats`) and needs a 'dropout' rng.
    fc1's input is flattened in NHWC order (H, W, C); PyTorch flattens (C, H, W), which the
    parity converter accounts for. Each block's conv -> BatchNorm -> ReLU -> max-pool runs as
    one op on conv{i}'s weights and bn{i}'s variables (`ops.conv_bn_relu_pool`: no conv bias in
    training, whose gradient is then exactly 0; BatchNorm folded into the conv in evaluation),
    except under `capture_intermediates`, which records every layer's output. fc1 and fc2
    compute their kernel gradients in the kernels' layout (`ops.dense_dot_general`).
    """

    num_classes: int = 10
    dropout_rate: float = 0.5
    dtype: Any = None  # compute dtype, e.g. jnp.bfloat16; params stay param_dtype
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_input(x)
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        in_channels = x.shape[-1]
        watched = layer_by_layer()
        for i, channels in enumerate(BLOCK_CHANNELS, start=1):
            conv = ConvSame(channels, 3, bias_init=torch_bias_init(9 * in_channels),
                            name=f"conv{i}", **dtypes)
            bn = BatchNorm(name=f"bn{i}", **dtypes)
            if watched:
                x = ops.max_pool_2x2(nn.relu(bn(conv(x), train)))
            else:
                block = functools.partial(ops.conv_bn_relu_pool, x, *conv.weights(in_channels))
                x = bn.normalize(block, channels, train)
            x = CBAM(name=f"cbam{i}", **dtypes)(x, train)
            in_channels = channels
        x = x.reshape(x.shape[0], -1)  # [B, 4 * 4 * 128], (H, W, C) order
        x = nn.Dense(HIDDEN_FEATURES, name="fc1", kernel_init=torch_kernel_init,
                     bias_init=torch_bias_init(x.shape[-1]),
                     dot_general=ops.dense_dot_general, **dtypes)(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))
        x = nn.Dense(self.num_classes, name="fc2", kernel_init=torch_kernel_init,
                     bias_init=torch_bias_init(HIDDEN_FEATURES),
                     dot_general=ops.dense_dot_general, **dtypes)(x)
        return x.astype(jnp.float32)
