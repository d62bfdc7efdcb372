"""CBAM's attention layers (Woo et al., ECCV 2018) and a BatchNorm with PyTorch's semantics, as
Flax Linen modules, and `LinenLayers`, the constructors that models.py and resnet.py build
their architectures with.

All layers take NHWC floating-point input `x: [B, H, W, C]`; channels are inferred from the
input at `init`. The CBAM layers' fields are `cbam_jax.options`' (the same names and defaults
as the NNX layers'); defaults reproduce the tutorial's PyTorch modules (`parity/reference.py`),
and parameter names map one-to-one onto theirs (`fc_0` <-> `fc.0`, `kernel` <-> `weight`).
`fused=True` (the default) computes with `cbam_jax.ops.fused`, `fused=False` with
`cbam_jax.ops.reference`.
"""
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbam_jax import ops
from cbam_jax.options import (CBAMOptions, ChannelOptions, SpatialOptions, check,
                              option_values)

Dtype = Any

# PyTorch's default init for Conv2d and Linear weights, kaiming_uniform(a=sqrt(5)), is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)); starting from the same distribution keeps training comparable.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """PyTorch's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / (fan_in**0.5)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv_same(x, kernel, bias, dtype, fused: bool):
    """nn.Conv(padding=k // 2)'s arithmetic (Linen and NNX `ConvSame`): x [B, H, W, in] ->
    [B, H, W, out] in `dtype` (default: the promotion of x, kernel and bias); with `fused`, one
    output channel takes `ops.fused.conv_same_toeplitz`."""
    dtype = dtype or jnp.result_type(*(a for a in (x, kernel, bias) if a is not None))
    toeplitz = fused and kernel.shape[-1] == 1
    conv = ops.fused.conv_same_toeplitz if toeplitz else ops.reference.conv_same
    y = conv(x.astype(dtype), kernel.astype(dtype))
    return y if bias is None else y + bias.astype(dtype)


def dense_dot_general(fused: bool) -> Callable:
    """The contraction a Dense layer is built with: `ops.fused.dense_dot_general` or the
    reference's (nn.Dense's own default)."""
    return ops.fused.dense_dot_general if fused else ops.reference.dot_general


def all_float32(x, dtype, param_dtype) -> bool:
    """Whether a layer with these dtypes computes on x, its weights and its output in float32."""
    return (x.dtype == jnp.float32 and jnp.dtype(param_dtype) == jnp.float32
            and jnp.dtype(dtype or jnp.float32) == jnp.float32)


def runs_as_one_op(options: CBAMOptions, x, *, train: bool, fused: bool, dtype,
                   param_dtype) -> bool:
    """Whether a CBAM (Linen or NNX) runs as `ops.fused.cbam_tutorial`: fused, in training,
    with the tutorial's arithmetic, in float32."""
    return (fused and train and options.tutorial_arithmetic
            and all_float32(x, dtype, param_dtype))


class ConvSame(nn.Module):
    """A stride-1 'same' conv (`conv_same`) whose weights a caller can also take without
    convolving (`weights`): nn.Conv's `kernel` [k, k, in, features] and `bias` [features] (None
    without `use_bias`), with its names, shapes, initialisers and creation order. CBAMCNN's
    fused blocks take its weights; SpatialAttention's one output channel is a matmul.
    """

    features: int
    kernel_size: int
    use_bias: bool = True
    kernel_init: Callable = torch_kernel_init
    bias_init: Callable = nn.initializers.zeros
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    fused: bool = True

    def __call__(self, x):  # x: [B, H, W, in] -> [B, H, W, features]
        return conv_same(x, *self.weights(x.shape[-1]), self.dtype, self.fused)

    @nn.compact
    def weights(self, in_features: int):
        """(kernel, bias or None), created at `init`."""
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, in_features, self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        return kernel, bias


class ChannelAttention(nn.Module, ChannelOptions, kw_only=True):
    """Channel gate: a shared MLP over global pools (average and max), summed, then sigmoid.

    The hidden width is `channels // ratio`, floored at `min_hidden` (1): for fewer than `ratio`
    channels the tutorial's module builds a zero-width layer, whose gate ignores the input (a
    constant 0.5); a reusable block should still attend there, and for channels >= ratio the
    result is the tutorial's exactly.
    """

    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # x: [B, H, W, C]
        ops.reference.check_nhwc(x, "ChannelAttention")
        check(self, "ChannelAttention")
        channels = x.shape[-1]
        built_for = self.variables.get("params", {}).get("fc_0", {}).get("kernel")
        if built_for is not None:
            ops.reference.check_channels(x, built_for.shape[0], "ChannelAttention")
        hidden = self.hidden_width(channels)
        dense = dict(use_bias=self.mlp_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=torch_kernel_init)
        fc_0 = nn.Dense(hidden, name="fc_0", bias_init=torch_bias_init(channels), **dense)
        fc_2 = nn.Dense(channels, name="fc_2", bias_init=torch_bias_init(hidden), **dense)
        return ops.reference.channel_attention(
            x, lambda pooled: fc_2(self.act(fc_0(pooled))), self.pool_types, self.gate)

    def kernels(self):
        """The bias-free MLP's (fc_0, fc_2) kernels, once `init` has made them (CBAM's one-op
        path reads them)."""
        params = self.variables["params"]
        return params["fc_0"]["kernel"], params["fc_2"]["kernel"]


class SpatialAttention(nn.Module, SpatialOptions, kw_only=True):
    """Spatial gate: a k x k conv (no bias, 'same' padding) over channel-wise [mean, max] maps.

    Its weights are nn.Conv's (`conv/kernel`); fused, the conv runs as one matmul. The gate
    `[B, H, W, 1]` is sown as `intermediates/spatial_attention` so that callers can look at it
    (`apply(..., mutable=['intermediates'])`).
    """

    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    fused: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):  # x: [B, H, W, C]
        ops.reference.check_nhwc(x, "SpatialAttention")
        check(self, "SpatialAttention")
        k, maps = self.kernel_size, len(self.spatial_pool_order)
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype, fused=self.fused)
        conv = ConvSame(1, k, use_bias=self.spatial_bias, bias_init=torch_bias_init(k * k * maps),
                        name="conv", **dtypes)
        norm = (BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon, name="bn",
                          **dtypes) if self.spatial_bn else None)

        def logits(maps):  # [B, H, W, P] -> [B, H, W, 1]
            return norm(conv(maps), train) if norm else conv(maps)

        y, attention = ops.reference.spatial_attention(x, logits, self.spatial_pool_order,
                                                       self.gate)
        self.sow_gate(attention)
        return y

    def kernel(self):
        """The conv's kernel [k, k, P, 1], once `init` has made it (CBAM's one-op path)."""
        return self.variables["params"]["conv"]["kernel"]

    def sow_gate(self, attention):
        self.sow("intermediates", "spatial_attention", attention)


class CBAM(nn.Module, CBAMOptions, kw_only=True):
    """Convolutional Block Attention Module: channel attention, then spatial attention.

    Defaults are the tutorial's; `CBAM.preset('official' | 'timm', **overrides)` builds the
    other known variants (see `cbam_jax.options.CBAM_PRESETS`). With `spatial_bn`, call it with
    `train=`. The output has the input's dtype (`dtype` is the compute dtype of the gates).
    Fused, in training, a CBAM with the tutorial's arithmetic in float32 (any width and odd
    kernel size) runs as `ops.fused.cbam_tutorial`: the same values and gradients, with a
    hand-written backward; `fused=False` runs the two gates' layers, so that
    `capture_intermediates` records each.
    """

    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    fused: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):  # x: [B, H, W, C]
        ops.reference.check_nhwc(x, "CBAM")
        check(self, "CBAM")
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channel = ChannelAttention(**option_values(self, ChannelOptions), name="channel_attn",
                                   **dtypes)
        spatial = None if self.no_spatial else SpatialAttention(
            **option_values(self, SpatialOptions), fused=self.fused, name="spatial_attn",
            **dtypes)
        if (runs_as_one_op(self, x, train=train, fused=self.fused, **dtypes)
                and not self.is_initializing()):
            # The layers own the weights (init makes them through the path below).
            w1, w2 = channel.kernels()
            ops.reference.check_channels(x, w1.shape[0], "ChannelAttention")
            y, attention = ops.fused.cbam_tutorial(x, w1, w2, spatial.kernel())
            spatial.sow_gate(attention)
            return y
        x = channel(x)
        return x if spatial is None else spatial(x, train)


class BatchNorm(nn.Module):
    """BatchNorm2d with PyTorch's semantics on the last axis (`ops.reference.batch_norm`; fused,
    `ops.fused.batch_norm`).

    `batch_stats` holds `mean`, `var` (unbiased running variance, as PyTorch) and
    `num_batches_tracked`. Under `jit` with a batch sharded over devices, the means are
    global: one big batch.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    fused: bool = True

    def __call__(self, x, train: bool):  # x: [..., C]
        op = ops.fused.batch_norm if self.fused else ops.reference.batch_norm
        return self.normalize(functools.partial(op, x), x.shape[-1], train=train)

    @nn.compact
    def normalize(self, op: Callable, features: int, train: bool):
        """Run `op(scale, bias, running, train=, momentum=, epsilon=, dtype=)` -> (y, updated
        running or None) on this layer's variables and keep the update; return y.

        `op` is the batch norm on x, or a block with a BatchNorm inside
        (`ops.fused.conv_bn_relu_pool`: CBAMCNN's bn1..bn3).
        """
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        batches_tracked = self.variable("batch_stats", "num_batches_tracked",
                                        lambda: jnp.zeros((), jnp.int32))
        y, updated = op(scale, bias, (running_mean.value, running_var.value), train=train,
                        momentum=self.momentum, epsilon=self.epsilon, dtype=self.dtype)
        if updated is not None and not self.is_initializing():
            running_mean.value, running_var.value = updated
            batches_tracked.value = batches_tracked.value + 1
        return y


# --- the constructors of the architectures ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LinenLayers:
    """The layers of an architecture (`models.cbamcnn_layers`, `resnet.resnet_layers`) as Linen
    modules; `cbam_jax.nnx.NNXLayers` makes the same layers as NNX modules, with the same
    arguments. Made inside a compact `__call__`, whose `train` it carries: Dropout and the
    residual blocks take their mode from it, the other layers through `modal`.

    `name` is the layer's name in the variables; `in_features`, which Linen reads from the
    input, is NNX's.
    """

    train: bool
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    fused: bool = True
    attn_layer: Callable | None = None  # attn_layer(name=, dtype=, param_dtype=, fused=)

    def modal(self, layer: Callable, *args):
        """Call a layer that trains and evaluates differently (BatchNorm, CBAM) in this mode."""
        return layer(*args, train=self.train)

    def conv_same(self, name: str, in_features: int | None, features: int, kernel_size: int,
                  *, bias_init: Callable) -> ConvSame:
        return ConvSame(features, kernel_size, bias_init=bias_init, dtype=self.dtype,
                        param_dtype=self.param_dtype, fused=self.fused, name=name)

    def conv(self, name: str, in_features: int | None, features: int, kernel_size: int,
             strides: int = 1, *, kernel_init: Callable) -> nn.Conv:
        """A bias-free conv with PyTorch's symmetric padding k // 2 ('SAME' would pad stride-2
        convs unevenly)."""
        pad = kernel_size // 2
        return nn.Conv(features, (kernel_size, kernel_size), (strides, strides),
                       padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=kernel_init,
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def batch_norm(self, name: str, features: int) -> BatchNorm:
        return BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, fused=self.fused,
                         name=name)

    def dense(self, name: str, in_features: int, features: int, *, kernel_init: Callable,
              bias_init: Callable = nn.initializers.zeros) -> nn.Dense:
        return nn.Dense(features, kernel_init=kernel_init, bias_init=bias_init,
                        dot_general=dense_dot_general(self.fused), dtype=self.dtype,
                        param_dtype=self.param_dtype, name=name)

    def dropout(self, rate: float) -> nn.Dropout:
        return nn.Dropout(rate, deterministic=not self.train)

    def attention(self, name: str, features: int):
        if self.attn_layer is None:
            return None
        return self.attn_layer(name=name, dtype=self.dtype, param_dtype=self.param_dtype,
                               fused=self.fused)

    def block(self, name: str, block, in_features: int, features: int, strides: int):
        return ResidualBlock(block, in_features, features, strides, self, name=name)


class ResidualBlock(nn.Module):
    """A residual block (`resnet.BasicBlock`, `resnet.Bottleneck`: its layers and forward) as a
    Linen module, in `layers`' mode."""

    block: Any
    in_features: int
    features: int
    strides: int
    layers: LinenLayers

    @nn.compact
    def __call__(self, x):
        built = self.block.layers(self.layers, self.in_features, self.features, self.strides)
        return self.block.forward(built, x, self.layers.modal)
