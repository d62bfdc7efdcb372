"""The tutorial's transforms as torchvision's Pillow backend runs them, with explicit parameters.

torchvision is not installed here, so this module makes the very Pillow calls that
torchvision/transforms/_functional_pil.py makes for each transform (named per function), on
numpy uint8 HWC images. `cbam_jax.augment` is tested against it with identical parameters, and
scripts/benchmark.py times `train_transform`, the per-image CPU path the tutorial's DataLoader runs.
"""
import dataclasses

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from cbam_jax import augment

MEAN = np.asarray(augment.CIFAR10_MEAN, np.float32)
STD = np.asarray(augment.CIFAR10_STD, np.float32)


@dataclasses.dataclass(frozen=True)
class ImageParams:
    """One image's draws of the train transform (the fields of `augment.AugmentParams`)."""
    crop_top: int
    crop_left: int
    flip: bool
    order: tuple[int, ...]  # jitter ids, augment.BRIGHTNESS_ID ... HUE_ID
    brightness: float
    contrast: float
    saturation: float
    hue: float
    angle: float


def unbatch(params: augment.AugmentParams) -> list[ImageParams]:
    """Splits a batch of JAX parameters into per-image Python values (float32 values exactly)."""
    p = {k: np.asarray(v) for k, v in params._asdict().items()}
    return [ImageParams(crop_top=int(p["crop_top"][i]), crop_left=int(p["crop_left"][i]),
                        flip=bool(p["flip"][i]), order=tuple(int(k) for k in p["order"][i]),
                        brightness=float(p["brightness"][i]), contrast=float(p["contrast"][i]),
                        saturation=float(p["saturation"][i]), hue=float(p["hue"][i]),
                        angle=float(p["angle"][i]))
            for i in range(len(p["flip"]))]


def sample_params(rng: np.random.Generator) -> ImageParams:
    """Draws like torchvision's get_params, in the order the Compose calls them."""
    pad = augment.CROP_PADDING
    jitter = lambda amount: float(rng.uniform(1 - amount, 1 + amount))
    return ImageParams(
        crop_top=int(rng.integers(0, 2 * pad + 1)),        # RandomCrop: randint(0, h - th + 1)
        crop_left=int(rng.integers(0, 2 * pad + 1)),
        flip=bool(rng.random() < augment.FLIP_PROBABILITY),  # RandomHorizontalFlip: rand < p
        order=tuple(int(k) for k in rng.permutation(4)),   # ColorJitter: randperm(4)
        brightness=jitter(augment.BRIGHTNESS), contrast=jitter(augment.CONTRAST),
        saturation=jitter(augment.SATURATION),
        hue=float(rng.uniform(-augment.HUE, augment.HUE)),
        angle=float(rng.uniform(-augment.MAX_DEGREES, augment.MAX_DEGREES)))


# --- The Pillow operations (PIL image in, PIL image out). ------------------------------------

def random_crop(img: Image.Image, top: int, left: int) -> Image.Image:
    """F.pad(img, 4, fill=0) -> ImageOps.expand; F.crop -> Image.crop((l, t, r, b)); the
    padding scaled with the size as `augment.crop_padding` scales it."""
    width, height = img.size
    padded = ImageOps.expand(img, border=augment.crop_padding(height), fill=(0, 0, 0))
    return padded.crop((left, top, left + width, top + height))


def horizontal_flip(img: Image.Image, flip: bool) -> Image.Image:
    """F.hflip -> Image.transpose(FLIP_LEFT_RIGHT)."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img


def adjust_brightness(img: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(factor)


def adjust_contrast(img: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(factor)


def adjust_saturation(img: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Color(img).enhance(factor)


def adjust_hue(img: Image.Image, hue: float) -> Image.Image:
    """_functional_pil.adjust_hue: HSV, shift H by int(hue * 255) with uint8 wrap-around, RGB."""
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    np_h += np.int32(hue * 255).astype(np.uint8)  # over/underflows, as torchvision intends
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


def color_jitter(img: Image.Image, p: ImageParams) -> Image.Image:
    """ColorJitter.forward: the four adjustments in the drawn order."""
    ops = {augment.BRIGHTNESS_ID: lambda x: adjust_brightness(x, p.brightness),
           augment.CONTRAST_ID: lambda x: adjust_contrast(x, p.contrast),
           augment.SATURATION_ID: lambda x: adjust_saturation(x, p.saturation),
           augment.HUE_ID: lambda x: adjust_hue(x, p.hue)}
    for k in p.order:
        img = ops[k](img)
    return img


def rotate(img: Image.Image, angle: float) -> Image.Image:
    """F.rotate(img, angle, NEAREST, expand=False, center=None, fill=0) -> Image.rotate."""
    return img.rotate(angle, Image.Resampling.NEAREST, expand=False, center=None,
                      fillcolor=(0, 0, 0))


# --- On numpy uint8 HWC images. ---------------------------------------------------------------

def _pil_op(op):
    def on_array(image: np.ndarray, *args) -> np.ndarray:
        return np.asarray(op(Image.fromarray(np.asarray(image, np.uint8), "RGB"), *args))
    on_array.__doc__ = op.__doc__
    return on_array


OPS = {name: _pil_op(op) for name, op in [
    ("random_crop", random_crop), ("horizontal_flip", horizontal_flip),
    ("adjust_brightness", adjust_brightness), ("adjust_contrast", adjust_contrast),
    ("adjust_saturation", adjust_saturation), ("adjust_hue", adjust_hue),
    ("rotate", rotate)]}


def apply_params(image: np.ndarray, p: ImageParams) -> np.ndarray:
    """Crop, flip, jitter, rotate one uint8 HWC image with given parameters (uint8 HWC out)."""
    img = Image.fromarray(np.asarray(image, np.uint8), "RGB")
    img = random_crop(img, p.crop_top, p.crop_left)
    img = horizontal_flip(img, p.flip)
    img = color_jitter(img, p)
    img = rotate(img, p.angle)
    return np.asarray(img)


def to_tensor_normalize(image: np.ndarray) -> np.ndarray:
    """ToTensor + Normalize on uint8 HWC: float32 CHW, divided as torch divides."""
    x = np.asarray(image, np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    return (x - MEAN[:, None, None]) / STD[:, None, None]


def train_transform(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The tutorial's full train transform on one uint8 HWC image -> normalised float32 CHW."""
    return to_tensor_normalize(apply_params(image, sample_params(rng)))


def test_transform(image: np.ndarray) -> np.ndarray:
    """The tutorial's test transform on one uint8 HWC image -> normalised float32 CHW."""
    return to_tensor_normalize(image)


test_transform.__test__ = False  # a transform, not a pytest test
