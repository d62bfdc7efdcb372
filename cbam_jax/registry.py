"""Which models exist, by name: the factory, kept apart from the modules (as timm's create_*).

Importing this module imports no JAX: the names are plain data, and a constructor's module is
imported only when `create_model` is called, so command lines can list the names at once.
"""
import functools
import importlib
from typing import Any, Callable

# name -> (module, constructor, keyword arguments). The CBAM-ResNets get the CIFAR stem here:
# this registry serves the 32x32 recipe; `cbam_jax.resnet` itself defaults to ImageNet's.
_MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "cbam_cnn": ("cbam_jax.models", "CBAMCNN", {}),
    "cbam_resnet18": ("cbam_jax.resnet", "cbam_resnet18", {"stem": "cifar"}),
    "cbam_resnet34": ("cbam_jax.resnet", "cbam_resnet34", {"stem": "cifar"}),
    "cbam_resnet50": ("cbam_jax.resnet", "cbam_resnet50", {"stem": "cifar"}),
}
MODEL_NAMES = tuple(_MODELS)
DEFAULT_IMAGE_SIZE = 32  # the recipe's (CIFAR-10's) square images
# The smallest square image each model takes: CBAMCNN's three 2x2 max-pools
# (models.MIN_IMAGE_SIZE) and the CIFAR-stem ResNets' three stride-2 stages each halve it, and
# each needs a whole pixel to halve. The ResNets' global average pool takes any larger size;
# CBAMCNN's fc1 is built for its size (`image_size`).
MIN_IMAGE_SIZE = {name: 8 for name in MODEL_NAMES}
_SIZED = ("cbam_cnn",)  # the models whose weights depend on the image size


def check_image_size(name: str, image_size: int) -> None:
    """Refuses an image size model `name` cannot take, naming the smallest it can."""
    smallest = MIN_IMAGE_SIZE[name]
    if image_size < smallest:
        raise ValueError(f"--image-size {image_size}: {name} cannot take {image_size}x"
                         f"{image_size} images; the smallest image size it takes is {smallest}")


def create_model(name: str, num_classes: int = 10, dtype: Any = None,
                 image_size: int = DEFAULT_IMAGE_SIZE, **overrides):
    """A Linen model by name for square images of `image_size`, called as
    `apply(variables, x, train=...)` with 'batch_stats'."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)}")
    check_image_size(name, image_size)
    module, constructor, defaults = _MODELS[name]
    build = getattr(importlib.import_module(module), constructor)
    if name in _SIZED:
        defaults = {**defaults, "image_size": image_size}
    return build(num_classes=num_classes, dtype=dtype, **{**defaults, **overrides})


@functools.lru_cache(maxsize=None)
def attention_layer(preset: str) -> Callable[..., Any]:
    """A factory of the Linen CBAM preset `preset` ('tutorial', 'official', 'timm'): called
    with a module's own keywords (dtype, fused, name, ...), it returns that CBAM. One object per
    preset, so that models built with the same preset compare (and hash, for jit) equal."""
    from cbam_jax.layers import CBAM
    from cbam_jax.options import CBAM_PRESETS

    if preset not in CBAM_PRESETS:
        raise ValueError(f"unknown CBAM preset {preset!r}: expected one of "
                         f"{', '.join(CBAM_PRESETS)}")
    return functools.partial(CBAM.preset, preset)
