"""The PyTorch side of cbam-jax: the tutorial's modules, exact weight conversion, parity checks.

The names below import `parity.convert` (and torch) on first use, so that `python -m parity`
and `cbam-parity` can start, and say which extra to install, where torch is missing.
"""
import importlib

__all__ = ["flax_to_torch", "load_checkpoint", "load_pth", "save_pth", "torch_to_flax"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'parity' has no attribute {name!r}")
    return getattr(importlib.import_module("parity.convert"), name)


def __dir__():
    return sorted(list(globals()) + __all__)
