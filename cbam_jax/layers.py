"""CBAM's attention layers (Woo et al., ECCV 2018) and a BatchNorm with PyTorch's semantics, as
Flax Linen modules. The arithmetic they share with the NNX modules lives in `cbam_jax.ops`.

All layers take NHWC floating-point input `x: [B, H, W, C]`; channels are inferred from the
input at `init`. Defaults reproduce the tutorial's PyTorch modules (see shared/SPEC.md):
parameter names map one-to-one onto theirs (`fc_0` <-> `fc.0`, `kernel` <-> `weight`).
"""
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbam_jax import ops

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


class ConvSame(nn.Module):
    """A stride-1 'same' conv (`ops.conv_same` plus the bias) whose weights a caller can also
    take without convolving (`weights`): nn.Conv's `kernel` [k, k, in, features] and `bias`
    [features] (None without `use_bias`), with its names, shapes, initialisers and creation
    order. For layers that convolve in `ops`: CBAMCNN's blocks skip or fold the bias,
    SpatialAttention's conv is a matmul.
    """

    features: int
    kernel_size: int
    use_bias: bool = True
    kernel_init: Callable = torch_kernel_init
    bias_init: Callable = nn.initializers.zeros
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    matmul: bool = False  # one output feature as `ops.spatial_conv` (a Toeplitz matmul)

    def __call__(self, x):  # x: [B, H, W, in] -> [B, H, W, features]
        kernel, bias = self.weights(x.shape[-1])
        if self.matmul:
            return ops.spatial_conv(x, kernel, bias, self.dtype)
        dtype = self.dtype or jnp.result_type(*(a for a in (x, kernel, bias) if a is not None))
        y = ops.conv_same(x.astype(dtype), kernel.astype(dtype))
        return y if bias is None else y + bias.astype(dtype)

    @nn.compact
    def weights(self, in_features: int):
        """(kernel, bias or None), created at `init`."""
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, in_features, self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        return kernel, bias


def layer_by_layer() -> bool:
    """Whether the modules being applied are watched one by one: an `apply(...,
    capture_intermediates=...)` records what each returns, or an `nn.intercept_methods`
    interceptor sees each call (parity.kinks stops gradients at module inputs and outputs).

    CBAMCNN and CBAM then run layer by layer, not as their fused ops, so that the conv's, the
    BatchNorm's and each gate's call happens to be recorded or intercepted (parity's
    layer-by-layer report and its Adam steps). Flax keeps the capture filter and the
    interceptors on private stacks; tests/test_models.py fails if they move.
    """
    from flax.linen import module
    stack = getattr(getattr(module, "_context", None), "capture_stack", None)
    return bool(stack and stack[-1]) or bool(getattr(module, "_global_interceptor_stack", None))


class ChannelAttention(nn.Module):
    """Channel gate: a shared MLP over global pools (average and max), summed, then sigmoid.

    The hidden width is `channels // ratio`, floored at `min_hidden` (1): the tutorial's module
    builds a zero-width layer (and fails) for fewer than `ratio` channels; a reusable block
    should still work there, and for channels >= ratio the result is the tutorial's exactly.
    """

    ratio: float = 16
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    pool_types: Sequence[str] = ("avg", "max")  # summed in this order; also "lp", "lse"
    use_bias: bool = False  # MLP biases (the official code has them)
    hidden_features: int | None = None  # overrides ratio
    min_hidden: int = 1  # floor on the hidden width
    rd_round: str = "floor"  # "floor": C // ratio; "nearest": timm's round(C / ratio)
    act: Callable = nn.relu
    gate: Callable = nn.sigmoid

    @nn.compact
    def __call__(self, x):  # x: [B, H, W, C]
        ops.check_nhwc(x, "ChannelAttention")
        ops.check_names(self.pool_types, ops.CHANNEL_POOLS, "ChannelAttention.pool_types")
        channels = x.shape[-1]
        built_for = self.variables.get("params", {}).get("fc_0", {}).get("kernel")
        if built_for is not None:
            ops.check_channels(x, built_for.shape[0], "ChannelAttention")
        hidden = ops.reduced_width(channels, self.ratio, self.hidden_features, self.min_hidden,
                                   self.rd_round)
        dense = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=torch_kernel_init)
        fc_0 = nn.Dense(hidden, name="fc_0", bias_init=torch_bias_init(channels), **dense)
        fc_2 = nn.Dense(channels, name="fc_2", bias_init=torch_bias_init(hidden), **dense)
        return ops.channel_attention(x, lambda pooled: fc_2(self.act(fc_0(pooled))),
                                     self.pool_types, self.gate)

    def kernels(self):
        """The bias-free MLP's (fc_0, fc_2) kernels, once `init` has made them (CBAM's one-op
        path reads them)."""
        params = self.variables["params"]
        return params["fc_0"]["kernel"], params["fc_2"]["kernel"]


class SpatialAttention(nn.Module):
    """Spatial gate: a k x k conv (no bias, 'same' padding) over channel-wise [mean, max] maps.

    The conv runs as one matmul (`ops.spatial_conv`); its weights are nn.Conv's (`conv/kernel`).
    The gate `[B, H, W, 1]` is sown as `intermediates/spatial_attention` so that callers can
    look at it (`apply(..., mutable=['intermediates'])`).
    """

    kernel_size: int = 7
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    pool_order: Sequence[str] = ("avg", "max")  # conv input maps; the official order is max, avg
    use_bias: bool = False  # conv bias
    use_bn: bool = False  # BatchNorm after the conv (official, timm); needs `train`
    bn_momentum: float = 0.1  # PyTorch-style; the official code uses 0.01
    bn_epsilon: float = 1e-5
    gate: Callable = nn.sigmoid

    @nn.compact
    def __call__(self, x, train: bool = False):  # x: [B, H, W, C]
        ops.check_nhwc(x, "SpatialAttention")
        ops.check_names(self.pool_order, ops.SPATIAL_POOLS, "SpatialAttention.pool_order")
        ops.check_kernel_size(self.kernel_size, "SpatialAttention")
        k, maps = self.kernel_size, len(self.pool_order)
        conv = ConvSame(1, k, use_bias=self.use_bias, bias_init=torch_bias_init(k * k * maps),
                        dtype=self.dtype, param_dtype=self.param_dtype, matmul=True, name="conv")
        norm = (BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="bn") if self.use_bn else None)

        def logits(maps):  # [B, H, W, P] -> [B, H, W, 1]
            return norm(conv(maps), train) if norm else conv(maps)

        y, attention = ops.spatial_attention(x, logits, self.pool_order, self.gate)
        self.sow_gate(attention)
        return y

    def kernel(self):
        """The conv's kernel [k, k, P, 1], once `init` has made it (CBAM's one-op path)."""
        return self.variables["params"]["conv"]["kernel"]

    def sow_gate(self, attention):
        self.sow("intermediates", "spatial_attention", attention)


class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel attention, then spatial attention.

    Defaults are the tutorial's; `CBAM.preset('official' | 'timm', **overrides)` builds the
    other known variants (see `CBAM_PRESETS`). With `spatial_bn`, call it with `train=`.
    The output has the input's dtype (`dtype` is the compute dtype of the gates).
    In training (`train=True`), a CBAM with the tutorial's arithmetic in float32 (any width and
    odd kernel size; `has_tutorial_arithmetic`) runs as `ops.cbam_tutorial`: the same values
    and gradients, with a hand-written backward.
    """

    ratio: float = 16
    kernel_size: int = 7
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    pool_types: Sequence[str] = ("avg", "max")  # channel gate pools: "avg", "max", "lp", "lse"
    mlp_bias: bool = False
    hidden_features: int | None = None  # channel MLP width; overrides ratio
    min_hidden: int = 1
    rd_round: str = "floor"  # "floor": C // ratio; "nearest": round(C / ratio) as timm
    act: Callable = nn.relu  # channel MLP activation
    gate: Callable = nn.sigmoid  # both gates
    spatial_pool_order: Sequence[str] = ("avg", "max")
    spatial_bn: bool = False
    bn_momentum: float = 0.1
    bn_epsilon: float = 1e-5
    no_spatial: bool = False  # channel attention only

    @classmethod
    def preset(cls, variant: str, /, **overrides) -> "CBAM":
        """A CBAM configured as one of `CBAM_PRESETS` ('tutorial', 'official', 'timm')."""
        return cls(**preset_options(variant, **overrides))

    @nn.compact
    def __call__(self, x, train: bool = False):  # x: [B, H, W, C]
        ops.check_nhwc(x, "CBAM")
        channel = ChannelAttention(
            ratio=self.ratio, dtype=self.dtype, param_dtype=self.param_dtype,
            pool_types=self.pool_types, use_bias=self.mlp_bias,
            hidden_features=self.hidden_features, min_hidden=self.min_hidden,
            rd_round=self.rd_round, act=self.act, gate=self.gate, name="channel_attn")
        spatial = None if self.no_spatial else SpatialAttention(
            kernel_size=self.kernel_size, dtype=self.dtype, param_dtype=self.param_dtype,
            pool_order=self.spatial_pool_order, use_bn=self.spatial_bn,
            bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, gate=self.gate,
            name="spatial_attn")
        tutorial = has_tutorial_arithmetic(**{k: getattr(self, k) for k in TUTORIAL_ARITHMETIC})
        if (train and tutorial and all_float32(x, self.dtype, self.param_dtype)
                and not self.is_initializing() and not layer_by_layer()):
            # The layers own the weights (init makes them through the path below).
            w1, w2 = channel.kernels()
            ops.check_channels(x, w1.shape[0], "ChannelAttention")
            y, attention = ops.cbam_tutorial(x, w1, w2, spatial.kernel())
            spatial.sow_gate(attention)
            return y
        x = channel(x)
        return x if spatial is None else spatial(x, train)


# What each known implementation differs in from the tutorial's defaults.
CBAM_PRESETS = {
    # The tutorial (shared/SPEC.md): bias-free MLP, C // 16, spatial [avg, max], no BatchNorm.
    "tutorial": {},
    # Jongchan/attention-module MODELS/cbam.py: Linear MLP with biases, pools summed avg + max
    # (pool_types may add "lp", "lse"); ChannelPool is cat(max, mean); bias-free 7x7 conv then
    # BatchNorm2d(eps=1e-5, momentum=0.01).
    "official": dict(mlp_bias=True, spatial_pool_order=("max", "avg"), spatial_bn=True,
                     bn_momentum=0.01),
    # timm layers/cbam.py CbamModule: bias-free 1x1-conv MLP, rd = make_divisible(C / 16, 1)
    # (rounds to nearest, floor 1); spatial [mean, max] through ConvNormAct (no conv bias,
    # BatchNorm2d eps 1e-5, momentum 0.1).
    "timm": dict(rd_round="nearest", spatial_bn=True),
}


# The CBAM options that make its arithmetic the tutorial's (any ratio, width, kernel size),
# which `ops.cbam_tutorial` computes as one op.
TUTORIAL_ARITHMETIC = dict(pool_types=ops.TUTORIAL_POOLS, mlp_bias=False, act=nn.relu,
                           gate=nn.sigmoid, spatial_pool_order=ops.TUTORIAL_POOLS,
                           spatial_bn=False, no_spatial=False)


def has_tutorial_arithmetic(**options) -> bool:
    """Whether CBAM `options` (TUTORIAL_ARITHMETIC's keys) make it compute what
    `ops.cbam_tutorial` computes (which it runs in float32: `all_float32`)."""
    same = lambda a, b: (tuple(a) == b) if isinstance(b, tuple) else (a is b or a == b)
    return all(same(options[name], value) for name, value in TUTORIAL_ARITHMETIC.items())


def all_float32(x, dtype, param_dtype) -> bool:
    """Whether a layer with these dtypes computes on x, its weights and its output in float32."""
    return (x.dtype == jnp.float32 and jnp.dtype(param_dtype) == jnp.float32
            and jnp.dtype(dtype or jnp.float32) == jnp.float32)


def preset_options(variant: str, /, **overrides) -> dict:
    """The CBAM keywords of preset `variant`, with `overrides` on top (Linen and NNX alike)."""
    if variant not in CBAM_PRESETS:
        raise ValueError(f"unknown CBAM preset {variant!r}: expected one of "
                         f"{sorted(CBAM_PRESETS)}")
    return {**CBAM_PRESETS[variant], **overrides}


class BatchNorm(nn.Module):
    """BatchNorm2d with PyTorch's semantics on the last axis (`cbam_jax.ops.batch_norm`).

    `batch_stats` holds `mean`, `var` (unbiased running variance, as PyTorch) and
    `num_batches_tracked`. Under `jit` with a batch sharded over devices, the means are
    global: one big batch.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __call__(self, x, train: bool):  # x: [..., C]
        return self.normalize(functools.partial(ops.batch_norm, x), x.shape[-1], train)

    @nn.compact
    def normalize(self, op: Callable, features: int, train: bool):
        """Run `op(scale, bias, running, train=, momentum=, epsilon=, dtype=)` -> (y, updated
        running or None) on this layer's variables and keep the update; return y.

        `op` is `ops.batch_norm` on x, or a block with a BatchNorm inside
        (`ops.conv_bn_relu_pool`: CBAMCNN's bn1..bn3).
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
