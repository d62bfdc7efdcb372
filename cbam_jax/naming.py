"""PyTorch's names for Flax parameters: `('cbam1', 'channel_attn', 'fc_0', 'kernel')` is
`cbam1.channel_attn.fc.0.weight`. One place for the names that the parameter report, the
TensorBoard histograms and the parity converters print and match."""
import re
from typing import Callable

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias",
               "mean": "running_mean", "var": "running_var"}


def torch_style_name(path: tuple[str, ...]) -> str:
    """('cbam1', 'channel_attn', 'fc_0', 'kernel') -> 'cbam1.channel_attn.fc.0.weight'."""
    *modules, leaf = path
    modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]  # Sequential index: fc_0 -> fc.0
    return ".".join(modules + [_LEAF_NAMES.get(leaf, leaf)])


def named_leaves(tree, prefix: tuple[str, ...] = ()) -> dict:
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
