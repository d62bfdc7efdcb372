"""CBAM's attention layers (Woo et al., ECCV 2018) and a BatchNorm with PyTorch's semantics.

All layers take NHWC input `x: [B, H, W, C]`; channels are inferred from the input at `init`.
Defaults reproduce the tutorial's PyTorch modules (see shared/SPEC.md): parameter names map
one-to-one onto theirs (`fc_0` <-> `fc.0`, `kernel` <-> `weight`).
"""
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbam_jax.ops import batch_norm_train

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


def _check_nhwc(x, module: str):
    if x.ndim != 4:
        raise ValueError(
            f"{module} expects NHWC input [batch, height, width, channels], got shape {x.shape} "
            f"(rank {x.ndim})"
        )


# Global pools over H, W for the channel gate: x [B, H, W, C] -> [B, C].
CHANNEL_POOLS = {
    "avg": lambda x: x.mean(axis=(1, 2)),
    "max": lambda x: x.max(axis=(1, 2)),
    # The official code's F.lp_pool2d(x, 2, (H, W)): sqrt of the sum (not the mean) of squares.
    "lp": lambda x: jnp.sqrt(jnp.square(x).sum(axis=(1, 2))),
    "lse": lambda x: jax.nn.logsumexp(x, axis=(1, 2)),
}
# Channel-wise pools for the spatial gate: x [B, H, W, C] -> [B, H, W].
SPATIAL_POOLS = {"avg": lambda x: x.mean(axis=-1), "max": lambda x: x.max(axis=-1)}


def _check_pools(names, allowed: dict, field: str):
    if isinstance(names, str) or not names or any(n not in allowed for n in names):
        raise ValueError(f"{field} must be a non-empty sequence of {sorted(allowed)}, got {names!r}")


def reduced_width(channels: int, ratio: float = 16, hidden_features: int | None = None,
                  min_hidden: int = 1, rd_round: str = "floor") -> int:
    """Channel-MLP hidden width: `hidden_features`, else C // ratio ('floor') or round(C / ratio) ('nearest', timm)."""
    if hidden_features is not None:
        width = hidden_features
    elif ratio <= 0:
        raise ValueError(f"ChannelAttention.ratio must be > 0, got {ratio}")
    elif rd_round == "floor":  # the tutorial's and the official `C // ratio`
        width = int(channels // ratio)
    elif rd_round == "nearest":  # timm's make_divisible(C / ratio, 1, round_limit=0.)
        width = int(channels / ratio + 0.5)
    else:
        raise ValueError(f"rd_round must be 'floor' or 'nearest', got {rd_round!r}")
    return max(min_hidden, width)


class ChannelAttention(nn.Module):
    """Channel gate: a shared bias-free MLP over global average and max pools, then sigmoid.

    The hidden width is `channels // ratio`, floored at 1 hidden unit: the tutorial's module
    builds a zero-width layer (and fails) for fewer than `ratio` channels; a reusable block
    should still work there, and for channels >= ratio the result is the tutorial's exactly.
    """

    ratio: int = 16
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
        _check_nhwc(x, "ChannelAttention")
        _check_pools(self.pool_types, CHANNEL_POOLS, "ChannelAttention.pool_types")
        if self.ratio < 1:
            raise ValueError(f"ChannelAttention.ratio must be >= 1, got {self.ratio}")
        channels = x.shape[-1]
        built_for = self.variables.get("params", {}).get("fc_0", {}).get("kernel")
        if built_for is not None and built_for.shape[0] != channels:
            raise ValueError(
                f"ChannelAttention params were built for {built_for.shape[0]} channels: expected "
                f"input [B, H, W, {built_for.shape[0]}], got {x.shape}"
            )
        hidden = reduced_width(channels, self.ratio, self.hidden_features, self.min_hidden,
                               self.rd_round)
        dense = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=torch_kernel_init)
        # One MLP call over all pooled descriptors: [P, B, C].
        pooled = jnp.stack([CHANNEL_POOLS[p](x) for p in self.pool_types])
        hidden_act = self.act(nn.Dense(hidden, name="fc_0", bias_init=torch_bias_init(channels),
                                       **dense)(pooled))
        logits = nn.Dense(channels, name="fc_2", bias_init=torch_bias_init(hidden),
                          **dense)(hidden_act)
        summed = logits[0]
        for more in logits[1:]:  # in pool order, as the official loop adds them
            summed = summed + more
        attention = self.gate(summed)  # [B, C]
        return x * attention[:, None, None, :].astype(x.dtype)


class SpatialAttention(nn.Module):
    """Spatial gate: a k x k conv (no bias, 'same' padding) over channel-wise [mean, max] maps.

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
        _check_nhwc(x, "SpatialAttention")
        _check_pools(self.pool_order, SPATIAL_POOLS, "SpatialAttention.pool_order")
        k = self.kernel_size
        if k < 1 or k % 2 == 0:
            # PyTorch's padding=k//2 with an even k makes the gate one pixel larger than x.
            raise ValueError(f"SpatialAttention.kernel_size must be odd and >= 1, got {k}")
        maps = jnp.stack([SPATIAL_POOLS[p](x) for p in self.pool_order], axis=-1)  # [B, H, W, 2]
        logits = nn.Conv(1, (k, k), padding=((k // 2, k // 2), (k // 2, k // 2)),
                         use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                         kernel_init=torch_kernel_init,
                         bias_init=torch_bias_init(k * k * len(self.pool_order)), name="conv")(maps)
        if self.use_bn:
            logits = BatchNorm(self.bn_momentum, self.bn_epsilon, self.dtype, self.param_dtype,
                               name="bn")(logits, train)
        attention = self.gate(logits)  # [B, H, W, 1]
        self.sow("intermediates", "spatial_attention", attention)
        return x * attention.astype(x.dtype)


class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel attention, then spatial attention.

    Defaults are the tutorial's; `CBAM.preset('official' | 'timm', **overrides)` builds the
    other known variants (see `CBAM_PRESETS`). With `spatial_bn`, call it with `train=`.
    """

    ratio: int = 16
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
        if variant not in CBAM_PRESETS:
            raise ValueError(f"unknown CBAM preset {variant!r}: expected one of "
                             f"{sorted(CBAM_PRESETS)}")
        return cls(**{**CBAM_PRESETS[variant], **overrides})

    @nn.compact
    def __call__(self, x, train: bool = False):  # x: [B, H, W, C]
        _check_nhwc(x, "CBAM")
        x = ChannelAttention(self.ratio, self.dtype, self.param_dtype, self.pool_types,
                             self.mlp_bias, self.hidden_features, self.min_hidden, self.rd_round,
                             self.act, self.gate, name="channel_attn")(x)
        if self.no_spatial:
            return x
        return SpatialAttention(self.kernel_size, self.dtype, self.param_dtype,
                                self.spatial_pool_order, use_bn=self.spatial_bn,
                                bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                                gate=self.gate, name="spatial_attn")(x, train)


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


class BatchNorm(nn.Module):
    """BatchNorm2d with PyTorch's semantics, on the last axis.

    Training normalises with the biased batch variance but, as PyTorch does, updates
    `var` with the unbiased one (n / (n - 1)); Flax's own BatchNorm uses the biased one, which
    drifts the running statistics away from the tutorial's. `momentum` is PyTorch's:
    running = (1 - momentum) * running + momentum * batch. Statistics are kept in float32.
    Under `jit` with a batch sharded over devices, the means are global: one big batch.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):  # x: [..., C]
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        batches_tracked = self.variable("batch_stats", "num_batches_tracked",
                                        lambda: jnp.zeros((), jnp.int32))
        dtype = self.dtype or x.dtype
        if train:
            n = x.size // features
            if n < 2:  # the unbiased variance would divide by zero; PyTorch raises too
                raise ValueError(f"BatchNorm in training needs more than 1 value per channel, "
                                 f"got input of shape {x.shape}")
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)  # biased var
            if not self.is_initializing():
                unbiased = var * (n / (n - 1))
                running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
                running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased
                batches_tracked.value = batches_tracked.value + 1
            return y.astype(dtype)
        inv = jax.lax.rsqrt(running_var.value + self.epsilon) * scale.astype(jnp.float32)
        shift = bias.astype(jnp.float32) - running_mean.value * inv
        return (x.astype(jnp.float32) * inv + shift).astype(dtype)
