"""The JAX train/test transforms against the Pillow operations torchvision's Pillow backend calls,
with identical parameters, on colourful real-looking images; parameter distributions; bad input.

Tolerances. Crop, flip, brightness, contrast, saturation and hue reproduce Pillow's arithmetic
exactly, so they must match bit for bit. Rotation uses Pillow's 16.16 fixed-point mapping, but
its six coefficients come from float32 cos/sin instead of double, so a coefficient may be one
unit (2^-16 pixel) off and move a source pixel when its coordinate is that close to a pixel
edge: measured 1.0e-5 of pixels over 512 images; allowed 2e-4.
HSV conversions are checked both ways on all 2^24 byte triples (Pillow's own conversion of a
4096 x 4096 image is the reference).
Runtime: about 40 s on 2 CPU cores, ~9 s of it the two exhaustive HSV
checks, most of the rest compiling the vmapped transforms once each."""
import functools
import itertools

import jax
import numpy as np
import pytest
from PIL import Image

from cbam_jax import augment
from cbam_jax.data import load_digits
from parity import pillow_transforms as pillow

ROTATION_TOLERANCE = 2e-4  # fraction of pixels that may differ; see the module docstring
_apply_params = jax.jit(augment.apply_params)  # compiled once, shared by the chain tests


@pytest.fixture(scope="module")
def images():
    """96 uint8 images: smooth random colour fields with noise, and digits in random colours."""
    rng = np.random.default_rng(0)
    smooth = []
    for _ in range(48):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(small).resize((32, 32), Image.Resampling.BILINEAR))
        smooth.append(np.clip(field.astype(int) + rng.integers(-12, 13, field.shape), 0, 255))
    digits = load_digits().train_images[:48, :, :, :1].astype(np.float64) / 255.0
    background = rng.integers(0, 256, (48, 1, 1, 3))
    ink = rng.integers(0, 256, (48, 1, 1, 3))
    tinted = np.round(background * (1 - digits) + ink * digits)
    return np.concatenate([np.stack(smooth), tinted]).astype(np.uint8)


@pytest.fixture(scope="module")
def params(images):
    return augment.sample_params(jax.random.key(1), len(images))


def _compare(ours, theirs):
    """(max abs diff, fraction of pixel channels off by more than 1/255, fraction off at all)."""
    diff = np.abs(np.asarray(ours).astype(np.int32) - np.asarray(theirs).astype(np.int32))
    return diff.max(), np.mean(diff > 1), np.mean(diff > 0)


def _report(name, stats):
    return (f"{name}: max abs diff {stats[0]}, off by >1/255: {stats[1]:.2e}, "
            f"off at all: {stats[2]:.2e}")


# (JAX op, the per-image arguments from AugmentParams, the Pillow op name)
OPS = {
    "random_crop": (augment.random_crop, lambda p: (p.crop_top, p.crop_left)),
    "horizontal_flip": (augment.horizontal_flip, lambda p: (p.flip,)),
    "adjust_brightness": (augment.adjust_brightness, lambda p: (p.brightness,)),
    "adjust_contrast": (augment.adjust_contrast, lambda p: (p.contrast,)),
    "adjust_saturation": (augment.adjust_saturation, lambda p: (p.saturation,)),
    "adjust_hue": (augment.adjust_hue, lambda p: (p.hue,)),
}


@pytest.mark.parametrize("name", list(OPS))
def test_colour_and_geometry_ops_match_pillow_bit_for_bit(name, images, params):
    op, args = OPS[name]
    ours = jax.jit(jax.vmap(op))(images, *args(params))
    theirs = np.stack([pillow.OPS[name](im, *args(p)) for im, p in
                       zip(images, pillow.unbatch(params))])
    stats = _compare(ours, theirs)
    assert stats[0] == 0, _report(name, stats)


def test_rotation_matches_pillow_within_fixed_point_tolerance(images, params):
    angles = np.asarray(params.angle)
    ours = jax.jit(jax.vmap(augment.rotate))(images, angles)
    theirs = np.stack([pillow.OPS["rotate"](im, float(a)) for im, a in zip(images, angles)])
    stats = _compare(ours, theirs)
    assert stats[2] <= ROTATION_TOLERANCE, _report("rotate", stats)
    # The zero fill: corners rotated in from outside are black in both.
    assert (np.asarray(ours)[np.abs(angles) > 5][:, 0, 0] == 0).all()


def test_rotation_by_exact_quarter_turns_and_zero_is_a_permutation():
    image = np.arange(32 * 32 * 3, dtype=np.int64).reshape(32, 32, 3).astype(np.uint8)
    np.testing.assert_array_equal(augment.rotate(image, 0.0), image)
    theirs = pillow.OPS["rotate"](image, 90.0)
    np.testing.assert_array_equal(augment.rotate(image, 90.0), theirs)
    np.testing.assert_array_equal(theirs, np.rot90(image))


@pytest.fixture(scope="module")
def every_colour():
    """All 2^24 byte triples as one 4096 x 4096 image."""
    v = np.arange(256, dtype=np.uint8)
    return np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(4096, 4096, 3)


def _planes_to_bytes(planes):
    return np.stack([np.asarray(c) for c in planes], -1).astype(np.uint8)


def test_rgb_to_hsv_is_bit_exact_for_every_colour(every_colour):
    """Pillow's RGB->HSV in float and double, over all 2^24 colours."""
    to_hsv = jax.jit(lambda x: augment._hsv_from_rgb(*augment._planes(x)))
    ours = _planes_to_bytes(to_hsv(every_colour))
    pil_hsv = np.asarray(Image.fromarray(every_colour, "RGB").convert("HSV"))
    assert _compare(ours, pil_hsv)[2] == 0, _report("rgb->hsv", _compare(ours, pil_hsv))


def test_hsv_to_rgb_is_bit_exact_for_every_hsv_triple(every_colour):
    """Pillow's HSV->RGB, whose rounding of a double product float32 must reproduce, over all
    2^24 (h, s, v): the hue shift feeds it h values that no RGB colour converts to."""
    to_rgb = jax.jit(lambda x: augment._rgb_from_hsv(*augment._planes(x)))
    ours = _planes_to_bytes(to_rgb(every_colour))
    pil_rgb = np.asarray(Image.fromarray(every_colour, "HSV").convert("RGB"))
    assert _compare(ours, pil_rgb)[2] == 0, _report("hsv->rgb", _compare(ours, pil_rgb))


def test_full_train_chain_matches_pillow(images, params):
    ours = _apply_params(params, images)
    per_image = pillow.unbatch(params)
    theirs = np.stack([pillow.apply_params(im, p) for im, p in zip(images, per_image)])
    stats = _compare(ours, theirs)
    # Only the rotation may differ (see ROTATION_TOLERANCE); every other step is exact.
    assert stats[2] <= ROTATION_TOLERANCE, _report("full chain", stats)
    # And after ToTensor + Normalize, equal bytes give equal floats.
    ours_float = np.asarray(augment.normalize(ours))
    theirs_float = np.stack([pillow.to_tensor_normalize(x) for x in theirs]).transpose(0, 2, 3, 1)
    same = np.asarray(ours) == theirs
    np.testing.assert_array_equal(ours_float[same], theirs_float[same])


def test_every_jitter_order_matches_pillow_bit_for_bit(images, params):
    """All 24 orders of the four adjustments, each on four images. At angle 0 the rotation, the
    one inexact step, is the identity in both, so the whole chain must match exactly."""
    orders = np.array(list(itertools.permutations(range(4))), np.int32)
    assert len(images) == 4 * len(orders)
    p = params._replace(order=jax.numpy.asarray(np.repeat(orders, 4, axis=0)),
                        angle=jax.numpy.zeros_like(params.angle))
    ours = _apply_params(p, images)
    theirs = np.stack([pillow.apply_params(im, p_i) for im, p_i in
                       zip(images, pillow.unbatch(p))])
    stats = _compare(ours, theirs)
    assert stats[0] == 0, _report("every jitter order", stats)


def test_jitter_order_is_honoured(images, params):
    """Brightness then contrast differs from contrast then brightness; each matches Pillow."""
    # Two copies of one image, differing only in order; the batch keeps the fixture's shapes so
    # the compiled chain of test_full_train_chain_matches_pillow is reused.
    orders = np.array([[0, 1, 2, 3], [1, 0, 2, 3]], np.int32)
    batch = np.repeat(images[:1], len(images), axis=0)
    p = params._replace(
        order=params.order.at[:2].set(orders), brightness=params.brightness.at[:2].set(1.19),
        contrast=params.contrast.at[:2].set(0.81), saturation=params.saturation.at[:2].set(1.0),
        hue=params.hue.at[:2].set(0.0), angle=params.angle.at[:2].set(0.0),
        flip=params.flip.at[:2].set(False))
    ours = np.asarray(_apply_params(p, batch))[:2]
    for i, p_i in enumerate(pillow.unbatch(p)[:2]):
        np.testing.assert_array_equal(ours[i], pillow.apply_params(batch[i], p_i))
    assert (ours[0] != ours[1]).any()


# --- The test transform and the jitted whole. --------------------------------------------------

def test_normalize_equals_totensor_and_normalize_for_every_byte():
    every_byte = np.repeat(np.arange(256, dtype=np.uint8), 12).reshape(1, 32, 32, 3)
    ours = np.asarray(augment.normalize(every_byte))[0]
    theirs = pillow.test_transform(every_byte[0]).transpose(1, 2, 0)
    np.testing.assert_array_equal(ours, theirs)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours[0, 0], -np.asarray(augment.CIFAR10_MEAN) / augment.CIFAR10_STD,
                               rtol=1e-6)


def test_augment_is_jittable_random_per_image_and_deterministic_per_key(images):
    batch = np.repeat(images[:1], 8, axis=0)  # eight copies of one image
    run = jax.jit(augment.augment)
    out = np.asarray(run(jax.random.key(0), batch))
    assert out.shape == (8, 32, 32, 3) and out.dtype == np.float32
    distinct = {out[i].tobytes() for i in range(8)}
    assert len(distinct) == 8  # each copy got its own crop/flip/jitter/angle
    np.testing.assert_array_equal(out, np.asarray(run(jax.random.key(0), batch)))
    assert (np.asarray(run(jax.random.key(1), batch)) != out).any()


def test_train_transform_of_the_pillow_side_returns_normalised_chw(images):
    out = pillow.train_transform(images[0], np.random.default_rng(0))
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    lowest = (0 - np.asarray(augment.CIFAR10_MEAN)) / np.asarray(augment.CIFAR10_STD)
    assert (out >= lowest[:, None, None] - 1e-6).all()


# --- Parameter distributions. ------------------------------------------------------------------

N = 20_000


@pytest.fixture(scope="module")
def many():
    sample = jax.jit(augment.sample_params, static_argnums=1)
    return jax.tree.map(np.asarray, sample(jax.random.key(7), N))


def _assert_uniform_range(x, lo, hi):
    assert x.min() >= lo and x.max() <= hi, (x.min(), x.max())
    width = hi - lo
    assert x.min() < lo + 0.002 * width and x.max() > hi - 0.002 * width  # the range is filled
    # Mean of N uniforms: sd = width / sqrt(12 N); allow 5 sd.
    assert abs(x.mean() - (lo + hi) / 2) < 5 * width / np.sqrt(12 * N)


def test_jitter_factors_hue_and_angle_are_uniform_in_torchvisions_ranges(many):
    for field in ("brightness", "contrast", "saturation"):
        _assert_uniform_range(getattr(many, field), 0.8, 1.2)
    _assert_uniform_range(many.hue, -0.1, 0.1)
    _assert_uniform_range(many.angle, -15.0, 15.0)
    assert many.angle.dtype == np.float32


def test_crop_offsets_cover_0_to_8_uniformly(many):
    for offsets in (many.crop_top, many.crop_left):
        counts = np.bincount(offsets, minlength=9)
        assert len(counts) == 9 and offsets.min() == 0
        expected = N / 9
        assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts
    assert abs(np.corrcoef(many.crop_top, many.crop_left)[0, 1]) < 0.05


def test_flip_rate_is_one_half(many):
    rate = many.flip.mean()
    assert abs(rate - 0.5) < 5 * np.sqrt(0.25 / N), rate


def test_jitter_order_is_a_uniform_random_permutation(many):
    assert (np.sort(many.order, axis=1) == np.arange(4)).all()
    perms, counts = np.unique(many.order, axis=0, return_counts=True)
    assert len(perms) == 24
    expected = N / 24
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts


def test_pillow_side_sampler_draws_the_same_ranges():
    rng = np.random.default_rng(0)
    draws = [pillow.sample_params(rng) for _ in range(2000)]
    assert {d.crop_top for d in draws} == set(range(9))
    assert all(sorted(d.order) == [0, 1, 2, 3] for d in draws)
    assert all(0.8 <= d.brightness <= 1.2 and -0.1 <= d.hue <= 0.1 and -15 <= d.angle <= 15
               for d in draws)
    assert 0.44 < np.mean([d.flip for d in draws]) < 0.56


# --- Bad input. ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    np.zeros((32, 32, 3), np.uint8),       # one image, no batch axis
    np.zeros((2, 3, 32, 32), np.uint8),    # NCHW
    np.zeros((2, 32, 32, 3), np.float32),  # already floats
    np.zeros((2, 28, 28, 1), np.uint8),    # MNIST-shaped
    [[1, 2, 3]],                           # not an array
])
@pytest.mark.parametrize("fn", [augment.normalize,
                                functools.partial(augment.augment, jax.random.key(0)),
                                functools.partial(augment.apply_params, None)])
def test_wrong_shape_or_dtype_is_a_clear_error(fn, bad):
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \[B, S, S, 3\]"):
        fn(bad)
