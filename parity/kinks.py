"""Where CBAM_CNN's derivative jumps, and how gradient comparisons stay clear of those places.

The model is piecewise smooth: its derivative jumps where a ReLU input is 0 and where a max has
two equal largest inputs (each 2x2 max-pool window, the channel gate's max over H x W, the
spatial gate's max over channels). Near such a kink float32 rounding decides which side a value
falls on, and the other side sends the gradient somewhere else entirely: on a trained checkpoint
one near-tied pool window moved JAX's conv3.weight gradient by 1.9e-2 relative (README). That
says nothing about whether the model is right, so the referee takes it out of every comparison:

* It finds, in the float64 forward pass, each kink whose margin (|ReLU input|, or the gap from a
  max to a runner-up) is positive but at most `tau`, twice the float32 error bound of those values
  (report.float32_bound): within tau float32 may decide either way, beyond it both frameworks
  must decide as float64 does (each value is within the bound of its float64 value).
* Every gradient (JAX, PyTorch float32 and float64) is then taken with the gradient stopped at
  those kinks. Forward values do not change; the ambiguous contributions are left out of all
  three alike, whichever element or side either framework picked.

Exact float64 ties (margin 0) come from identical inputs (flat image regions), whose tied
elements have identical derivatives with respect to every parameter. In a max-pool window both
frameworks give the gradient to the first maximum, so these stay in: the tie rule stays under
test, and a max-pool that sends the gradient to every maximum fails (parity.controls). The two
gates' maxima are another matter: there JAX's max shares the gradient among equal maxima and
PyTorch's gives it to the first, equal only while everything upstream treats the tied elements
alike, which the stops above need not (one may sit in an ambiguous pool window, the other not).
Their exact ties are taken out too.
"""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from cbam_jax.models import BLOCK_CHANNELS

BLOCKS = tuple(range(1, len(BLOCK_CHANNELS) + 1))

# What each kind of kink is, for the report's count line.
KINDS = {
    "pool": "max-pool windows",
    "channel_max": "channel-gate maxima over H x W",
    "mlp_relu": "channel-gate MLP ReLUs",
    "spatial_max": "spatial-gate maxima over channels",
    "fc1_relu": "fc1 ReLUs",
}


def _near_tie(values: np.ndarray, axes, tau: float) -> np.ndarray:
    """True (keepdims over `axes`) where some element is below the max by more than 0 and at most
    tau. For values >= 0 this also covers a max within tau of 0 above all-zero runners-up."""
    gaps = values.max(axis=axes, keepdims=True) - values
    return ((gaps > 0) & (gaps <= tau)).any(axis=axes, keepdims=True)


def gate_maxima(values: np.ndarray, axes, tau: float) -> np.ndarray:
    """True (keepdims over `axes`) where a gate's max of values >= 0 is one float32 cannot
    decide, or is tied exactly (the frameworks' tie rules differ there; see the module
    docstring). A max of 0 passes no gradient beyond the ReLU before it, tied or not."""
    top = values.max(axis=axes, keepdims=True)
    exact = (top > 0) & ((values == top).sum(axis=axes, keepdims=True) > 1)
    return _near_tie(values, axes, tau) | exact


def pool_windows(pre_relu: np.ndarray, tau: float) -> np.ndarray:
    """MaxPool2d(2) after ReLU on x [B, C, H, W] (the BatchNorm output): a mask of x's elements
    whose window float32 cannot decide: the max within tau of 0 (ReLU passes it or not), or a
    positive max with a runner-up within tau. Odd trailing rows/columns belong to no window."""
    b, c, h, w = pre_relu.shape
    h2, w2 = h // 2 * 2, w // 2 * 2
    windows = pre_relu[:, :, :h2, :w2].reshape(b, c, h2 // 2, 2, w2 // 2, 2)
    top = windows.max(axis=(3, 5), keepdims=True)
    ambiguous = (np.abs(top) <= tau) | ((top > 0) & _near_tie(windows, (3, 5), tau))
    mask = np.zeros(pre_relu.shape, bool)
    mask[:, :, :h2, :w2] = np.broadcast_to(ambiguous, windows.shape).reshape(b, c, h2, w2)
    return mask


def relu_inputs(pre_relu: np.ndarray, tau: float) -> np.ndarray:
    """A mask of ReLU inputs within tau of 0 (exact zeros excluded: every framework blocks
    them, and they only arise from all-zero inputs)."""
    return (pre_relu != 0) & (np.abs(pre_relu) <= tau)


def find(f64: dict[str, np.ndarray], tau: dict[str, float]) -> dict[str, np.ndarray]:
    """Masks of the kinks float32 cannot decide, in PyTorch layout, from a float64 train-mode
    pass (report.TorchRun.kink_values) and tau per kink site.

    Keys name where the gradient is stopped: 'bn{i}' (its output, for the pool windows),
    'cbam{i}.channel_attn.max_pool' (its output [B, C, 1, 1]), 'cbam{i}.channel_attn.fc.0'
    ([2, B, hidden]: the avg call, then the max call), 'cbam{i}.spatial_attn.conv' (its input
    [B, 2, H, W]; channel 1 is the max map) and 'fc1'.
    """
    masks = {}
    for i in BLOCKS:
        masks[f"bn{i}"] = pool_windows(f64[f"bn{i}"], tau[f"bn{i}"])
        # The channel gate's max over H x W of the pooled map [B, C, H, W].
        masks[f"cbam{i}.channel_attn.max_pool"] = gate_maxima(
            f64[f"cbam{i}.channel_attn.max_pool"], (2, 3), tau[f"bn{i}"])
        hidden = f"cbam{i}.channel_attn.fc.0"
        masks[hidden] = relu_inputs(f64[hidden], tau[hidden])
        # The spatial gate's max over channels of the channel gate's output [B, C, H, W].
        over_channels = gate_maxima(f64[f"cbam{i}.channel_attn"], (1,),
                                      tau[f"cbam{i}.channel_attn"])
        masks[f"cbam{i}.spatial_attn.conv"] = np.concatenate(
            [np.zeros_like(over_channels), over_channels], axis=1)  # [avg, max] maps
    masks["fc1"] = relu_inputs(f64["fc1"], tau["fc1"])
    return masks


def exact_pool_ties(f64: dict[str, np.ndarray]) -> int:
    """Max-pool windows whose positive max is shared exactly by two or more elements in float64
    (flat image regions): left to the first-maximum rule, and counted for the report."""
    count = 0
    for i in BLOCKS:
        x = np.maximum(f64[f"bn{i}"], 0)
        b, c, h, w = x.shape
        windows = x[:, :, :h // 2 * 2, :w // 2 * 2].reshape(b, c, h // 2, 2, w // 2, 2)
        top = windows.max(axis=(3, 5))
        count += int(((top > 0) & ((windows == top[:, :, :, None, :, None]).sum(axis=(3, 5))
                                   > 1)).sum())
    return count


def count(masks: dict[str, np.ndarray]) -> dict[str, int]:
    """How many kinks the masks of `find` stand for, by kind (a pool window masks 4 elements)."""
    kinds = {"fc1": "fc1_relu"}
    for i in BLOCKS:
        kinds.update({f"bn{i}": "pool", f"cbam{i}.channel_attn.max_pool": "channel_max",
                      f"cbam{i}.channel_attn.fc.0": "mlp_relu",
                      f"cbam{i}.spatial_attn.conv": "spatial_max"})
    counts = dict.fromkeys(KINDS, 0)
    for name, mask in masks.items():
        counts[kinds[name]] += int(mask.sum()) // (4 if kinds[name] == "pool" else 1)
    return counts


def stop_torch_gradients(tensors: dict, masks: dict[str, np.ndarray]) -> None:
    """Zero the gradient flowing into the masked elements of a PyTorch run's captured tensors
    (report.TorchRun.kink_tensors), before its backward pass."""
    for name, mask in masks.items():
        if not mask.any():
            continue
        captured = tensors[name]
        parts = captured if isinstance(captured, list) else [captured]
        for part, part_mask in zip(parts, mask if isinstance(captured, list) else [mask]):
            keep = torch.from_numpy(~part_mask).to(part.device, part.dtype)
            part.register_hook(lambda grad, keep=keep: grad * keep)


def flax_masks(masks: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """The masks for cbam_jax.CBAMCNN(fused=False) (NHWC), keyed by Flax module path and
    'input'/'output': what stop_flax_gradients applies."""
    nhwc = lambda m: m.transpose(0, 2, 3, 1)
    flax = {}
    for i in BLOCKS:
        flax[f"bn{i}"] = {"output": nhwc(masks[f"bn{i}"])}
        gate_max = masks[f"cbam{i}.channel_attn.max_pool"][:, :, 0, 0]  # [B, C]
        flax[f"cbam{i}.channel_attn.fc_0"] = {
            # fc_0 reads the stacked pools [avg, max] ([2, B, C]) and its output is [2, B, hidden].
            "input": np.stack([np.zeros_like(gate_max), gate_max]),
            "output": masks[f"cbam{i}.channel_attn.fc.0"],
        }
        flax[f"cbam{i}.spatial_attn.conv"] = {"input": nhwc(masks[f"cbam{i}.spatial_attn.conv"])}
    flax["fc1"] = {"output": masks["fc1"]}
    return flax


def stop_flax_gradients(masks: dict[str, dict[str, jax.Array]]):
    """A Flax method interceptor (use under `nn.intercept_methods`) that stops the gradient at
    the masked elements of the named modules' inputs or outputs (flax_masks), values unchanged.

    The model must run its reference path (`CBAMCNN(fused=False)`), whose every layer is a
    module call; the fused path's blocks and CBAMs are single ops with no such call inside. It
    works on any code that applies the model inside it, the engine's train.adam_step included;
    the masks may be traced arrays, so one compiled step serves every batch.
    """
    def stop(value, mask):
        return jnp.where(mask, jax.lax.stop_gradient(value), value)

    def interceptor(next_fun, args, kwargs, context):
        where = masks.get(".".join(context.module.path)) if context.method_name == "__call__" \
            else None
        if where is None:
            return next_fun(*args, **kwargs)
        if "input" in where:
            args = (stop(args[0], where["input"]), *args[1:])
        out = next_fun(*args, **kwargs)
        return stop(out, where["output"]) if "output" in where else out

    return interceptor
