"""What happens to images on the device: the tutorial's train and test transforms in JAX.

The tutorial runs torchvision's transforms on PIL images, so every step there is Pillow C code on
uint8 pixels. Each step here reproduces that step's arithmetic (float32 where Pillow uses float,
exact integer or exact-rounding tricks where Pillow rounds a double) and quantises to uint8
after it, as Pillow does; `parity/pillow_transforms.py` runs Pillow itself with the same
parameters and the tests compare the two. Randomness is split from arithmetic:
`sample_params(key, batch) -> AugmentParams`, `apply_params(params, images) -> uint8 images`.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cbam_jax.data import CIFAR10_MEAN, CIFAR10_NORMALIZATION, CIFAR10_STD, Normalization

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
    crop_left: jax.Array    # int32 [B] in 0..8 (at 32x32; 0..2p at other sizes, `crop_padding`)
    flip: jax.Array         # bool [B]: mirror left-right
    order: jax.Array        # int32 [B, 4]: a permutation of the four jitter ids above
    brightness: jax.Array   # float32 [B] in [0.8, 1.2]
    contrast: jax.Array     # float32 [B] in [0.8, 1.2]
    saturation: jax.Array   # float32 [B] in [0.8, 1.2]
    hue: jax.Array          # float32 [B] in [-0.1, 0.1]
    angle: jax.Array        # float32 [B] in [-15, 15], degrees counter-clockwise (PIL's sense)


def check_images(images) -> None:
    """Raises ValueError unless `images` is a uint8 batch [B, S, S, 3] (square, any size S)."""
    shape, dtype = getattr(images, "shape", None), getattr(images, "dtype", None)
    if (shape is None or len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3
            or dtype != jnp.uint8):
        raise ValueError(f"expected uint8 images of shape [B, S, S, 3] (NHWC, values 0..255, "
                         f"e.g. S = 32), got {dtype} of shape {shape}")


def crop_padding(image_size: int) -> int:
    """RandomCrop's padding at `image_size`: the recipe's 4 pixels at 32, scaled with the size
    (8 at 64, 1 at 8), so that the crop moves the image by the same fraction of it."""
    return max(1, round(CROP_PADDING * image_size / 32))


@functools.lru_cache(maxsize=None)
def _normalized_bytes(normalization: Normalization) -> np.ndarray:
    """torchvision's ToTensor + Normalize of every byte value, per channel, in float32 as torch
    computes it: [256, 3]. A table keeps the division exact: XLA turns division by a constant
    into multiplication by its rounded reciprocal, which differs in the last bit."""
    mean, std = (np.asarray(v, np.float32) for v in normalization)
    return (np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0) - mean) / std


def normalize(images, normalization: Normalization = CIFAR10_NORMALIZATION) -> jax.Array:
    """ToTensor + Normalize (the test transform): uint8 [B,S,S,3] -> float32 [B,S,S,3], with
    the tutorial's CIFAR-10 mean and std unless `normalization` gives a data set's own."""
    check_images(images)
    return jnp.asarray(_normalized_bytes(normalization))[jnp.asarray(images), jnp.arange(3)]


def sample_params(key: jax.Array, batch_size: int, image_size: int = 32) -> AugmentParams:
    """Draws the train transform's parameters independently for each of `batch_size` images
    of `image_size` (the crop's offsets run to twice its `crop_padding`)."""
    keys = jax.random.split(key, 9)
    uniform = lambda k, lo, hi: jax.random.uniform(k, (batch_size,), jnp.float32, lo, hi)
    max_offset = 2 * crop_padding(image_size)
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
# Exact float32 arithmetic. The colour steps below work on float32 arrays holding whole numbers
# 0..255 ("byte values"), which keeps every step one elementwise loop XLA can vectorise. Two
# compiler rewrites would break Pillow's rounding, and these helpers block them:
# - LLVM (XLA's CPU and GPU back ends) contracts a multiply feeding an add into one FMA, which
#   skips the product's rounding; a select between the two keeps it (optimization_barrier does
#   not survive to code generation).
# - XLA compiles a division by a constant into a multiplication by its rounded reciprocal, which
#   can be an ulp off; `_divide` corrects that ulp.

def _rounded(x):
    """x rounded to float32 here, even if a consumer could fuse it into an FMA."""
    return jnp.where(jnp.isnan(x), 0.0, x)


def _divide(x, divisor: int):
    """IEEE float32 x / divisor (correctly rounded), for x >= 0 and divisor 6 or 255.

    Starts from x * (1 / divisor), at most an ulp off, and keeps the one of it and its two
    neighbours whose residual x - divisor * q is smallest. The residual is exact: divisor * q is
    split as 4q + 2q or 256q - q, and each subtraction is of nearby floats (Sterbenz)."""
    residual = {6: lambda q: (x - 4 * q) - 2 * q, 255: lambda q: (x - 256 * q) + q}[divisor]
    best = _rounded(x * np.float32(1 / divisor))
    best_error = jnp.abs(residual(best))
    # Non-negative floats are ordered like their bit patterns: +-1 gives the neighbours (below
    # zero a NaN, whose comparison is false, so it is never picked).
    bits = jax.lax.bitcast_convert_type(best, jnp.int32)
    for step in (-1, 1):
        candidate = jax.lax.bitcast_convert_type(bits + step, jnp.float32)
        error = jnp.abs(residual(candidate))
        better = error < best_error
        best, best_error = jnp.where(better, candidate, best), jnp.where(better, error, best_error)
    return best


def _floor_255x(x):
    """floor(255 * x) for float32 x >= 0, exact as when C computes `x * 255.0` in double.

    A float32 product would round to the integer just above in the many cases where the exact
    product is an integer minus a hair; 256x is exact, and so are the two comparisons."""
    a = x * 256.0
    f = jnp.floor(a - x)
    f = jnp.where(a - f < x, f - 1, f)          # estimate one too high
    return jnp.where(a - (f + 1) >= x, f + 1, f)  # estimate one too low


# ---------------------------------------------------------------------------------------------
# Colour, and how XLA:CPU runs it. XLA fuses elementwise steps into the op that consumes them
# and evaluates them once per element that op writes, reusing nothing across elements. So steps
# that mix channels (luma, HSV) work on three planes (r, g, b) of byte-valued float32, not on
# [..., 3] arrays (which would redo the mixing per channel); and each jitter step stores its
# result (`_stored`) before the next reads it: fused, k chained steps that each read all three
# channels of the previous one were recomputed up to 3^k times (1.4 s for 64 images).

def _planes(image):
    """uint8 [..., 3] -> (r, g, b), byte-valued float32 [...]."""
    x = image.astype(jnp.float32)
    return x[..., 0], x[..., 1], x[..., 2]


# A stored pixel is one int32 r + 256 g + 65536 b: one element per pixel, so a consumer that
# writes it computes the pixel once (rotation's gather included), not once per channel.

def _pack(rgb):
    r, g, b = (c.astype(jnp.int32) for c in rgb)
    return r | (g << 8) | (b << 16)


def _unpack(packed):
    """Packed int32 pixels [...] -> (r, g, b) int32 [...]."""
    return packed & 255, (packed >> 8) & 255, packed >> 16


def _materialize(x):
    """x, computed into memory once: a performance device only (the values are x's).

    XLA fuses elementwise work into its consumers but never fuses a reduction into them, so a
    max over (x, lowest value) stores x; XLA:CPU's own loop computes it, fused with x's producer,
    for integers (float reductions go to a separate YNNPACK pass). An optimization_barrier does
    not do this: XLA:CPU removes it before fusing."""
    dtype = jnp.dtype(x.dtype)
    lowest = jnp.finfo(dtype).min if jnp.issubdtype(dtype, jnp.floating) else jnp.iinfo(dtype).min
    return jnp.max(jnp.stack([x, jnp.full_like(x, lowest)]), axis=0)


def _stored(rgb):
    """The planes, computed once per pixel into memory."""
    return tuple(c.astype(jnp.float32) for c in _unpack(_materialize(_pack(rgb))))


def _image(rgb):
    """(r, g, b) -> uint8 [..., 3], each pixel computed once (stored packed, then split)."""
    return jnp.stack(_unpack(_materialize(_pack(rgb))), axis=-1).astype(jnp.uint8)


def _blend(degenerate, rgb, factor):
    """Image.blend (libImaging/Blend.c): d + factor * (x - d) in float32, clipped, truncated.

    `degenerate` is one value or plane for all three channels. Blend.c rounds the product before
    the sum (hence `_rounded`). With factor 1 it returns x exactly, whatever d: the jitter uses
    that to leave a slot idle."""
    return tuple(jnp.floor(jnp.clip(degenerate + _rounded(factor * (x - degenerate)), 0.0, 255.0))
                 for x in rgb)


def _luma(rgb):
    """Image.convert('L') (libImaging/Convert.c): ITU-R 601-2 luma in 16-bit fixed point.

    Every partial sum is a whole number below 2^24, so float32 holds it exactly."""
    r, g, b = rgb
    return jnp.floor((r * 19595.0 + g * 38470.0 + b * 7471.0 + 0x8000) * np.float32(2.0 ** -16))


def _mean_luma(rgb):
    """ImageEnhance.Contrast's grey level int(mean(L) + 0.5) of one image."""
    luma = _luma(rgb).astype(jnp.int32)  # an integer sum: XLA:CPU reduces int32 faster than f32
    n = luma.size
    return ((2 * jnp.sum(luma) + n) // (2 * n)).astype(jnp.float32)  # int(sum / n + 0.5)


def _hsv_from_rgb(r, g, b):
    """Image.convert('HSV') (rgb2hsv_row in libImaging/Convert.c), bit-exact: byte-valued h, s, v.

    Pillow computes in float with a few steps in double; each step here is a single float32
    rounding of the same exact value, or, for the one double sum that float32 cannot round
    once (red maximum, green minimum), the same rounding done in integers."""
    maxc = jnp.maximum(jnp.maximum(r, g), b)
    minc = jnp.minimum(jnp.minimum(r, g), b)
    grey = maxc == minc
    chroma = jnp.where(grey, 1.0, maxc - minc)
    s = chroma / jnp.maximum(maxc, 1.0)
    # Pillow's rc, gc, bc = (maxc - c) / chroma are 0 for the maximum, 1 for the minimum, and m
    # for the middle channel; its h = bc - gc | 2.0 + rc - bc | 4.0 + gc - rc (the last two in
    # double, then rounded to float) is therefore one rounding of one of these:
    m = (maxc - (r + g + b - maxc - minc)) / chroma
    h = jnp.where(r == maxc, jnp.where(b == minc, 1 - m, m - 1),
                  jnp.where(g == maxc, jnp.where(b == minc, 1 + m, 3 - m),
                            jnp.where(r == minc, 3 + m, 5 - m)))
    # Then h = (float) fmod(h / 6.0 + 1.0, 1.0); uh = (int)(h * 255.0). For h >= 0 that float
    # is h / 6 correctly rounded. For h < 0, h is a multiple of 2^-24 in [-1, 0), and the float
    # is round_half_even(n / 6) * 2^-24 with n = 6 * 2^24 + h * 2^24, done here in integers.
    n = (6 << 24) - (-h * (1 << 24)).astype(jnp.int32)
    q, rem = jax.lax.div(n, 6), jax.lax.rem(n, 6)
    q = q + ((rem > 3) | ((rem == 3) & (q % 2 == 1))).astype(jnp.int32)
    fraction = jnp.where(h < 0, q.astype(jnp.float32) * np.float32(2.0 ** -24),
                         _divide(jnp.maximum(h, 0.0), 6))
    uh = jnp.where(grey, 0.0, _floor_255x(fraction))
    us = jnp.where(grey, 0.0, _floor_255x(s))
    return uh, us, maxc


def _rgb_from_hsv(h, s, v):
    """Image.convert('RGB') from HSV (hsv2rgb in libImaging/Convert.c): byte-valued r, g, b.

    Pillow rounds v * (1 - fs * f) computed in double; in float32 the result is the same for
    every one of the 2^24 (h, s, v) (tests/test_augment.py checks them all): no exact value lies
    nearer a half than the float32 error (nor on one, so round-half-even is C's round here)."""
    six_h = 6 * h
    i = jnp.floor((six_h + 0.5) * np.float32(1 / 255))  # 6h // 255, never near a rounding edge
    f = _divide(six_h - 255 * i, 255)                      # float((6h % 255) / 255.0)
    fs = _divide(s, 255)
    p = jnp.round(v * (1 - fs))
    q = jnp.round(v * (1 - fs * f))
    t = jnp.round(v * (1 - fs * (1 - f)))
    sector = jnp.where(i == 6, 0, i).astype(jnp.int32)     # i % 6 (h = 255 gives i = 6)
    pick = functools.partial(jax.lax.select_n, sector)
    # Sector:  0  1  2  3  4  5   (s == 0 needs no case of its own: then p = q = t = v)
    return (pick(v, q, p, p, t, v),
            pick(t, v, v, q, p, p),
            pick(p, p, t, v, v, q))


def _shift_hue(rgb, hue):
    """torchvision's PIL adjust_hue: to HSV, add int(hue * 255) to H modulo 256, back to RGB."""
    h, s, v = _hsv_from_rgb(*rgb)
    shift = jnp.sign(hue) * _floor_255x(jnp.abs(hue))  # int(hue * 255.0), truncated
    return _rgb_from_hsv(jnp.mod(h + shift, 256.0), s, v)


# ---------------------------------------------------------------------------------------------
# One image at a time (uint8 [S, S, 3] in, uint8 out); vmapped over the batch below.

def random_crop(image, top, left):
    """RandomCrop(32, padding=4) (at size S, padding `crop_padding(S)`): ImageOps.expand with
    zeros, then Image.crop at (left, top)."""
    p = crop_padding(image.shape[0])
    padded = jnp.pad(image, ((p, p), (p, p), (0, 0)))
    return jax.lax.dynamic_slice(padded, (top, left, 0), image.shape)


def horizontal_flip(image, flip):
    """RandomHorizontalFlip: Image.transpose(FLIP_LEFT_RIGHT) when `flip`."""
    return jnp.where(flip, image[:, ::-1], image)


def adjust_brightness(image, factor):
    """ImageEnhance.Brightness: blend with black."""
    return _image(_blend(0.0, _planes(image), factor))


def adjust_contrast(image, factor):
    """ImageEnhance.Contrast: blend with the grey level int(mean(L) + 0.5) of the whole image."""
    rgb = _planes(image)
    return _image(_blend(_mean_luma(rgb), rgb, factor))


def adjust_saturation(image, factor):
    """ImageEnhance.Color: blend with the image's own L conversion."""
    rgb = _planes(image)
    return _image(_blend(_luma(rgb), rgb, factor))


def adjust_hue(image, hue):
    """torchvision's PIL adjust_hue: to HSV, add int(hue * 255) to H modulo 256, back to RGB."""
    return _image(_shift_hue(_planes(image), hue))


def _color_jitter(rgb, order, brightness, contrast, saturation, hue):
    """ColorJitter on planes, written for vmap, where a switch would compute every branch: the
    costly hue shift runs once, and three blend slots run before it and three after. A slot
    blends with the reference (black, mean grey or luma) and factor of the adjustment at its
    position; an idle slot blends with factor 1, which changes nothing. Every step's result is
    stored (`_stored`) before the next reads it."""
    hue_position = jnp.argmax(order == HUE_ID)

    def slot(rgb, position, active):
        op = order[position]
        factor = jax.lax.select_n(jnp.where(active, op, HUE_ID),
                                  brightness, contrast, saturation, jnp.float32(1))
        reference = jax.lax.select_n(jnp.minimum(op, SATURATION_ID), jnp.zeros_like(rgb[0]),
                                     jnp.broadcast_to(_mean_luma(rgb), rgb[0].shape), _luma(rgb))
        return _stored(_blend(reference, rgb, factor))

    for position in (0, 1, 2):  # position 3 is never before the hue
        rgb = slot(rgb, position, position < hue_position)
    rgb = _stored(_shift_hue(rgb, hue))
    for position in (1, 2, 3):  # position 0 is never after it
        rgb = slot(rgb, position, position > hue_position)
    return rgb


def color_jitter(image, order, brightness, contrast, saturation, hue):
    """ColorJitter(0.2, 0.2, 0.2, 0.1): the four adjustments in the per-image `order`."""
    return _image(_color_jitter(_planes(image), order, brightness, contrast, saturation, hue))


def _rotation_matrix(angle, height, width):
    """Image.rotate(angle, NEAREST)'s inverse affine map in 16.16 fixed point: int32 [6].

    For images this small Pillow runs the inverse map in fixed point (affine_fixed in
    libImaging/Geometry.c): output pixel (x, y) reads input pixel ((A2 + y*A1 + x*A0) >> 16,
    (A5 + y*A4 + x*A3) >> 16), or keeps the zero fill. The integer part is exact here; only the
    six coefficients come from float32 instead of double, and may land one unit (2^-16 pixel)
    off, which moves a source pixel only at a boundary that close."""
    theta = -jnp.deg2rad(angle)  # Image.rotate inverts: cos, sin of -angle
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    # Pillow's double matrix (a0, a1, a2, a3, a4, a5) = (cos, sin, cx - cx*cos - cy*sin,
    # -sin, cos, cy + cx*sin - cy*cos), then FIX(v) = floor(v * 65536 + 0.5), with the offset
    # of the pixel centre folded into the translation: a2 + (a0 + a1) / 2, a5 + (a3 + a4) / 2.
    fix = lambda v: jnp.floor(v * 65536.0 + 0.5).astype(jnp.int32)
    cx, cy = width / 2, height / 2
    return jnp.stack([fix(cos), fix(sin), fix(cx - (cx - 0.5) * cos - (cy - 0.5) * sin),
                      fix(-sin), fix(cos), fix(cy + (cx - 0.5) * sin - (cy - 0.5) * cos)])


def _rotation_source(matrix, height, width):
    """For each output pixel [height, width]: the flat index of the input pixel it reads, and
    whether that lies inside the image (else it keeps the zero fill)."""
    a0, a1, a2, a3, a4, a5 = (matrix[k] for k in range(6))
    ys, xs = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
    src_x = (a2 + ys * a1 + xs * a0) >> 16
    src_y = (a5 + ys * a4 + xs * a3) >> 16
    inside = (src_x >= 0) & (src_x < width) & (src_y >= 0) & (src_y < height)
    return jnp.clip(src_y, 0, height - 1) * width + jnp.clip(src_x, 0, width - 1), inside


def rotate(image, angle):
    """RandomRotation(15): Image.rotate(angle, NEAREST, fillcolor=0) about the centre (w/2, h/2);
    see `_rotation_matrix`."""
    height, width, channels = image.shape
    source, inside = _rotation_source(_rotation_matrix(angle, height, width), height, width)
    pixels = image.reshape(height * width, channels)[source]
    return jnp.where(inside[..., None], pixels, jnp.zeros_like(pixels))


def _transform_one(params, image):
    """Crop, flip, jitter, rotate one uint8 image; returns packed int32 pixels [S, S]."""
    image = random_crop(image, params.crop_top, params.crop_left)
    image = horizontal_flip(image, params.flip)
    rgb = _color_jitter(_planes(image), params.order, params.brightness, params.contrast,
                        params.saturation, params.hue)
    packed = _pack(rgb)  # stored by the last jitter step
    height, width = packed.shape
    # Stored, so that the cos and sin are not recomputed for every pixel that uses them.
    matrix = _materialize(_rotation_matrix(params.angle, height, width))
    source, inside = _rotation_source(matrix, height, width)
    # Stored packed: the split into channels then reads memory instead of gathering 3 times.
    return _materialize(jnp.where(inside, packed.reshape(-1)[source], 0))


def apply_params(params: AugmentParams, images) -> jax.Array:
    """The train transform's geometry and colour with given parameters: uint8 in, uint8 out."""
    check_images(images)
    packed = jax.vmap(_transform_one)(params, jnp.asarray(images))
    return jnp.stack(_unpack(packed), axis=-1).astype(jnp.uint8)


def augment(key: jax.Array, images,
            normalization: Normalization = CIFAR10_NORMALIZATION) -> jax.Array:
    """The full train transform with per-image randomness: uint8 [B,S,S,3] -> float32
    normalised [B,S,S,3]. Pure and jit-able (trace-time shape checks only)."""
    check_images(images)
    params = sample_params(key, images.shape[0], images.shape[1])
    return normalize(apply_params(params, images), normalization)
