"""CBAM, the tutorial's CBAM CNN and the CBAM-ResNets as native flax.nnx modules.

They compute what the Linen modules compute, because they call the same code: the arithmetic is
`cbam_jax.ops`, the initialisers, presets, input checks and architecture constants are the Linen
files' own. What differs is the shape of an NNX module:

- constructors take the input channels, as PyTorch's do: `CBAM(64, rngs=nnx.Rngs(0))`;
- training vs evaluation is an attribute, as in Flax's own layers: `model.train()` /
  `model.eval()` (or `nnx.view(model, use_running_average=True)`) set `use_running_average` on
  every BatchNorm and CBAM (the Linen `train=`) and `deterministic` on CBAMCNN's dropout. Like
  `nnx.BatchNorm`, a new module is in training mode;
- the spatial gate [B, H, W, 1] is sown as `nnx.Intermediate` 'spatial_attention', which
  `nnx.capture(model, nnx.Intermediate)(x)` returns next to the output;
- attribute names are the Linen modules' names, so `to_linen(model)` is the Linen `variables`
  tree (and, through `cbam_jax.naming`, PyTorch's names) and `from_linen(model, variables)` loads
  one. The tutorial's `.pth` goes through `parity`: `parity.flax_to_torch(to_linen(model))`.
"""
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cbam_jax import ops
from cbam_jax.data import IMAGE_SHAPE
from cbam_jax.layers import (all_float32, has_tutorial_arithmetic, preset_options,
                             torch_bias_init, torch_kernel_init)
from cbam_jax.models import BLOCK_CHANNELS, FEATURE_SHAPE, HIDDEN_FEATURES
from cbam_jax.models import check_input as check_cnn_input
from cbam_jax.resnet import check_input as check_resnet_input
from cbam_jax.resnet import check_stem, conv_init, fc_init, imagenet_stem_pool

Dtype = Any


# --- CBAM ------------------------------------------------------------------------------------

class ChannelAttention(nnx.Module):
    """Channel gate: a shared MLP over global pools (average and max), summed, then sigmoid.

    Hidden width `ops.reduced_width`: `in_features // ratio` floored at `min_hidden` (1), or
    timm's rounding (`rd_round="nearest"`), or `hidden_features`.
    """

    def __init__(self, in_features: int, ratio: float = 16, *,
                 pool_types: Sequence[str] = ("avg", "max"), use_bias: bool = False,
                 hidden_features: int | None = None, min_hidden: int = 1,
                 rd_round: str = "floor", act: Callable = nnx.relu,
                 gate: Callable = nnx.sigmoid, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        ops.check_names(pool_types, ops.CHANNEL_POOLS, "ChannelAttention.pool_types")
        hidden = ops.reduced_width(in_features, ratio, hidden_features, min_hidden, rd_round)
        self.in_features = in_features
        self.pool_types = tuple(pool_types)
        self.act, self.gate = act, gate
        dense = dict(use_bias=use_bias, kernel_init=torch_kernel_init, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
        self.fc_0 = nnx.Linear(in_features, hidden, bias_init=torch_bias_init(in_features),
                               **dense)
        self.fc_2 = nnx.Linear(hidden, in_features, bias_init=torch_bias_init(hidden), **dense)

    def __call__(self, x):  # x: [B, H, W, C]
        ops.check_nhwc(x, "ChannelAttention")
        ops.check_channels(x, self.in_features, "ChannelAttention")
        return ops.channel_attention(x, lambda pooled: self.fc_2(self.act(self.fc_0(pooled))),
                                     self.pool_types, self.gate)


class SpatialAttention(nnx.Module):
    """Spatial gate: a k x k conv (no bias, 'same' padding) over channel-wise [mean, max] maps,
    optionally followed by a BatchNorm (`use_bn`: the official and timm presets).

    The conv runs as one matmul (`ops.spatial_conv`) on `conv`'s weights. Under
    `nnx.capture(..., nnx.Intermediate)` the gate [B, H, W, 1] is sown as 'spatial_attention'.
    """

    def __init__(self, kernel_size: int = 7, *, pool_order: Sequence[str] = ("avg", "max"),
                 use_bias: bool = False, use_bn: bool = False, bn_momentum: float = 0.1,
                 bn_epsilon: float = 1e-5, gate: Callable = nnx.sigmoid,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        ops.check_names(pool_order, ops.SPATIAL_POOLS, "SpatialAttention.pool_order")
        ops.check_kernel_size(kernel_size, "SpatialAttention")
        k, pad, maps = kernel_size, kernel_size // 2, len(pool_order)
        self.pool_order = tuple(pool_order)
        self.gate, self.dtype = gate, dtype
        self.conv = nnx.Conv(maps, 1, (k, k), padding=((pad, pad), (pad, pad)),
                             use_bias=use_bias, kernel_init=torch_kernel_init,
                             bias_init=torch_bias_init(k * k * maps), dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)
        self.bn = (BatchNorm(1, momentum=bn_momentum, epsilon=bn_epsilon, dtype=dtype,
                             param_dtype=param_dtype) if use_bn else None)

    def __call__(self, x):  # x: [B, H, W, C]
        ops.check_nhwc(x, "SpatialAttention")

        def logits(maps):  # [B, H, W, P] -> [B, H, W, 1]
            bias = None if self.conv.bias is None else self.conv.bias[...]
            y = ops.spatial_conv(maps, self.conv.kernel[...], bias, self.dtype)
            return y if self.bn is None else self.bn(y)

        y, attention = ops.spatial_attention(x, logits, self.pool_order, self.gate)
        self.sow_gate(attention)
        return y

    def sow_gate(self, attention):
        # Sow only inside nnx.capture, which marks the modules it records with `__captures__`
        # (Flax's guide "Extracting intermediate values"): outside it, Flax 0.12 still keeps a
        # sown value as a new attribute, appending every call, so a training loop would grow the
        # model's state (and recompile) at every step.
        if hasattr(self, "__captures__"):
            self.sow(nnx.Intermediate, "spatial_attention", attention)


class CBAM(nnx.Module):
    """Convolutional Block Attention Module: channel attention, then spatial attention.

    `CBAM(in_features, rngs=...)` is the tutorial's module; `CBAM.preset('official' | 'timm',
    in_features, **overrides)` builds the other known variants (`cbam_jax.layers.CBAM_PRESETS`).
    The keywords are the Linen `CBAM`'s. The output has the input's dtype (`dtype` is the
    compute dtype of the gates). In training (`use_running_average=False`, the default, set by
    `train()` / `eval()` / `nnx.view` as on BatchNorm; the Linen `train=`), a CBAM with the
    tutorial's arithmetic in float32 runs as `ops.cbam_tutorial`, as the Linen one does.
    """

    def __init__(self, in_features: int, ratio: float = 16, kernel_size: int = 7, *,
                 pool_types: Sequence[str] = ("avg", "max"), mlp_bias: bool = False,
                 hidden_features: int | None = None, min_hidden: int = 1,
                 rd_round: str = "floor", act: Callable = nnx.relu,
                 gate: Callable = nnx.sigmoid,
                 spatial_pool_order: Sequence[str] = ("avg", "max"), spatial_bn: bool = False,
                 bn_momentum: float = 0.1, bn_epsilon: float = 1e-5, no_spatial: bool = False,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.dtype, self.param_dtype = dtype, param_dtype
        self.tutorial_arithmetic = has_tutorial_arithmetic(
            pool_types=pool_types, mlp_bias=mlp_bias, act=act, gate=gate,
            spatial_pool_order=spatial_pool_order, spatial_bn=spatial_bn, no_spatial=no_spatial)
        self.use_running_average = False
        self.channel_attn = ChannelAttention(
            in_features, ratio, pool_types=pool_types, use_bias=mlp_bias,
            hidden_features=hidden_features, min_hidden=min_hidden, rd_round=rd_round, act=act,
            gate=gate, rngs=rngs, **dtypes)
        self.spatial_attn = None if no_spatial else SpatialAttention(
            kernel_size, pool_order=spatial_pool_order, use_bn=spatial_bn,
            bn_momentum=bn_momentum, bn_epsilon=bn_epsilon, gate=gate, rngs=rngs, **dtypes)

    @classmethod
    def preset(cls, variant: str, in_features: int, /, **overrides) -> "CBAM":
        """A CBAM configured as preset 'tutorial', 'official' or 'timm' (pass `rngs=`)."""
        return cls(in_features, **preset_options(variant, **overrides))

    def __call__(self, x):  # x: [B, H, W, C]
        ops.check_nhwc(x, "CBAM")
        if (not self.use_running_average and self.tutorial_arithmetic
                and all_float32(x, self.dtype, self.param_dtype)):
            channel, spatial = self.channel_attn, self.spatial_attn
            ops.check_channels(x, channel.in_features, "ChannelAttention")
            y, attention = ops.cbam_tutorial(x, channel.fc_0.kernel[...], channel.fc_2.kernel[...],
                                             spatial.conv.kernel[...])
            spatial.sow_gate(attention)
            return y
        x = self.channel_attn(x)
        return x if self.spatial_attn is None else self.spatial_attn(x)

    def set_view(self, use_running_average: bool | None = None):
        """Mode for `nnx.view`, as BatchNorm's.

        Args:
          use_running_average: True: evaluation (the layers' path, no `ops.cbam_tutorial`).
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchNorm(nnx.Module):
    """BatchNorm2d with PyTorch's semantics on the last axis (`cbam_jax.ops.batch_norm`).

    `scale`, `bias` are `nnx.Param`; `mean`, `var` (the unbiased running variance, as PyTorch's)
    and `num_batches_tracked` are `nnx.BatchStat`. `use_running_average=False` (training)
    normalises with the batch statistics and updates the running ones.
    """

    def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5,
                 use_running_average: bool = False, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32):
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.momentum, self.epsilon, self.dtype = momentum, epsilon, dtype
        self.use_running_average = use_running_average

    def __call__(self, x):  # x: [..., C]
        return self.normalize(functools.partial(ops.batch_norm, x))

    def normalize(self, op: Callable):
        """Run `op(scale, bias, running, train=, momentum=, epsilon=, dtype=)` -> (y, updated
        running or None) on this layer's variables and keep the update; return y.

        `op` is `ops.batch_norm` on x, or a block with a BatchNorm inside
        (`ops.conv_bn_relu_pool`: CBAMCNN's bn1..bn3), as the Linen BatchNorm's `normalize`.
        """
        y, updated = op(self.scale[...], self.bias[...], (self.mean[...], self.var[...]),
                        train=not self.use_running_average, momentum=self.momentum,
                        epsilon=self.epsilon, dtype=self.dtype)
        if updated is not None:
            self.mean[...], self.var[...] = updated
            self.num_batches_tracked[...] += 1
        return y

    def set_view(self, use_running_average: bool | None = None):
        """Mode for `nnx.view`, as `nnx.BatchNorm`'s.

        Args:
          use_running_average: True: normalise with the running statistics (evaluation).
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


# --- the tutorial's CBAM CNN -----------------------------------------------------------------

class CBAMCNN(nnx.Module):
    """Three blocks of conv3x3 -> BatchNorm -> ReLU -> max-pool 2x2 -> CBAM, then a 2-layer head.

    x: [B, 32, 32, 3] normalised floats -> logits [B, num_classes] (float32). In training mode
    the dropout draws from `rngs`' 'dropout' stream (else its default one). The layers are
    named as the Linen `cbam_jax.CBAMCNN`'s and the tutorial's (conv1, bn1, cbam1, ..., fc2).
    """

    def __init__(self, num_classes: int = 10, *, dropout_rate: float = 0.5,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        in_features = IMAGE_SHAPE[-1]
        for i, features in enumerate(BLOCK_CHANNELS, start=1):
            setattr(self, f"conv{i}", nnx.Conv(
                in_features, features, (3, 3), padding=((1, 1), (1, 1)),
                kernel_init=torch_kernel_init, bias_init=torch_bias_init(9 * in_features),
                rngs=rngs, **dtypes))
            setattr(self, f"bn{i}", BatchNorm(features, **dtypes))
            setattr(self, f"cbam{i}", CBAM(features, rngs=rngs, **dtypes))
            in_features = features
        flat = math.prod(FEATURE_SHAPE)  # 4 * 4 * 128, flattened in (H, W, C) order
        # ops.dense_dot_general: the kernel gradients in the kernels' layout, as in Linen.
        self.fc1 = nnx.Linear(flat, HIDDEN_FEATURES, kernel_init=torch_kernel_init,
                              bias_init=torch_bias_init(flat), dot_general=ops.dense_dot_general,
                              rngs=rngs, **dtypes)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.fc2 = nnx.Linear(HIDDEN_FEATURES, num_classes, kernel_init=torch_kernel_init,
                              bias_init=torch_bias_init(HIDDEN_FEATURES),
                              dot_general=ops.dense_dot_general, rngs=rngs, **dtypes)

    def __call__(self, x):
        check_cnn_input(x)
        for i in range(1, len(BLOCK_CHANNELS) + 1):
            conv = getattr(self, f"conv{i}")  # its weights; bn{i} runs the block, as in Linen
            x = getattr(self, f"bn{i}").normalize(functools.partial(
                ops.conv_bn_relu_pool, x, conv.kernel[...], conv.bias[...]))
            x = getattr(self, f"cbam{i}")(x)
        x = x.reshape(x.shape[0], -1)  # [B, 4 * 4 * 128]
        x = self.dropout(nnx.relu(self.fc1(x)))
        return self.fc2(x).astype(jnp.float32)


# --- CBAM-ResNets ----------------------------------------------------------------------------

def torch_conv(in_features: int, features: int, kernel: int, strides: int = 1,
               **kwargs) -> nnx.Conv:
    """A bias-free conv with PyTorch's symmetric padding k // 2 and torchvision's init
    (`cbam_jax.resnet.torch_conv`'s NNX twin)."""
    pad = kernel // 2
    return nnx.Conv(in_features, features, (kernel, kernel), (strides, strides),
                    padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=conv_init,
                    **kwargs)


class BasicBlock(nnx.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> attention, plus the (projected) input, ReLU."""

    expansion = 1

    def __init__(self, in_features: int, features: int, *, conv: Callable, norm: Callable,
                 attn_layer: Callable | None = None, strides: int = 1):
        self.conv1 = conv(in_features, features, 3, strides)
        self.bn1 = norm(features)
        self.conv2 = conv(features, features, 3)
        self.bn2 = norm(features)
        _add_attention_and_shortcut(self, in_features, features, conv, norm, attn_layer, strides)

    def __call__(self, x):
        out = nnx.relu(self.bn1(self.conv1(x)))
        return _residual(self, self.bn2(self.conv2(out)), x)


class Bottleneck(nnx.Module):
    """conv1x1 -> conv3x3 (strided) -> conv1x1 (x4 channels), each with BN; attention; residual."""

    expansion = 4

    def __init__(self, in_features: int, features: int, *, conv: Callable, norm: Callable,
                 attn_layer: Callable | None = None, strides: int = 1):
        self.conv1 = conv(in_features, features, 1)
        self.bn1 = norm(features)
        self.conv2 = conv(features, features, 3, strides)
        self.bn2 = norm(features)
        self.conv3 = conv(features, features * 4, 1)
        self.bn3 = norm(features * 4)
        _add_attention_and_shortcut(self, in_features, features, conv, norm, attn_layer, strides)

    def __call__(self, x):
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = nnx.relu(self.bn2(self.conv2(out)))
        return _residual(self, self.bn3(self.conv3(out)), x)


def _add_attention_and_shortcut(block, in_features, features, conv, norm, attn_layer, strides):
    """The block's `cbam` (None without attention) and its projection `downsample_0/1` (None
    where the input already has the output's shape), named as the Linen block's."""
    out_features = features * block.expansion
    block.cbam = None if attn_layer is None else attn_layer(out_features)
    projected = strides != 1 or in_features != out_features
    block.downsample_0 = conv(in_features, out_features, 1, strides) if projected else None
    block.downsample_1 = norm(out_features) if projected else None


def _residual(block, out, x):
    if block.cbam is not None:
        out = block.cbam(out)
    if block.downsample_0 is not None:
        x = block.downsample_1(block.downsample_0(x))
    return nnx.relu(out + x)


OFFICIAL_CBAM = functools.partial(CBAM.preset, "official")


class CBAMResNet(nnx.Module):
    """ResNet with attention in every block: x [B, H, W, 3] -> logits [B, num_classes] (float32).

    As `cbam_jax.resnet.CBAMResNet`: `attn_layer` builds a block's attention from its channel
    count (`attn_layer(features, rngs=..., dtype=..., param_dtype=...)`), None is the plain
    ResNet, the default is the official CBAM; `stem` is 'imagenet' or 'cifar'.
    """

    def __init__(self, stage_sizes: Sequence[int], block: type = BasicBlock,
                 num_classes: int = 1000, *, stem: str = "imagenet",
                 attn_layer: Callable | None = OFFICIAL_CBAM, in_features: int = 3,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_stem(stem)
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        conv = functools.partial(torch_conv, rngs=rngs, **dtypes)
        norm = functools.partial(BatchNorm, **dtypes)
        attn = None if attn_layer is None else functools.partial(attn_layer, rngs=rngs, **dtypes)
        self.stem = stem
        if stem == "imagenet":
            self.conv1 = conv(in_features, 64, 7, 2)
        else:
            self.conv1 = conv(in_features, 64, 3)
        self.bn1 = norm(64)
        names, in_features = [], 64
        for stage, blocks in enumerate(stage_sizes):
            for i in range(blocks):
                name, features = f"layer{stage + 1}_{i}", 64 * 2**stage
                setattr(self, name, block(in_features, features, conv=conv, norm=norm,
                                          attn_layer=attn,
                                          strides=2 if stage > 0 and i == 0 else 1))
                names.append(name)
                in_features = features * block.expansion
        self.block_names = tuple(names)
        self.fc = nnx.Linear(in_features, num_classes, kernel_init=fc_init, rngs=rngs, **dtypes)

    def __call__(self, x):
        check_resnet_input(x, self.stem)
        x = nnx.relu(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            x = imagenet_stem_pool(x)
        for name in self.block_names:
            x = getattr(self, name)(x)
        return self.fc(x.mean(axis=(1, 2))).astype(jnp.float32)


def _resnet(stage_sizes, block, num_classes, cbam_preset, **kwargs) -> CBAMResNet:
    attn = None if cbam_preset is None else functools.partial(CBAM.preset, cbam_preset)
    return CBAMResNet(stage_sizes, block, num_classes, attn_layer=attn, **kwargs)


def cbam_resnet18(num_classes: int = 1000, cbam_preset: str | None = "official", *,
                  rngs: nnx.Rngs, **kwargs) -> CBAMResNet:
    """CBAM-ResNet-18: basic blocks [2, 2, 2, 2]; `cbam_preset` names the CBAM (None: plain)."""
    return _resnet((2, 2, 2, 2), BasicBlock, num_classes, cbam_preset, rngs=rngs, **kwargs)


def cbam_resnet34(num_classes: int = 1000, cbam_preset: str | None = "official", *,
                  rngs: nnx.Rngs, **kwargs) -> CBAMResNet:
    """CBAM-ResNet-34: basic blocks [3, 4, 6, 3]."""
    return _resnet((3, 4, 6, 3), BasicBlock, num_classes, cbam_preset, rngs=rngs, **kwargs)


def cbam_resnet50(num_classes: int = 1000, cbam_preset: str | None = "official", *,
                  rngs: nnx.Rngs, **kwargs) -> CBAMResNet:
    """CBAM-ResNet-50: bottleneck blocks [3, 4, 6, 3]."""
    return _resnet((3, 4, 6, 3), Bottleneck, num_classes, cbam_preset, rngs=rngs, **kwargs)


# --- Linen variables <-> NNX state -----------------------------------------------------------

# Linen collection -> the NNX Variable type that holds it.
COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


def to_linen(model: nnx.Module) -> dict:
    """The model's weights as the Linen module's `variables`: {'params': ..., 'batch_stats': ...}
    (no 'batch_stats' without a BatchNorm), in the order the constructor made them, which is
    the order Linen's `init` returns (the tutorial's, for `parameter_report`)."""
    variables = {}
    for collection, kind in COLLECTIONS.items():
        tree = nnx.to_pure_dict(nnx.state(model, kind))
        if tree:
            variables[collection] = _in_definition_order(tree, model)
    return variables


def from_linen(model: nnx.Module, variables: Mapping) -> nnx.Module:
    """Load Linen `variables` ({'params': ..., 'batch_stats': ...}) into `model`, in place, and
    return it. Names and shapes must match the model's exactly; values take the model's dtypes.

    An abstract model (`nnx.eval_shape(lambda: cbam_resnet50(rngs=nnx.Rngs(0)))`) skips the
    cost of initialising weights that are then replaced, where parameters and statistics are
    all its state; a model with an RNG stream (CBAMCNN's dropout) has to be built for real.
    """
    unknown = sorted(set(variables) - set(COLLECTIONS))
    if unknown:
        raise ValueError(f"from_linen reads the collections {list(COLLECTIONS)}, got also "
                         f"{unknown}")
    other = nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Any(*COLLECTIONS.values()))))
    abstract = ["/".join(map(str, path)) for path, leaf in other
                if isinstance(leaf.get_value(), jax.ShapeDtypeStruct)]
    if abstract:
        raise ValueError(f"from_linen loads only params and batch_stats, but this abstract "
                         f"{type(model).__name__} has other state ({', '.join(abstract)}): "
                         f"build it for real, not under nnx.eval_shape")
    for collection, kind in COLLECTIONS.items():
        state = nnx.state(model, kind)
        expected = _leaves(nnx.to_pure_dict(state))
        found = _leaves(variables.get(collection, {}))
        _check_leaves(found, expected, collection, type(model).__name__)
        pure = nnx.to_pure_dict(state)  # a fresh nested dict: filled in place
        for path, target in expected.items():
            node = pure
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = jnp.asarray(found[path], target.dtype)
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(model, state)
    return model


def _leaves(tree, prefix: tuple = ()) -> dict:
    """{path: leaf} of a nested mapping."""
    leaves = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            leaves.update(_leaves(value, prefix + (key,)))
        else:
            leaves[prefix + (key,)] = value
    return leaves


def _check_leaves(found: dict, expected: dict, collection: str, model: str) -> None:
    """Raise naming the missing, unexpected and misshaped entries of one collection."""
    name = lambda path: "/".join(map(str, (collection, *path)))
    problems = [f"missing {name(p)}" for p in expected if p not in found]
    problems += [f"unexpected {name(p)}" for p in found if p not in expected]
    problems += [f"{name(p)}: got shape {tuple(jnp.shape(found[p]))}, expected "
                 f"{tuple(leaf.shape)}" for p, leaf in expected.items()
                 if p in found and tuple(jnp.shape(found[p])) != tuple(leaf.shape)]
    if problems:
        raise ValueError(f"these variables do not fit the NNX {model}:\n  " +
                         "\n  ".join(problems))


def _in_definition_order(tree: dict, node) -> dict:
    """tree (nnx.state's keys, sorted) re-ordered as node's attributes were assigned."""
    order = list(vars(node)) if hasattr(node, "__dict__") else []
    rank = {key: i for i, key in enumerate(order)}
    return {key: (_in_definition_order(value, getattr(node, str(key), None))
                  if isinstance(value, dict) else value)
            for key, value in sorted(tree.items(), key=lambda kv: rank.get(kv[0], len(order)))}
