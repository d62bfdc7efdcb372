"""What happens to images on the device: the tutorial's train and test transforms in JAX.

The tutorial runs torchvision's transforms on PIL images, so every step there is Pillow C code on
uint8 pixels. Each step here reproduces that step's arithmetic (float32 where Pillow uses float,
exact integer or exact-rounding tricks where Pillow rounds a double) and quantises to uint8
after it, as Pillow does; `parity/pillow_transforms.py` runs Pillow itself with the same
parameters and the tests compare the two. Randomness is split from arithmetic:
`sample_params(key, batch) -> AugmentParams`, `apply_params(params, images) -> uint8 images`.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# transforms.Normalize constants of the tutorial.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

IMAGE_SHAPE = (32, 32, 3)
CROP_PADDING = 4           # RandomCrop(32, padding=4): offsets 0..8 into the 40x40 padded image
FLIP_PROBABILITY = 0.5     # RandomHorizontalFlip()
BRIGHTNESS = CONTRAST = SATURATION = 0.2  # ColorJitter: factors uniform in [0.8, 1.2]
HUE = 0.1                  # ColorJitter: hue offset uniform in [-0.1, 0.1]
MAX_DEGREES = 15.0         # RandomRotation(15): angle uniform in [-15, 15]
# torchvision's ColorJitter numbers its adjustments so, and applies them in randperm(4) order.
BRIGHTNESS_ID, CONTRAST_ID, SATURATION_ID, HUE_ID = range(4)


class AugmentParams(NamedTuple):
    """The random draws of the train transform for a batch of B images (torchvision's names)."""
    crop_top: jax.Array     # int32 [B] in 0..8: row of the crop in the zero-padded 40x40 image
    crop_left: jax.Array    # int32 [B] in 0..8
    flip: jax.Array         # bool [B]: mirror left-right
    order: jax.Array        # int32 [B, 4]: a permutation of the four jitter ids above
    brightness: jax.Array   # float32 [B] in [0.8, 1.2]
    contrast: jax.Array     # float32 [B] in [0.8, 1.2]
    saturation: jax.Array   # float32 [B] in [0.8, 1.2]
    hue: jax.Array          # float32 [B] in [-0.1, 0.1]
    angle: jax.Array        # float32 [B] in [-15, 15], degrees counter-clockwise (PIL's sense)


def check_images(images) -> None:
    """Raises ValueError unless `images` is a uint8 batch [B, 32, 32, 3]."""
    shape, dtype = getattr(images, "shape", None), getattr(images, "dtype", None)
    if shape is None or len(shape) != 4 or tuple(shape[1:]) != IMAGE_SHAPE or dtype != jnp.uint8:
        raise ValueError(f"expected uint8 images of shape [B, 32, 32, 3] (NHWC, values 0..255), "
                         f"got {dtype} of shape {shape}")


# torchvision's ToTensor + Normalize of every byte value, per channel, in float32 as torch computes
# it. A table keeps the division exact: XLA turns division by a constant into multiplication by
# its rounded reciprocal, which differs in the last bit.
_NORMALIZED_BYTE = ((np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)
                     - np.asarray(CIFAR10_MEAN, np.float32)) / np.asarray(CIFAR10_STD, np.float32))
_BYTE_OVER_255 = np.arange(256, dtype=np.float32) / np.float32(255.0)  # float(k) / 255, exactly


def normalize(images) -> jax.Array:
    """ToTensor + Normalize (the test transform): uint8 [B,32,32,3] -> float32 [B,32,32,3]."""
    check_images(images)
    return jnp.asarray(_NORMALIZED_BYTE)[jnp.asarray(images), jnp.arange(3)]


def sample_params(key: jax.Array, batch_size: int) -> AugmentParams:
    """Draws the train transform's parameters independently for each of `batch_size` images."""
    keys = jax.random.split(key, 9)
    uniform = lambda k, lo, hi: jax.random.uniform(k, (batch_size,), jnp.float32, lo, hi)
    max_offset = 2 * CROP_PADDING
    return AugmentParams(
        crop_top=jax.random.randint(keys[0], (batch_size,), 0, max_offset + 1, jnp.int32),
        crop_left=jax.random.randint(keys[1], (batch_size,), 0, max_offset + 1, jnp.int32),
        flip=jax.random.bernoulli(keys[2], FLIP_PROBABILITY, (batch_size,)),
        order=jnp.argsort(jax.random.uniform(keys[3], (batch_size, 4)), axis=-1).astype(jnp.int32),
        brightness=uniform(keys[4], 1 - BRIGHTNESS, 1 + BRIGHTNESS),
        contrast=uniform(keys[5], 1 - CONTRAST, 1 + CONTRAST),
        saturation=uniform(keys[6], 1 - SATURATION, 1 + SATURATION),
        hue=uniform(keys[7], -HUE, HUE),
        angle=uniform(keys[8], -MAX_DEGREES, MAX_DEGREES))


# ---------------------------------------------------------------------------------------------
# One image at a time (uint8 [32, 32, 3] in, uint8 out); vmapped over the batch below.

def random_crop(image, top, left):
    """RandomCrop(32, padding=4): ImageOps.expand with zeros, then Image.crop at (left, top)."""
    p = CROP_PADDING
    padded = jnp.pad(image, ((p, p), (p, p), (0, 0)))
    return jax.lax.dynamic_slice(padded, (top, left, 0), IMAGE_SHAPE)


def horizontal_flip(image, flip):
    """RandomHorizontalFlip: Image.transpose(FLIP_LEFT_RIGHT) when `flip`."""
    return jnp.where(flip, image[:, ::-1], image)


def _blend(degenerate, image, factor):
    """Image.blend (libImaging/Blend.c): d + factor * (x - d) in float32, clipped, truncated."""
    d = degenerate.astype(jnp.float32)
    product = factor * (image.astype(jnp.float32) - d)
    # Blend.c rounds the product before the sum. XLA's CPU back end (LLVM, as on GPU) contracts
    # a multiply feeding an add into one FMA (one rounding), which moves truncated results by 1;
    # a select between them blocks that (optimization_barrier does not survive to codegen).
    product = jnp.where(jnp.isnan(product), 0.0, product)
    out = d + product
    return jnp.floor(jnp.clip(out, 0.0, 255.0)).astype(jnp.uint8)


def _grayscale(image):
    """Image.convert('L') (libImaging/Convert.c): ITU-R 601-2 luma in 16-bit fixed point."""
    rgb = image.astype(jnp.int32)
    return (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16


def adjust_brightness(image, factor):
    """ImageEnhance.Brightness: blend with black."""
    return _blend(jnp.zeros_like(image), image, factor)


def adjust_contrast(image, factor):
    """ImageEnhance.Contrast: blend with the grey level int(mean(L) + 0.5) of the whole image."""
    gray = _grayscale(image)
    n = gray.size
    mean = (2 * jnp.sum(gray) + n) // (2 * n)  # int(sum / n + 0.5), exactly, in integers
    return _blend(jnp.broadcast_to(mean, image.shape), image, factor)


def adjust_saturation(image, factor):
    """ImageEnhance.Color: blend with the image's own L conversion."""
    gray = _grayscale(image)[..., None]
    return _blend(jnp.broadcast_to(gray, image.shape), image, factor)


def _divide_by_6(x):
    """IEEE float32 x / 6 for 0 <= x < 8. XLA may compute x * float32(1/6) instead, off by an
    ulp; pick the candidate within one ulp whose exact residual x - 6q is smallest."""
    q = x / 6.0
    candidates = jnp.stack([jnp.nextafter(q, -jnp.inf), q, jnp.nextafter(q, jnp.inf)])
    residual = (x - 4 * candidates) - 2 * candidates  # both subtractions exact (Sterbenz)
    best = jnp.argmin(jnp.abs(residual), axis=0)
    return jnp.take_along_axis(candidates, best[None], axis=0)[0]


def _floor_255x(x):
    """floor(255 * x) for float32 x >= 0, exact as when C computes `x * 255.0` in double.

    A float32 product would round to the integer just above in the many cases where the exact
    product is an integer minus a hair; 256x is exact, and so are the two comparisons."""
    a = x * 256.0
    f = jnp.floor(a - x)
    f = jnp.where(a - f < x, f - 1, f)          # estimate one too high
    f = jnp.where(a - (f + 1) >= x, f + 1, f)   # estimate one too low
    return f.astype(jnp.int32)


def _rgb_to_hsv(image):
    """Image.convert('HSV') (rgb2hsv_row in libImaging/Convert.c), bit-exact: int32 h, s, v.

    Pillow computes in float with a few steps in double; each step here is a single float32
    rounding of the same exact value, or, for the one double sum that float32 cannot round
    once (red maximum, green minimum), the same rounding done in integers."""
    rgb = image.astype(jnp.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc, minc = jnp.max(rgb, axis=-1), jnp.min(rgb, axis=-1)
    grey = maxc == minc
    cr = jnp.where(grey, 1, maxc - minc).astype(jnp.float32)
    s = cr / jnp.maximum(maxc, 1).astype(jnp.float32)
    rc, gc, bc = ((maxc - c).astype(jnp.float32) / cr for c in (r, g, b))
    # Pillow: h = bc - gc | 2.0 + rc - bc | 4.0 + gc - rc (the last two in double). One of the
    # two quotients is exactly 1 (it belongs to the minimum), which makes each a single rounding.
    h = jnp.where(r == maxc, bc - gc,
                  jnp.where(g == maxc, jnp.where(rc == 1, 3 - bc, 1 + rc),
                            jnp.where(gc == 1, 5 - rc, 3 + gc)))
    # Then h = (float) fmod(h / 6.0 + 1.0, 1.0); uh = (int)(h * 255.0).
    uh_nonneg = _floor_255x(_divide_by_6(h))
    # h < 0: h is a multiple of 2^-24 in [-1, 0), float(1 + h/6) = round_half_even(N / 6) * 2^-24.
    n = (6 << 24) + (h * (1 << 24)).astype(jnp.int32)
    q, rem = n // 6, n % 6
    q = q + ((rem > 3) | ((rem == 3) & (q % 2 == 1))).astype(jnp.int32)
    uh_neg = ((q.astype(jnp.uint32) * 255) >> 24).astype(jnp.int32)
    uh = jnp.where(h < 0, uh_neg, uh_nonneg)
    us = _floor_255x(s)
    zero = jnp.zeros_like(uh)
    return jnp.where(grey, zero, uh), jnp.where(grey, zero, us), maxc


def _hsv_to_rgb(h, s, v):
    """Image.convert('RGB') from HSV (hsv2rgb in libImaging/Convert.c), in float32."""
    i = (6 * h) // 255
    f = jnp.asarray(_BYTE_OVER_255)[(6 * h) % 255]
    fs = jnp.asarray(_BYTE_OVER_255)[s]
    vf = v.astype(jnp.float32)
    rnd = lambda x: jnp.floor(x + 0.5).astype(jnp.int32)  # C round(): halves away from zero
    p = rnd(vf * (1.0 - fs))
    q = rnd(vf * (1.0 - fs * f))
    t = rnd(vf * (1.0 - fs * (1.0 - f)))
    sector = i % 6
    pick = lambda *choices: jnp.select([sector == k for k in range(6)], choices)
    rgb = jnp.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], -1)
    rgb = jnp.where((s == 0)[..., None], v[..., None], rgb)
    return jnp.clip(rgb, 0, 255).astype(jnp.uint8)


def _truncate_255x(x):
    """int(x * 255) in double, truncating toward zero, for float32 x of either sign."""
    return jnp.sign(x).astype(jnp.int32) * _floor_255x(jnp.abs(x))


def adjust_hue(image, hue):
    """torchvision's PIL adjust_hue: to HSV, add int(hue * 255) to H modulo 256, back to RGB."""
    h, s, v = _rgb_to_hsv(image)
    h = (h + _truncate_255x(hue)) % 256
    return _hsv_to_rgb(h, s, v)


def color_jitter(image, order, brightness, contrast, saturation, hue):
    """ColorJitter(0.2, 0.2, 0.2, 0.1): the four adjustments in the per-image `order`.

    Under vmap a switch computes every branch, so the costly hue shift runs once, outside: the
    blends placed before it in `order` run first, those placed after it run last."""
    blends = [lambda x: adjust_brightness(x, brightness), lambda x: adjust_contrast(x, contrast),
              lambda x: adjust_saturation(x, saturation)]
    blends.insert(HUE_ID, lambda x: x)  # the hue slot: nothing in these loops
    hue_position = jnp.argmax(order == HUE_ID)

    def blends_at(positions):
        def step(k, x):
            return jax.lax.switch(jnp.where(positions(k), order[k], HUE_ID), blends, x)
        return step

    image = jax.lax.fori_loop(0, 4, blends_at(lambda k: k < hue_position), image)
    image = adjust_hue(image, hue)
    return jax.lax.fori_loop(0, 4, blends_at(lambda k: k > hue_position), image)


def rotate(image, angle):
    """RandomRotation: Image.rotate(angle, NEAREST, fillcolor=0) about the centre (w/2, h/2).

    For images this small Pillow runs the inverse affine map in 16.16 fixed point
    (affine_fixed in libImaging/Geometry.c): output pixel (x, y) reads input pixel
    ((A2 + y*A1 + x*A0) >> 16, (A5 + y*A4 + x*A3) >> 16), or keeps the zero fill. The integer
    part is exact here; only the six coefficients come from float32 instead of double, and may
    land one unit (2^-16 pixel) off, which moves a source pixel only at a boundary that close."""
    height, width, _ = image.shape
    theta = -jnp.deg2rad(angle)  # Image.rotate inverts: cos, sin of -angle
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    # Pillow's double matrix (a0, a1, a2, a3, a4, a5) = (cos, sin, cx - cx*cos - cy*sin,
    # -sin, cos, cy + cx*sin - cy*cos), then FIX(v) = floor(v * 65536 + 0.5), with the offset
    # of the pixel centre folded into the translation: a2 + (a0 + a1) / 2, a5 + (a3 + a4) / 2.
    fix = lambda v: jnp.floor(v * 65536.0 + 0.5).astype(jnp.int32)
    cx, cy = width / 2, height / 2
    a0, a1, a3, a4 = fix(cos), fix(sin), fix(-sin), fix(cos)
    a2 = fix(cx - (cx - 0.5) * cos - (cy - 0.5) * sin)
    a5 = fix(cy + (cx - 0.5) * sin - (cy - 0.5) * cos)
    ys, xs = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
    src_x = (a2 + ys * a1 + xs * a0) >> 16
    src_y = (a5 + ys * a4 + xs * a3) >> 16
    inside = (src_x >= 0) & (src_x < width) & (src_y >= 0) & (src_y < height)
    pixels = image[jnp.clip(src_y, 0, height - 1), jnp.clip(src_x, 0, width - 1)]
    return jnp.where(inside[..., None], pixels, jnp.zeros_like(pixels))


def _transform_one(params, image):
    image = random_crop(image, params.crop_top, params.crop_left)
    image = horizontal_flip(image, params.flip)
    image = color_jitter(image, params.order, params.brightness, params.contrast,
                         params.saturation, params.hue)
    return rotate(image, params.angle)


def apply_params(params: AugmentParams, images) -> jax.Array:
    """The train transform's geometry and colour with given parameters: uint8 in, uint8 out."""
    check_images(images)
    return jax.vmap(_transform_one)(params, jnp.asarray(images))


def augment(key: jax.Array, images) -> jax.Array:
    """The full train transform with per-image randomness: uint8 [B,32,32,3] -> float32
    normalised [B,32,32,3]. Pure and jit-able (trace-time shape checks only)."""
    check_images(images)
    return normalize(apply_params(sample_params(key, images.shape[0]), images))
