"""cbam-jax: CBAM attention (Woo et al., 2018) and the tutorial's CBAM CNN in JAX/Flax.

`from cbam_jax import CBAM` and the other names below import their module on first use, so
that the light modules (`cbam_jax.recipe`, `cbam_jax.registry`) can be imported without JAX.
"""
import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it (docs/architecture.md shows the rooms).
_EXPORTS = {
    "CBAM": "cbam_jax.layers", "CBAM_PRESETS": "cbam_jax.options",
    "CBAMOptions": "cbam_jax.options", "ChannelOptions": "cbam_jax.options",
    "SpatialOptions": "cbam_jax.options",
    "ChannelAttention": "cbam_jax.layers", "SpatialAttention": "cbam_jax.layers",
    "BatchNorm": "cbam_jax.layers",
    "CBAMCNN": "cbam_jax.models",
    "CBAMResNet": "cbam_jax.resnet", "cbam_resnet18": "cbam_jax.resnet",
    "cbam_resnet34": "cbam_jax.resnet", "cbam_resnet50": "cbam_jax.resnet",
    "create_model": "cbam_jax.registry", "MODEL_NAMES": "cbam_jax.registry",
    "named_leaves": "cbam_jax.naming", "parameter_report": "cbam_jax.naming",
    "torch_style_name": "cbam_jax.naming",
    "max_pool_2x2": "cbam_jax.ops.fused",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cbam_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return sorted(list(globals()) + __all__)
