"""CBAM, the tutorial's CBAM CNN and the CBAM-ResNets as native flax.nnx modules.

They compute what the Linen modules compute, because they are built from the same
definitions: the arithmetic is `cbam_jax.ops`, CBAM's options (names, defaults, checks,
presets) are `cbam_jax.options`, and the architectures are written once in `cbam_jax.models`
and `cbam_jax.resnet`, which `NNXLayers` builds here as `layers.LinenLayers` does in Linen.
What differs is the shape of an NNX module:

- constructors take the input channels, as PyTorch's do: `CBAM(64, rngs=nnx.Rngs(0))`;
- training vs evaluation is an attribute, as in Flax's own layers: `model.train()` /
  `model.eval()` (or `nnx.view(model, use_running_average=True)`) set `use_running_average` on
  every BatchNorm and CBAM (the Linen `train=`) and `deterministic` on CBAMCNN's dropout. Like
  `nnx.BatchNorm`, a new module is in training mode;
- the spatial gate [B, H, W, 1] is sown as `nnx.Intermediate` 'spatial_attention' when asked:
  `nnx.capture(nnx.view(model, sow_gates=True), nnx.Intermediate)(x)` returns it next to the
  output; a plain call keeps nothing;
- attribute names are the Linen modules' names, so `to_linen(model)` is the Linen `variables`
  tree (and, through `cbam_jax.naming`, PyTorch's names) and `from_linen(model, variables)` loads
  one. The tutorial's `.pth` goes through `parity`: `parity.flax_to_torch(to_linen(model))`.
"""
import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cbam_jax import models, ops, resnet
from cbam_jax.layers import (conv_same, dense_dot_general, runs_as_one_op, torch_bias_init,
                             torch_kernel_init)
from cbam_jax.options import (CBAMOptions, ChannelOptions, SpatialOptions, check,
                              option_values, preset_options)

Dtype = Any


def modal(layer: Callable, *args):
    """Call a layer that trains and evaluates differently: NNX layers carry their own mode."""
    return layer(*args)


def _check_built_for(features: int, built_for: int, module: str) -> None:
    if features != built_for:
        raise ValueError(f"{module} params were built for {built_for} channels, got {features}")


# --- CBAM ------------------------------------------------------------------------------------

class ChannelAttention(nnx.Module):
    """Channel gate: a shared MLP over global pools (average and max), summed, then sigmoid.

    `ChannelAttention(in_features, rngs=..., **options)`: the options are `ChannelOptions`'
    (the Linen module's fields). Hidden width `ChannelOptions.hidden_width`.
    """

    def __init__(self, in_features: int, *, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs, **options):
        options = ChannelOptions(**options)
        check(options, "ChannelAttention")
        ops.reference.check_features(in_features, "ChannelAttention")
        hidden = options.hidden_width(in_features)
        self.in_features, self.options = in_features, options
        dense = dict(use_bias=options.mlp_bias, kernel_init=torch_kernel_init, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
        self.fc_0 = nnx.Linear(in_features, hidden, bias_init=torch_bias_init(in_features),
                               **dense)
        self.fc_2 = nnx.Linear(hidden, in_features, bias_init=torch_bias_init(hidden), **dense)

    def __call__(self, x):  # x: [B, H, W, C]
        ops.reference.check_nhwc(x, "ChannelAttention")
        ops.reference.check_channels(x, self.in_features, "ChannelAttention")
        return ops.reference.channel_attention(
            x, lambda pooled: self.fc_2(self.options.act(self.fc_0(pooled))),
            self.options.pool_types, self.options.gate)


class ConvSame(nnx.Module):
    """`layers.ConvSame` as an NNX module: a stride-1 'same' conv whose weights a caller can
    also take without convolving (`weights`), `kernel` [k, k, in, features] and `bias`."""

    def __init__(self, in_features: int, features: int, kernel_size: int, *,
                 use_bias: bool = True, kernel_init: Callable = torch_kernel_init,
                 bias_init: Callable = nnx.initializers.zeros, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, fused: bool = True, rngs: nnx.Rngs):
        k = kernel_size
        self.features, self.dtype, self.fused = features, dtype, fused
        self.kernel = nnx.Param(kernel_init(rngs.params(), (k, k, in_features, features),
                                            param_dtype))
        self.bias = (nnx.Param(bias_init(rngs.params(), (features,), param_dtype))
                     if use_bias else None)

    def __call__(self, x):  # x: [B, H, W, in] -> [B, H, W, features]
        return conv_same(x, *self.weights(x.shape[-1]), self.dtype, self.fused)

    def weights(self, in_features: int):
        """(kernel, bias or None), for input of `in_features` channels."""
        _check_built_for(in_features, self.kernel.shape[2], "ConvSame")
        return self.kernel[...], None if self.bias is None else self.bias[...]


class SpatialAttention(nnx.Module):
    """Spatial gate: a k x k conv (no bias, 'same' padding) over channel-wise [mean, max] maps,
    optionally followed by a BatchNorm (`spatial_bn`: the official and timm presets).

    `SpatialAttention(rngs=..., **options)`: the options are `SpatialOptions`'. Fused, the conv
    runs as one matmul. With `sow_gates` (`nnx.view(model, sow_gates=True)`), the gate
    [B, H, W, 1] is sown as 'spatial_attention' for `nnx.capture(..., nnx.Intermediate)`.
    """

    def __init__(self, *, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                 fused: bool = True, rngs: nnx.Rngs, **options):
        options = SpatialOptions(**options)
        check(options, "SpatialAttention")
        k, maps = options.kernel_size, len(options.spatial_pool_order)
        self.options = options
        self.sow_gates = False
        self.conv = ConvSame(maps, 1, k, use_bias=options.spatial_bias,
                             bias_init=torch_bias_init(k * k * maps), dtype=dtype,
                             param_dtype=param_dtype, fused=fused, rngs=rngs)
        self.bn = (BatchNorm(1, momentum=options.bn_momentum, epsilon=options.bn_epsilon,
                             dtype=dtype, param_dtype=param_dtype, fused=fused)
                   if options.spatial_bn else None)

    def __call__(self, x):  # x: [B, H, W, C]
        ops.reference.check_nhwc(x, "SpatialAttention")

        def logits(maps):  # [B, H, W, P] -> [B, H, W, 1]
            y = self.conv(maps)
            return y if self.bn is None else self.bn(y)

        y, attention = ops.reference.spatial_attention(x, logits, self.options.spatial_pool_order,
                                                       self.options.gate)
        self.sow_gate(attention)
        return y

    def sow_gate(self, attention):
        # Only when asked: outside nnx.capture, Flax 0.12 keeps a sown value as a new
        # attribute, appending every call, so a training loop would grow the model's state (and
        # recompile) at every step.
        if self.sow_gates:
            self.sow(nnx.Intermediate, "spatial_attention", attention)

    def set_view(self, sow_gates: bool | None = None):
        """Mode for `nnx.view`.

        Args:
          sow_gates: True: sow the gate as nnx.Intermediate 'spatial_attention', for
            `nnx.capture(model, nnx.Intermediate)`.
        """
        if sow_gates is not None:
            self.sow_gates = sow_gates


class CBAM(nnx.Module):
    """Convolutional Block Attention Module: channel attention, then spatial attention.

    `CBAM(in_features, rngs=...)` is the tutorial's module; `CBAM.preset('official' | 'timm',
    in_features, **overrides)` builds the other known variants (`cbam_jax.options.CBAM_PRESETS`).
    The options are `CBAMOptions`' (the Linen `CBAM`'s fields). The output has the input's
    dtype (`dtype` is the compute dtype of the gates). In training (`use_running_average=False`,
    the default, set by `train()` / `eval()` / `nnx.view` as on BatchNorm; the Linen `train=`),
    a fused CBAM with the tutorial's arithmetic in float32 runs as `ops.fused.cbam_tutorial`,
    as the Linen one does.
    """

    def __init__(self, in_features: int, *, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, fused: bool = True, rngs: nnx.Rngs,
                 **options):
        options = CBAMOptions(**options)
        check(options, "CBAM")
        ops.reference.check_features(in_features, "CBAM")
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.options, self.fused, self.dtype, self.param_dtype = options, fused, dtype, param_dtype
        self.use_running_average = False
        self.channel_attn = ChannelAttention(in_features, rngs=rngs, **dtypes,
                                             **option_values(options, ChannelOptions))
        self.spatial_attn = None if options.no_spatial else SpatialAttention(
            fused=fused, rngs=rngs, **dtypes, **option_values(options, SpatialOptions))

    @classmethod
    def preset(cls, variant: str, in_features: int, /, **overrides) -> "CBAM":
        """A CBAM configured as preset 'tutorial', 'official' or 'timm' (pass `rngs=`)."""
        return cls(in_features, **preset_options(variant, **overrides))

    def __call__(self, x):  # x: [B, H, W, C]
        ops.reference.check_nhwc(x, "CBAM")
        if runs_as_one_op(self.options, x, train=not self.use_running_average, fused=self.fused,
                          dtype=self.dtype, param_dtype=self.param_dtype):
            channel, spatial = self.channel_attn, self.spatial_attn
            ops.reference.check_channels(x, channel.in_features, "ChannelAttention")
            y, attention = ops.fused.cbam_tutorial(x, channel.fc_0.kernel[...],
                                                   channel.fc_2.kernel[...],
                                                   spatial.conv.kernel[...])
            spatial.sow_gate(attention)
            return y
        x = self.channel_attn(x)
        return x if self.spatial_attn is None else self.spatial_attn(x)

    def set_view(self, use_running_average: bool | None = None):
        """Mode for `nnx.view`, as BatchNorm's.

        Args:
          use_running_average: True: evaluation (the layers' path, no `ops.fused.cbam_tutorial`).
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchNorm(nnx.Module):
    """BatchNorm2d with PyTorch's semantics on the last axis (`ops.reference.batch_norm`; fused,
    `ops.fused.batch_norm`).

    `scale`, `bias` are `nnx.Param`; `mean`, `var` (the unbiased running variance, as PyTorch's)
    and `num_batches_tracked` are `nnx.BatchStat`. `use_running_average=False` (training)
    normalises with the batch statistics and updates the running ones.
    """

    def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5,
                 use_running_average: bool = False, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, fused: bool = True):
        ops.reference.check_features(num_features, "BatchNorm", "num_features")
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.momentum, self.epsilon, self.dtype = momentum, epsilon, dtype
        self.fused = fused
        self.use_running_average = use_running_average

    def __call__(self, x):  # x: [..., C]
        op = ops.fused.batch_norm if self.fused else ops.reference.batch_norm
        return self.normalize(functools.partial(op, x), x.shape[-1])

    def normalize(self, op: Callable, features: int):
        """Run `op(scale, bias, running, train=, momentum=, epsilon=, dtype=)` -> (y, updated
        running or None) on this layer's variables and keep the update; return y.

        `op` is the batch norm on x, or a block with a BatchNorm inside
        (`ops.fused.conv_bn_relu_pool`: CBAMCNN's bn1..bn3), as the Linen BatchNorm's
        `normalize`; `features` must be this layer's.
        """
        _check_built_for(features, self.scale.shape[0], "BatchNorm")
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


# --- the constructors of the architectures ---------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class NNXLayers:
    """The layers of an architecture (`models.cbamcnn_layers`, `resnet.resnet_layers`) as NNX
    modules, with `layers.LinenLayers`' arguments: `name` is the Linen name (an NNX module
    takes it as its attribute), `in_features` the input's channels. NNX layers carry their mode
    (`modal`)."""

    rngs: nnx.Rngs
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    fused: bool = True
    attn_layer: Callable | None = None  # attn_layer(features, rngs=, dtype=, param_dtype=, fused=)

    def conv_same(self, name: str, in_features: int, features: int, kernel_size: int, *,
                  bias_init: Callable) -> ConvSame:
        return ConvSame(in_features, features, kernel_size, bias_init=bias_init,
                        dtype=self.dtype, param_dtype=self.param_dtype, fused=self.fused,
                        rngs=self.rngs)

    def conv(self, name: str, in_features: int, features: int, kernel_size: int,
             strides: int = 1, *, kernel_init: Callable) -> nnx.Conv:
        """A bias-free conv with PyTorch's symmetric padding k // 2."""
        pad = kernel_size // 2
        return nnx.Conv(in_features, features, (kernel_size, kernel_size), (strides, strides),
                        padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=kernel_init,
                        dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)

    def batch_norm(self, name: str, features: int) -> BatchNorm:
        return BatchNorm(features, dtype=self.dtype, param_dtype=self.param_dtype,
                         fused=self.fused)

    def dense(self, name: str, in_features: int, features: int, *, kernel_init: Callable,
              bias_init: Callable = nnx.initializers.zeros) -> nnx.Linear:
        return nnx.Linear(in_features, features, kernel_init=kernel_init, bias_init=bias_init,
                          dot_general=dense_dot_general(self.fused), dtype=self.dtype,
                          param_dtype=self.param_dtype, rngs=self.rngs)

    def dropout(self, rate: float) -> nnx.Dropout:
        return nnx.Dropout(rate, rngs=self.rngs)

    def attention(self, name: str, features: int):
        if self.attn_layer is None:
            return None
        return self.attn_layer(features, rngs=self.rngs, dtype=self.dtype,
                               param_dtype=self.param_dtype, fused=self.fused)

    def block(self, name: str, block, in_features: int, features: int, strides: int):
        return ResidualBlock(block, in_features, features, strides, self)


def _set_layers(module: nnx.Module, layers: dict) -> None:
    """Make each of `layers` an attribute of `module`, named as the Linen layer (in this order:
    `to_linen` returns the variables in the order the attributes were made)."""
    for name, layer in layers.items():
        setattr(module, name, layer)


# --- the tutorial's CBAM CNN -----------------------------------------------------------------

class CBAMCNN(nnx.Module):
    """Three blocks of conv3x3 -> BatchNorm -> ReLU -> max-pool 2x2 -> CBAM, then a 2-layer head.

    x: [B, S, S, 3] normalised floats -> logits [B, num_classes] (float32); S is `image_size`
    (the recipe's 32; at least `models.MIN_IMAGE_SIZE`), which sets fc1's width. In training
    mode the dropout draws from `rngs`' 'dropout' stream (else its default one). The layers are
    named as the Linen `cbam_jax.CBAMCNN`'s and the tutorial's (conv1, bn1, cbam1, ..., fc2),
    and `fused` chooses the path as there.
    """

    def __init__(self, num_classes: int = 10, *, dropout_rate: float = 0.5,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                 fused: bool = True, image_size: int = models.IMAGE_SHAPE[0], rngs: nnx.Rngs):
        self.fused, self.image_size = fused, image_size
        make = NNXLayers(rngs, dtype, param_dtype, fused, attn_layer=CBAM)
        _set_layers(self, models.cbamcnn_layers(make, num_classes, dropout_rate, image_size))

    def __call__(self, x):
        return models.cbamcnn_forward(vars(self), x, modal, self.fused, self.image_size)


# --- CBAM-ResNets ----------------------------------------------------------------------------

# The blocks' structure, as in Linen (`cbam_jax.resnet`).
BasicBlock, Bottleneck = resnet.BasicBlock, resnet.Bottleneck


class ResidualBlock(nnx.Module):
    """A residual block (`BasicBlock`, `Bottleneck`: its layers and forward) as an NNX module."""

    def __init__(self, block, in_features: int, features: int, strides: int, make: NNXLayers):
        self.block = block
        _set_layers(self, block.layers(make, in_features, features, strides))

    def __call__(self, x):
        return self.block.forward(vars(self), x, modal)


OFFICIAL_CBAM = functools.partial(CBAM.preset, "official")


class CBAMResNet(nnx.Module):
    """ResNet with attention in every block: x [B, H, W, 3] -> logits [B, num_classes] (float32).

    As `cbam_jax.resnet.CBAMResNet`: `attn_layer` builds a block's attention from its channel
    count (`attn_layer(features, rngs=..., dtype=..., param_dtype=..., fused=...)`), None is the
    plain ResNet, the default is the official CBAM; `stem` is 'imagenet' or 'cifar'.
    """

    def __init__(self, stage_sizes: Sequence[int], block: type = BasicBlock,
                 num_classes: int = 1000, *, stem: str = "imagenet",
                 attn_layer: Callable | None = OFFICIAL_CBAM, in_features: int = 3,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                 fused: bool = True, rngs: nnx.Rngs):
        ops.reference.check_features(in_features, "CBAMResNet")
        self.stage_sizes, self.stem = tuple(stage_sizes), stem
        make = NNXLayers(rngs, dtype, param_dtype, fused, attn_layer)
        _set_layers(self, resnet.resnet_layers(make, stage_sizes, block, num_classes, stem,
                                               in_features))

    def __call__(self, x):
        return resnet.resnet_forward(vars(self), x, modal, self.stage_sizes, self.stem)


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
