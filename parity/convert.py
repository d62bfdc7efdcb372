"""Exact weight conversion between the tutorial's `CBAM_CNN` state_dict and `cbam_jax.CBAMCNN`.

Names come from `cbam_jax.naming.torch_style_name`; layouts differ in three ways:
conv kernels are OIHW in PyTorch and HWIO in Flax, Linear weights are [out, in] vs Dense
kernels [in, out], and fc1's inputs are flattened (C, H, W) by PyTorch but (H, W, C) by NHWC.
Every conversion is a transpose or a reshape of float32 data, so the round trip is bitwise.
"""
import dataclasses
import functools
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from cbam_jax import inference
from cbam_jax.data import IMAGE_SHAPE
from cbam_jax.models import CBAMCNN, FEATURE_SHAPE
from cbam_jax.naming import torch_style_name
from parity.reference import CBAM_CNN

# fc1 reads the last CBAM's output, [C, H, W] = [128, 4, 4] in PyTorch's layout.
_FC1_INPUT_CHW = (FEATURE_SHAPE[2], FEATURE_SHAPE[0], FEATURE_SHAPE[1])


@dataclasses.dataclass(frozen=True)
class _Leaf:
    collection: str  # 'params' or 'batch_stats'
    path: tuple[str, ...]  # inside the collection, e.g. ('cbam1', 'spatial_attn', 'conv', 'kernel')
    flax_shape: tuple[int, ...]
    torch_shape: tuple[int, ...]
    kind: str  # 'conv', 'linear', 'fc1' (linear with the flatten permutation), 'counter' or 'copy'


def _flax_to_torch_array(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "conv":  # HWIO -> OIHW
        return a.transpose(3, 2, 0, 1)
    if kind == "linear":  # [in, out] -> [out, in]
        return a.T
    if kind == "fc1":  # [(H, W, C), out] -> [out, (C, H, W)]
        c, h, w = _FC1_INPUT_CHW
        return a.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * w)
    return a


def _torch_to_flax_array(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "conv":  # OIHW -> HWIO
        return a.transpose(2, 3, 1, 0)
    if kind == "linear":
        return a.T
    if kind == "fc1":  # [out, (C, H, W)] -> [(H, W, C), out]
        c, h, w = _FC1_INPUT_CHW
        return a.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)
    return a


@functools.lru_cache(maxsize=None)
def variables_template():
    """CBAMCNN's variables as shapes and dtypes (jax.ShapeDtypeStruct), without computing them."""
    return jax.eval_shape(lambda: CBAMCNN().init(jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE))))


@functools.lru_cache(maxsize=None)
def _layout() -> "OrderedDict[str, _Leaf]":
    """{PyTorch name: _Leaf} in `CBAM_CNN.state_dict()` order, checked against both models."""
    with torch.device("meta"):  # shapes and key order only, no memory
        torch_shapes = OrderedDict((k, tuple(v.shape)) for k, v in CBAM_CNN().state_dict().items())
    template = variables_template()
    flax_leaves = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(template)[0]:
        collection, *path = (k.key for k in key_path)
        name = torch_style_name(tuple(path))
        if name == "fc1.weight":
            kind = "fc1"
        elif leaf.ndim == 4:
            kind = "conv"
        elif leaf.ndim == 2:
            kind = "linear"
        elif path[-1] == "num_batches_tracked":
            kind = "counter"
        else:
            kind = "copy"
        torch_shape = _flax_to_torch_array(kind, np.empty(leaf.shape, np.float32)).shape
        flax_leaves[name] = _Leaf(collection, tuple(path), tuple(leaf.shape), torch_shape, kind)
    # The two models are defined independently; a disagreement is a bug here, not bad input.
    assert set(flax_leaves) == set(torch_shapes), sorted(set(flax_leaves) ^ set(torch_shapes))
    assert all(flax_leaves[k].torch_shape == s for k, s in torch_shapes.items())
    return OrderedDict((name, flax_leaves[name]) for name in torch_shapes)


_KEYS_SHOWN = 6  # per kind of mismatch: another network's state_dict has hundreds of keys


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_KEYS_SHOWN])
    return shown if len(items) <= _KEYS_SHOWN else f"{shown} and {len(items) - _KEYS_SHOWN} more"


def _check_keys(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                what: str) -> None:
    """Raise like PyTorch's strict `load_state_dict`: missing, unexpected and misshaped keys,
    in one line."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [f"{k}: got shape {list(found[k])}, expected {list(expected[k])}"
                 for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if missing or unexpected or misshaped:
        parts = [f"{name} keys: {_listed(keys)}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped))
                 if keys]
        raise ValueError(f"{what} does not match the tutorial's CBAM_CNN / cbam_jax.CBAMCNN: "
                         + "; ".join(parts))


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def torch_to_flax(state_dict: Mapping) -> dict:
    """A `CBAM_CNN` state_dict -> `{'params': ..., 'batch_stats': ...}` for `cbam_jax.CBAMCNN`."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"torch_to_flax expects a state_dict mapping names to tensors, got "
                        f"{type(state_dict).__name__}")
    layout = _layout()
    arrays = {k: _as_numpy(v) for k, v in state_dict.items()}
    _check_keys({k: a.shape for k, a in arrays.items()},
                {k: leaf.torch_shape for k, leaf in layout.items()}, "state_dict")
    variables = {"params": {}, "batch_stats": {}}
    for name, leaf in layout.items():  # torch order is call order, which `init` also uses
        a = arrays[name]
        if leaf.kind == "counter":
            if not 0 <= int(a) < 2**31:  # stored as int32 on the JAX side
                raise ValueError(f"{name} = {int(a)} does not fit int32")
            value = jnp.asarray(a, jnp.int32)
        else:
            value = jnp.asarray(_torch_to_flax_array(leaf.kind, a.astype(np.float32)))
        node = variables[leaf.collection]
        for key in leaf.path[:-1]:
            node = node.setdefault(key, {})
        node[leaf.path[-1]] = value
    return variables


def flax_to_torch(variables: Mapping) -> "OrderedDict[str, torch.Tensor]":
    """`cbam_jax.CBAMCNN` variables -> a state_dict that `CBAM_CNN` loads with `strict=True`."""
    layout = _layout()
    # Keyed "collection/path" so that a stray collection (e.g. intermediates) is reported too.
    found = {"/".join(k.key for k in key_path): np.asarray(leaf)
             for key_path, leaf in jax.tree_util.tree_flatten_with_path(dict(variables))[0]}
    key = {name: "/".join((leaf.collection, *leaf.path)) for name, leaf in layout.items()}
    _check_keys({k: a.shape for k, a in found.items()},
                {key[name]: leaf.flax_shape for name, leaf in layout.items()}, "variables")
    state_dict = OrderedDict()
    for name, leaf in layout.items():
        a = found[key[name]]
        if leaf.kind == "counter":
            state_dict[name] = torch.tensor(int(a), dtype=torch.int64)
        else:
            a = _flax_to_torch_array(leaf.kind, a.astype(np.float32))
            state_dict[name] = torch.from_numpy(np.ascontiguousarray(a))
    return state_dict


def save_pth(variables: Mapping, path) -> None:
    """Write CBAMCNN variables as a `.pth` state_dict for the tutorial's `CBAM_CNN`."""
    torch.save(flax_to_torch(variables), path)


EXPECTED_PTH = ("expected a state_dict of the tutorial's CBAM_CNN, saved with "
                "torch.save(model.state_dict(), path)")


def load_pth(path) -> dict:
    """Read a tutorial `.pth` state_dict into CBAMCNN variables.

    Only tensors are read (`torch.load(weights_only=True)`): a file that holds other pickled
    objects (a whole model, or a pickle made to run code) is refused, never unpickled. Anything
    that is not the tutorial's state_dict raises ValueError in one line that says what the file
    holds and what was expected; a missing file raises FileNotFoundError.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; {EXPECTED_PTH}")
    if not path.is_file():
        raise ValueError(f"{path}: not a file; {EXPECTED_PTH}")
    try:
        with warnings.catch_warnings():  # torch's notes on the pickle protocol of old files
            warnings.simplefilter("ignore")
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e}); {EXPECTED_PTH}") from None
    except Exception as e:  # torch.load raises a different type for each kind of bad file
        raise ValueError(f"{path}: {_unreadable(path, e)}; {EXPECTED_PTH}") from None
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path}: holds a {type(state_dict).__name__}, not a state_dict; "
                         f"{EXPECTED_PTH}")
    try:
        return torch_to_flax(state_dict)
    except (ValueError, TypeError) as e:  # the key report; values that are not numbers
        raise ValueError(f"{path}: {e}") from None


def _unreadable(path: Path, error: Exception) -> str:
    """What a file that `torch.load(weights_only=True)` refused holds, in words. Torch's own
    message is not passed on: it suggests weights_only=False, which would run the pickle."""
    if path.stat().st_size == 0:
        return "an empty file"
    try:  # the globals a zip-format checkpoint's pickle refers to, read without running it
        unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not torch's zip format (or an older torch): say less
        unsafe = []
    if unsafe:
        return (f"holds pickled Python objects besides tensors ({_listed(unsafe)}), e.g. a "
                f"whole model saved with torch.save(model); they are not loaded, as unpickling "
                f"them could run any code")
    if isinstance(error, pickle.UnpicklingError):
        return ("not a plain state_dict of tensors: torch.load(weights_only=True) refuses what "
                "it holds (pickled Python objects could run any code) or cannot decode it")
    return f"not a file that torch.save wrote, or a damaged one ({type(error).__name__})"


def load_checkpoint(path, *, dataset: str | None = None, **kwargs) -> inference.TrainedModel:
    """`cbam_jax.inference.load_checkpoint` (same keywords), and a tutorial `.pth` too.

    A `.pth` holds weights only: the `run.json` of the run it sits in (scripts/train.py writes
    it into the run directory) names the data set and settings; without one, `dataset` (default
    CIFAR-10, the tutorial's) and the recipe's defaults. `dataset` overrides the record's.
    """
    if Path(path).suffix != ".pth":
        return inference.load_checkpoint(path, dataset=dataset, **kwargs)
    kwargs.pop("which", None)  # a .pth is one model
    record = inference.read_run_record(path) or {}
    return inference.from_variables(
        load_pth(path), config=inference.config_of(record),
        dataset=dataset or record.get("dataset", "cifar10"), source=path,
        devices=record.get("devices"), **kwargs)
