"""The official CBAM gates (Jongchan/attention-module, MODELS/cbam.py) in PyTorch, and converters.

Written from the published code's semantics, with its module and state_dict names, so that its
weights load with `strict=True`: a Linear MLP with biases shared by the pooled descriptors
(summed in `pool_types` order: 'avg', 'max', 'lp', 'lse'), sigmoid; then ChannelPool =
cat(max, mean) over channels, a bias-free 7x7 conv, BatchNorm2d(eps=1e-5, momentum=0.01),
sigmoid. `cbam_jax.CBAM.preset('official')` computes the same in NHWC.
"""
from collections import OrderedDict
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicConv(nn.Module):
    """Conv2d (no bias) -> optional BatchNorm2d(eps 1e-5, momentum 0.01) -> optional ReLU."""

    def __init__(self, in_planes, out_planes, kernel_size, stride=1, padding=0, relu=True, bn=True,
                 bias=False):
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, stride=stride, padding=padding,
                              bias=bias)
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01, affine=True) if bn else None
        self.relu = nn.ReLU() if relu else None

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


def logsumexp_2d(x):  # [B, C, H, W] -> [B, C, 1]
    flat = x.view(x.size(0), x.size(1), -1)
    s, _ = torch.max(flat, dim=2, keepdim=True)
    return s + (flat - s).exp().sum(dim=2, keepdim=True).log()


class ChannelGate(nn.Module):
    """Shared MLP (with biases) over the pools in `pool_types`, summed in order, then sigmoid."""

    def __init__(self, gate_channels, reduction_ratio=16, pool_types=("avg", "max")):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(gate_channels, gate_channels // reduction_ratio),
            nn.ReLU(),
            nn.Linear(gate_channels // reduction_ratio, gate_channels),
        )
        self.pool_types = tuple(pool_types)

    def forward(self, x):  # x: [B, C, H, W]
        window = (x.size(2), x.size(3))
        pools = {
            "avg": lambda: F.avg_pool2d(x, window, stride=window),
            "max": lambda: F.max_pool2d(x, window, stride=window),
            "lp": lambda: F.lp_pool2d(x, 2, window, stride=window),
            "lse": lambda: logsumexp_2d(x),
        }
        total = None
        for pool_type in self.pool_types:
            raw = self.mlp(pools[pool_type]())
            total = raw if total is None else total + raw
        return x * torch.sigmoid(total)[:, :, None, None]


class ChannelPool(nn.Module):
    """[B, C, H, W] -> [B, 2, H, W]: channel-wise max, then mean."""

    def forward(self, x):
        return torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)


class SpatialGate(nn.Module):
    def __init__(self, kernel_size=7):
        super().__init__()
        self.compress = ChannelPool()
        self.spatial = BasicConv(2, 1, kernel_size, stride=1, padding=(kernel_size - 1) // 2,
                                 relu=False)

    def forward(self, x):
        return x * torch.sigmoid(self.spatial(self.compress(x)))


class CBAM(nn.Module):
    """ChannelGate, then (unless `no_spatial`) SpatialGate."""

    def __init__(self, gate_channels, reduction_ratio=16, pool_types=("avg", "max"),
                 no_spatial=False):
        super().__init__()
        self.ChannelGate = ChannelGate(gate_channels, reduction_ratio, pool_types)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = SpatialGate()

    def forward(self, x):
        x = self.ChannelGate(x)
        if not self.no_spatial:
            x = self.SpatialGate(x)
        return x


# Official state_dict name -> (collection, path in cbam_jax.CBAM's variables, layout).
_NAMES = {
    "ChannelGate.mlp.1.weight": ("params", ("channel_attn", "fc_0", "kernel"), "linear"),
    "ChannelGate.mlp.1.bias": ("params", ("channel_attn", "fc_0", "bias"), "copy"),
    "ChannelGate.mlp.3.weight": ("params", ("channel_attn", "fc_2", "kernel"), "linear"),
    "ChannelGate.mlp.3.bias": ("params", ("channel_attn", "fc_2", "bias"), "copy"),
    "SpatialGate.spatial.conv.weight": ("params", ("spatial_attn", "conv", "kernel"), "conv"),
    "SpatialGate.spatial.bn.weight": ("params", ("spatial_attn", "bn", "scale"), "copy"),
    "SpatialGate.spatial.bn.bias": ("params", ("spatial_attn", "bn", "bias"), "copy"),
    "SpatialGate.spatial.bn.running_mean": ("batch_stats", ("spatial_attn", "bn", "mean"), "copy"),
    "SpatialGate.spatial.bn.running_var": ("batch_stats", ("spatial_attn", "bn", "var"), "copy"),
    "SpatialGate.spatial.bn.num_batches_tracked":
        ("batch_stats", ("spatial_attn", "bn", "num_batches_tracked"), "counter"),
}


def _to_flax(kind, a: np.ndarray):
    # Copy: on CPU jnp.asarray may alias NumPy memory, which aliases the torch tensor, so a later
    # in-place torch update (an optimizer step) would silently change the "converted" arrays.
    a = np.array(a, copy=True)
    if kind == "counter":
        return jnp.asarray(a, jnp.int32)
    if kind == "linear":  # [out, in] -> [in, out]
        a = a.T
    elif kind == "conv":  # OIHW -> HWIO
        a = a.transpose(2, 3, 1, 0)
    return jnp.asarray(a, jnp.float32)


def _to_torch(kind, a: np.ndarray) -> torch.Tensor:
    if kind == "counter":
        return torch.tensor(int(a), dtype=torch.int64)
    if kind == "linear":
        a = a.T
    elif kind == "conv":  # HWIO -> OIHW
        a = a.transpose(3, 2, 0, 1)
    return torch.from_numpy(np.array(a, np.float32, copy=True, order="C"))


def official_to_flax(state_dict: Mapping) -> dict:
    """An official `CBAM` state_dict -> variables for `cbam_jax.CBAM.preset('official')`."""
    unknown = sorted(set(state_dict) - set(_NAMES))
    if unknown:
        raise ValueError(f"not an official CBAM state_dict: unexpected keys {unknown}; expected "
                         f"keys among {list(_NAMES)}")
    variables = {"params": {}, "batch_stats": {}}
    for name, (collection, path, kind) in _NAMES.items():
        if name not in state_dict:
            continue  # no_spatial has no SpatialGate
        node = variables[collection]
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = _to_flax(kind, state_dict[name].detach().cpu().numpy())
    if not variables["batch_stats"]:
        del variables["batch_stats"]
    return variables


def flax_to_official(variables: Mapping) -> "OrderedDict[str, torch.Tensor]":
    """`cbam_jax.CBAM.preset('official')` variables -> a state_dict the official `CBAM` loads."""
    state_dict = OrderedDict()
    for name, (collection, path, kind) in _NAMES.items():
        node = variables.get(collection, {})
        for key in path:
            node = node.get(key) if hasattr(node, "get") else None
            if node is None:
                break
        if node is not None:
            state_dict[name] = _to_torch(kind, np.asarray(node))
    return state_dict
