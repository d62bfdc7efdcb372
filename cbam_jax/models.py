"""The tutorial's CBAM CNN for CIFAR-10, in NHWC, and its PyTorch-style parameter report."""
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbam_jax.layers import CBAM, BatchNorm, torch_bias_init, torch_kernel_init
from cbam_jax.ops import max_pool_2x2

INPUT_SHAPE = (32, 32, 3)  # H, W, C of a CIFAR-10 image
BLOCK_CHANNELS = (32, 64, 128)


class CBAMCNN(nn.Module):
    """Three blocks of conv3x3 -> BatchNorm -> ReLU -> max-pool 2x2 -> CBAM, then a 2-layer head.

    x: [B, 32, 32, 3] normalised floats -> logits [B, num_classes] (float32).
    `train=True` uses batch statistics (and updates `batch_stats`) and needs a 'dropout' rng.
    fc1's input is flattened in NHWC order (H, W, C); PyTorch flattens (C, H, W), which the
    parity converter accounts for.
    """

    num_classes: int = 10
    dropout_rate: float = 0.5
    dtype: Any = None  # compute dtype, e.g. jnp.bfloat16; params stay param_dtype
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 4 or x.shape[1:] != INPUT_SHAPE:
            raise ValueError(f"CBAMCNN expects input [batch, 32, 32, 3] (NHWC), got {x.shape}")
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        in_channels = x.shape[-1]
        for i, channels in enumerate(BLOCK_CHANNELS, start=1):
            x = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), name=f"conv{i}",
                        kernel_init=torch_kernel_init,
                        bias_init=torch_bias_init(9 * in_channels), **dtypes)(x)
            x = BatchNorm(name=f"bn{i}", **dtypes)(x, train)
            x = max_pool_2x2(nn.relu(x))
            x = CBAM(name=f"cbam{i}", **dtypes)(x)
            in_channels = channels
        x = x.reshape(x.shape[0], -1)  # [B, 4 * 4 * 128], (H, W, C) order
        x = nn.Dense(512, name="fc1", kernel_init=torch_kernel_init,
                     bias_init=torch_bias_init(x.shape[-1]), **dtypes)(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))
        x = nn.Dense(self.num_classes, name="fc2", kernel_init=torch_kernel_init,
                     bias_init=torch_bias_init(512), **dtypes)(x)
        return x.astype(jnp.float32)


_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias",
               "mean": "running_mean", "var": "running_var"}


def torch_style_name(path: tuple[str, ...]) -> str:
    """('cbam1', 'channel_attn', 'fc_0', 'kernel') -> 'cbam1.channel_attn.fc.0.weight'."""
    *modules, leaf = path
    modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]  # Sequential index: fc_0 -> fc.0
    return ".".join(modules + [_LEAF_NAMES.get(leaf, leaf)])


def named_leaves(tree, prefix: tuple[str, ...] = ()) -> dict[str, jax.Array]:
    """Flatten a params (or batch_stats) tree into {PyTorch-style name: array}.

    Walks the dicts in their own order, which for `init`'s output is the order the modules are
    called in (the tutorial's order); `jax.tree_util` would sort the keys instead.
    """
    flat = {}
    for key, value in tree.items():
        if hasattr(value, "items"):
            flat.update(named_leaves(value, prefix + (key,)))
        else:
            flat[torch_style_name(prefix + (key,))] = value
    return flat


def parameter_report(params, print_fn: Callable[[str], None] | None = print) -> dict[str, int]:
    """Per-parameter counts with PyTorch names, printed in the tutorial's format.

    Returns {name: count} in the order of `params` (pass `init`'s output for the tutorial's
    order); the total is `sum(report.values())`, 1,150,896 for CBAMCNN.
    """
    counts = {name: int(leaf.size) for name, leaf in named_leaves(params).items()}
    if print_fn is not None:
        print_fn(f"Total trainable parameters: {sum(counts.values()):,}")
        print_fn("Parameters per layer:")
        for name, count in counts.items():
            print_fn(f"{name}: {count:,}")
    return counts
from cbam_jax.resnet import CBAMResNet, cbam_resnet18, cbam_resnet34, cbam_resnet50, create_model  # noqa: E402,F401
