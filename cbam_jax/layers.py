"""CBAM's attention layers (Woo et al., ECCV 2018) and a BatchNorm with PyTorch's semantics.

All layers take NHWC input `x: [B, H, W, C]`; channels are inferred from the input at `init`.
Defaults reproduce the tutorial's PyTorch modules (see shared/SPEC.md): parameter names map
one-to-one onto theirs (`fc_0` <-> `fc.0`, `kernel` <-> `weight`).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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


class ChannelAttention(nn.Module):
    """Channel gate: a shared bias-free MLP over global average and max pools, then sigmoid.

    The hidden width is `channels // ratio`, floored at 1 hidden unit: the tutorial's module
    builds a zero-width layer (and fails) for fewer than `ratio` channels; a reusable block
    should still work there, and for channels >= ratio the result is the tutorial's exactly.
    """

    ratio: int = 16
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # x: [B, H, W, C]
        _check_nhwc(x, "ChannelAttention")
        if self.ratio < 1:
            raise ValueError(f"ChannelAttention.ratio must be >= 1, got {self.ratio}")
        channels = x.shape[-1]
        built_for = self.variables.get("params", {}).get("fc_0", {}).get("kernel")
        if built_for is not None and built_for.shape[0] != channels:
            raise ValueError(
                f"ChannelAttention params were built for {built_for.shape[0]} channels: expected "
                f"input [B, H, W, {built_for.shape[0]}], got {x.shape}"
            )
        hidden = max(1, channels // self.ratio)
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=torch_kernel_init)
        # One MLP call over both pooled descriptors: [2, B, C].
        pooled = jnp.stack([x.mean(axis=(1, 2)), x.max(axis=(1, 2))])
        hidden_act = nn.relu(nn.Dense(hidden, name="fc_0", **dense)(pooled))
        logits = nn.Dense(channels, name="fc_2", **dense)(hidden_act)
        attention = nn.sigmoid(logits[0] + logits[1])  # [B, C]
        return x * attention[:, None, None, :].astype(x.dtype)


class SpatialAttention(nn.Module):
    """Spatial gate: a k x k conv (no bias, 'same' padding) over channel-wise [mean, max] maps.

    The gate `[B, H, W, 1]` is sown as `intermediates/spatial_attention` so that callers can
    look at it (`apply(..., mutable=['intermediates'])`).
    """

    kernel_size: int = 7
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # x: [B, H, W, C]
        _check_nhwc(x, "SpatialAttention")
        k = self.kernel_size
        if k < 1 or k % 2 == 0:
            # PyTorch's padding=k//2 with an even k makes the gate one pixel larger than x.
            raise ValueError(f"SpatialAttention.kernel_size must be odd and >= 1, got {k}")
        maps = jnp.stack([x.mean(axis=-1), x.max(axis=-1)], axis=-1)  # [B, H, W, 2]: [avg, max]
        logits = nn.Conv(1, (k, k), padding=((k // 2, k // 2), (k // 2, k // 2)), use_bias=False,
                         dtype=self.dtype, param_dtype=self.param_dtype,
                         kernel_init=torch_kernel_init, name="conv")(maps)
        attention = nn.sigmoid(logits)  # [B, H, W, 1]
        self.sow("intermediates", "spatial_attention", attention)
        return x * attention.astype(x.dtype)


class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel attention, then spatial attention."""

    ratio: int = 16
    kernel_size: int = 7
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # x: [B, H, W, C]
        _check_nhwc(x, "CBAM")
        x = ChannelAttention(self.ratio, self.dtype, self.param_dtype, name="channel_attn")(x)
        return SpatialAttention(self.kernel_size, self.dtype, self.param_dtype,
                                name="spatial_attn")(x)


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
        reduce_axes = tuple(range(x.ndim - 1))
        if train:
            x32 = x.astype(jnp.float32)
            mean = x32.mean(axis=reduce_axes)
            var = jnp.square(x32 - mean).mean(axis=reduce_axes)  # biased
            if not self.is_initializing():
                n = x.size // features
                unbiased = var * (n / max(n - 1, 1))
                running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
                running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased
                batches_tracked.value = batches_tracked.value + 1
        else:
            mean, var = running_mean.value, running_var.value
        inv = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
        shift = bias.astype(jnp.float32) - mean * inv
        dtype = self.dtype or x.dtype
        return (x.astype(jnp.float32) * inv + shift).astype(dtype)
