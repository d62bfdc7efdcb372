"""CBAM's options, written once: their names, defaults, checks, the hidden-width rule and the
presets of the known implementations.

Both APIs read these classes. The Linen layers subclass them, so their fields are these
options (`cbam_jax.CBAM(ratio=8)`); the NNX layers take the same names as keywords and build
one of these from them (`cbam_jax.nnx.CBAM(64, ratio=8, rngs=...)`). `ChannelAttention` takes
`ChannelOptions`, `SpatialAttention` `SpatialOptions`, `CBAM` all of them (`CBAMOptions`).
Module settings that are not CBAM's (`dtype`, `param_dtype`, `fused`) stay on the modules.
"""
import dataclasses
import numbers
from typing import Callable

import jax

from cbam_jax.ops.reference import CHANNEL_POOLS, SPATIAL_POOLS, TUTORIAL_POOLS

# Keyword-only, so that a positional argument cannot land on the wrong option. Not frozen: the
# Linen layers subclass these, and Flax's modules are dataclasses that are not frozen; hashed
# by value, as modules and NNX's static attributes must be.
_options = dataclasses.dataclass(kw_only=True, unsafe_hash=True)


@_options
class GateOptions:
    gate: Callable = jax.nn.sigmoid  # both gates' squashing function


@_options
class ChannelOptions(GateOptions):
    """The channel gate: gate(sum over pools p of fc_2(act(fc_0(p(x))))), one per channel."""

    ratio: float = 16  # hidden width C // ratio (the tutorial's and the official code's 16)
    hidden_features: int | None = None  # the hidden width itself; overrides ratio
    min_hidden: int = 1  # floor on the width: C // 16 is 0 below 16 channels
    rd_round: str = "floor"  # "floor": C // ratio; "nearest": round(C / ratio), as timm
    pool_types: tuple[str, ...] = TUTORIAL_POOLS  # summed in this order; also "lp", "lse"
    mlp_bias: bool = False  # biases in fc_0 and fc_2 (the official code has them)
    act: Callable = jax.nn.relu  # between fc_0 and fc_2

    def hidden_width(self, channels: int) -> int:
        """The MLP's hidden width for `channels` input channels (options checked)."""
        if self.hidden_features is not None:
            width = self.hidden_features
        elif self.rd_round == "floor":  # the tutorial's and the official `C // ratio`
            width = int(channels // self.ratio)
        else:  # timm's make_divisible(C / ratio, 1, round_limit=0.)
            width = int(channels / self.ratio + 0.5)
        return max(self.min_hidden, width)


@_options
class SpatialOptions(GateOptions):
    """The spatial gate: gate(k x k conv over the channel pools of x), one per pixel."""

    kernel_size: int = 7  # odd: PyTorch's padding k // 2 keeps the map's size
    spatial_pool_order: tuple[str, ...] = TUTORIAL_POOLS  # the conv's input maps, in order
    spatial_bias: bool = False  # a bias in the conv
    spatial_bn: bool = False  # BatchNorm after the conv (official, timm); then pass `train`
    bn_momentum: float = 0.1  # PyTorch's convention; the official code uses 0.01
    bn_epsilon: float = 1e-5


@_options
class CBAMOptions(SpatialOptions, ChannelOptions):
    """Channel attention, then (unless `no_spatial`) spatial attention."""

    no_spatial: bool = False  # channel attention only

    @classmethod
    def preset(cls, variant: str, /, **overrides):
        """`cls` configured as one of CBAM_PRESETS ('tutorial', 'official', 'timm')."""
        return cls(**preset_options(variant, **overrides))

    @property
    def tutorial_arithmetic(self) -> bool:
        """Whether these options compute the tutorial's CBAM (any width and odd kernel size),
        which `cbam_jax.ops.fused.cbam_tutorial` computes as one op."""
        return (tuple(self.pool_types) == TUTORIAL_POOLS
                and tuple(self.spatial_pool_order) == TUTORIAL_POOLS
                and not (self.mlp_bias or self.spatial_bias or self.spatial_bn
                         or self.no_spatial)
                and self.act is jax.nn.relu and self.gate is jax.nn.sigmoid)


# What each known implementation differs in from the tutorial's defaults.
CBAM_PRESETS = {
    # The tutorial (parity/reference.py): bias-free MLP, C // 16, spatial [avg, max], no BatchNorm.
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


def preset_options(variant: str, /, **overrides) -> dict:
    """The keywords of preset `variant`, with `overrides` on top (Linen and NNX alike)."""
    if variant not in CBAM_PRESETS:
        raise ValueError(f"unknown CBAM preset {variant!r}: expected one of "
                         f"{sorted(CBAM_PRESETS)}")
    return {**CBAM_PRESETS[variant], **overrides}


def option_values(options, kind: type) -> dict:
    """The options of class `kind` (e.g. ChannelOptions) that `options` holds, by name: what a
    CBAM passes on to its ChannelAttention and SpatialAttention."""
    return {field.name: getattr(options, field.name) for field in dataclasses.fields(kind)}


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _names(allowed: dict):
    def valid(names) -> bool:
        return (not isinstance(names, str) and len(names) > 0
                and all(name in allowed for name in names))
    return valid, f"a non-empty sequence of {sorted(allowed)}"


# option -> (whether a value is valid, what a valid one is)
_CHECKS = {
    "ratio": (lambda v: v > 0, "> 0"),
    "hidden_features": (lambda v: v is None or (_integer(v) and v >= 1), "None or an int >= 1"),
    "min_hidden": (lambda v: _integer(v) and v >= 1, "an int >= 1"),
    "rd_round": (lambda v: v in ("floor", "nearest"), "'floor' or 'nearest'"),
    "pool_types": _names(CHANNEL_POOLS),
    # PyTorch's padding k // 2 with an even k makes the gate one pixel larger than x.
    "kernel_size": (lambda v: _integer(v) and v >= 1 and v % 2 == 1, "odd and >= 1"),
    "spatial_pool_order": _names(SPATIAL_POOLS),
    "bn_momentum": (lambda v: 0 <= v <= 1, "in [0, 1] (PyTorch's convention)"),
}


def check(options, module: str) -> None:
    """Raise a ValueError naming `module`'s option, what it must be and what it got, for the
    first option of `options` (an instance of these classes, or a layer built on one) that is
    out of range."""
    for name, (valid, expected) in _CHECKS.items():
        if name in {field.name for field in dataclasses.fields(options)}:
            value = getattr(options, name)
            if not valid(value):
                raise ValueError(f"{module}.{name} must be {expected}, got {value!r}")
