"""Your own images as a data set: a folder per class, as torchvision's ImageFolder and timm's
`--data-dir` read them, and the one way an image file becomes the models' input.

    PATH/train/<class>/*            the training images, one folder per class
    PATH/test/<class>/*             the test split (or val/, or validation/); without one, a
                                    seeded, stratified HOLDOUT_FRACTION of train/ is held out

Every file in a class folder is read with Pillow (PNG, JPEG, BMP, WebP, TIFF, ...; grey, RGBA,
palette and 16-bit images alike arrive as 8-bit RGB: `load_image`), resized once to the image
size, and the result is cached next to the data as one uint8 array file, keyed by the size and
a fingerprint of the file list (paths, sizes, modification times): a second run reads that file
and decodes nothing. A file that cannot be read is an error that lists every such file, unless
`skip_unreadable`, which leaves them out and says how many. Hidden files (.name) are skipped.
"""
import concurrent.futures
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from cbam_jax.data import IMAGE_SHAPE, CorruptDataError, Dataset, Normalization

TRAIN_SPLIT = "train"
TEST_SPLITS = ("test", "val", "validation")  # the first one present is the test split
HOLDOUT_FRACTION = 0.2  # of each class of train/, when there is no test split
HOLDOUT_SEED = 0
CACHE_PREFIX = ".cbam_jax_cache"
# What `cbam-predict` looks for in a folder of images (a data set's class folders are read whole).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class UnreadableImagesError(CorruptDataError):
    """Files of a folder data set that are not images Pillow can read; the message lists all."""


# --- one image -------------------------------------------------------------------------------

def load_image(path, image_size: int = IMAGE_SHAPE[0]) -> np.ndarray:
    """An image file as the model's input, uint8 [S, S, 3] (S = `image_size`).

    Pillow reads it (PNG, JPEG, BMP, WebP, ...), turns it upright by its EXIF orientation,
    converts it to 8-bit RGB (`_to_rgb`: grey is copied to three channels, 16-bit values are
    scaled to 8 bits, transparent pixels are laid over white) and resizes it to SxS with its
    bilinear filter, ignoring the aspect ratio; shrinking, that filter is antialiased (each
    pixel averages its whole footprint). The test transform (`normalize`) is applied later, as
    for the data sets' images. ValueError names a file that is not a readable image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError  # the train extra (matplotlib's)

    try:
        with Image.open(path) as image:
            image = _to_rgb(ImageOps.exif_transpose(image), path)
            return np.asarray(image.resize((image_size, image_size), Image.Resampling.BILINEAR),
                              np.uint8)
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file that Pillow can read (expected PNG, JPEG, "
                         f"BMP or WebP)") from None
    except (OSError, Image.DecompressionBombError) as e:  # missing, unreadable, truncated
        raise ValueError(f"{path}: cannot be read: {e}") from None


# Pillow's modes of one integer channel wider than 8 bits: 16-bit grey (PNG, TIFF) and 32-bit
# integers ('I', which older Pillows and some TIFFs use for 16-bit grey).
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WHITE = (255, 255, 255, 255)


def _to_rgb(image, path="image"):
    """A Pillow image as 8-bit RGB, the way it looks: the input `load_image` resizes.

    Pillow's own `convert("RGB")` clips 16-bit grey to 0..255 (a full-range gradient turns
    almost white), so 16-bit grey is scaled instead: its high byte, v // 256, as Pillow reads
    16-bit colour PNGs (so a 16-bit picture gives the same input in grey as in RGB); 32-bit
    integer grey ('I') is read as 16-bit and refused outside 0..65535. Transparency (an alpha
    channel, or a palette entry or grey value marked transparent) is laid over white, as a
    viewer on a white page shows it, instead of revealing whatever colour the transparent
    pixels hold. Floating-point images ('F') have no fixed range and are refused. ValueError
    names `path`.
    """
    from PIL import Image

    if image.mode in _WIDE_GREY_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{path}: a 32-bit integer image with values from {values.min()} "
                             f"to {values.max()}; expected 8-bit or 16-bit (0..65535) images")
        grey = Image.fromarray((values >> 8).astype(np.uint8))
        key = image.info.get("transparency")  # a 16-bit grey PNG's transparent value
        if isinstance(key, int):
            grey.putalpha(Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8)))
        image = grey
    elif image.mode == "F":
        raise ValueError(f"{path}: a floating-point image (Pillow mode F) has no fixed range; "
                         f"expected an 8-bit or 16-bit image")
    try:
        if image.has_transparency_data:
            image = Image.alpha_composite(Image.new("RGBA", image.size, _WHITE),
                                          image.convert("RGBA"))
        return image.convert("RGB")
    except ValueError as e:  # a mode Pillow cannot convert, e.g. premultiplied 'La'
        raise ValueError(f"{path}: cannot be converted to RGB ({e})") from None


# --- the folder ------------------------------------------------------------------------------

def _files(folder: Path) -> list[Path]:
    """The non-hidden files under `folder`, in name order."""
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _class_folders(split: Path) -> list[str]:
    return sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_files(root) -> tuple[tuple[str, ...], dict[str, list[tuple[Path, int]]], str | None]:
    """(class names, {split: [(file, label)]}, the test split's folder name or None) of a
    folder data set; CorruptDataError says what is missing."""
    root = Path(root)
    train = root / TRAIN_SPLIT
    if not train.is_dir():
        raise CorruptDataError(f"{root}: expected a folder {TRAIN_SPLIT}/ with one folder of "
                               f"images per class ({TRAIN_SPLIT}/<class>/*), and optionally "
                               f"{' or '.join(s + '/' for s in TEST_SPLITS)} alike")
    classes = tuple(_class_folders(train))
    if len(classes) < 2:
        raise CorruptDataError(f"{train}: expected a folder per class, at least 2, found "
                               f"{len(classes)}")
    test_name = next((s for s in TEST_SPLITS if (root / s).is_dir()), None)
    splits = {TRAIN_SPLIT: train, **({test_name: root / test_name} if test_name else {})}
    files = {}
    for name, folder in splits.items():
        unknown = sorted(set(_class_folders(folder)) - set(classes))
        if unknown:
            raise CorruptDataError(f"{folder}: classes {', '.join(unknown)} have no folder in "
                                   f"{train}")
        files[name] = [(path, label) for label, c in enumerate(classes)
                       if (folder / c).is_dir() for path in _files(folder / c)]
    empty = [c for label, c in enumerate(classes)
             if not any(y == label for _, y in files[TRAIN_SPLIT])]
    if empty:
        raise CorruptDataError(f"{train}: no files in the class folder(s) {', '.join(empty)}")
    return classes, files, test_name


def fingerprint(root, files: dict, image_size: int) -> str:
    """A digest of the image size and every file's path (relative to `root`), label, size and
    modification time: a file added, removed, replaced or touched changes it."""
    entries = []
    for split, listed in sorted(files.items()):
        for path, label in listed:
            stat = path.stat()
            entries.append([split, str(path.relative_to(root)), label, stat.st_size,
                            stat.st_mtime_ns])
    text = json.dumps({"image_size": image_size, "files": entries})
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _decode_all(paths: list[Path], image_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 [len(paths), S, S, 3] (zeros where unreadable), whether each file could be read,
    and one error per unreadable file. Threads: Pillow releases the GIL while it decodes."""
    def one(path):
        try:
            return load_image(path, image_size), None
        except ValueError as e:
            return None, str(e)

    images = np.zeros((len(paths), image_size, image_size, 3), np.uint8)
    readable, errors = np.ones(len(paths), bool), []
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for i, (image, error) in enumerate(pool.map(one, paths)):
            if error is None:
                images[i] = image
            else:
                readable[i] = False
                errors.append(error)
    return images, readable, errors


def _read_cache(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as cached:
            return {name: cached[name] for name in cached.files}
    except (OSError, ValueError, KeyError):  # absent, or cut short: decode again
        return None


def _write_cache(path: Path, arrays: dict, log) -> None:
    """Writes the cache whole or not at all (a temporary file, then a rename); a folder that
    cannot be written is said, and the run goes on without a cache."""
    tmp = None
    try:
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
        with os.fdopen(handle, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        log(f"cached the decoded images in {path}")
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        log(f"cannot write a cache in {path.parent} ({e.strerror or e}): going on without one; "
            f"the next run decodes the images again")


def _decoded(root: Path, files: dict, image_size: int, log) -> dict:
    """Every listed file decoded at `image_size`, from the cache when its fingerprint matches:
    {'images', 'labels', 'splits' (the index of each row's split), 'readable', 'unreadable'
    (the errors)}."""
    order = sorted(files)
    cache = root / f"{CACHE_PREFIX}_{image_size}px_{fingerprint(root, files, image_size)}.npz"
    cached = _read_cache(cache)
    if cached is not None:
        log(f"read {len(cached['labels'])} decoded images from the cache {cache}")
        return cached
    listed = [(path, label, order.index(split)) for split in order
              for path, label in files[split]]
    log(f"decoding {len(listed)} images in {root} at {image_size}x{image_size}")
    images, readable, errors = _decode_all([p for p, _, _ in listed], image_size)
    arrays = {"images": images, "labels": np.asarray([y for _, y, _ in listed], np.int32),
              "splits": np.asarray([s for _, _, s in listed], np.int8), "readable": readable,
              "unreadable": np.asarray(errors, dtype=str)}
    _write_cache(cache, arrays, log)
    return arrays


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A boolean per row: held out for testing. Each class with at least 2 images gives
    round(fraction * its count) of them, at least 1 (and keeps at least 1), drawn with `seed`."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if len(rows) < 2:
            continue
        count = min(max(1, round(fraction * len(rows))), len(rows) - 1)
        held[rng.permutation(rows)[:count]] = True
    return held


def normalization_of(images: np.ndarray) -> Normalization:
    """Per-channel mean and std of uint8 images' values in [0, 1] (what Normalize takes). A
    channel that never varies gets std 1/255, so that normalising it divides by no zero."""
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1 / 255)
    return Normalization(tuple(round(float(v), 6) for v in mean),
                         tuple(round(float(v), 6) for v in std))


def load_folder(root, image_size: int = IMAGE_SHAPE[0], *, skip_unreadable: bool = False,
                log=print, holdout: float = HOLDOUT_FRACTION, seed: int = HOLDOUT_SEED) -> Dataset:
    """The folder data set in `root` at `image_size` (see the module docstring), normalised by
    its training images' mean and std. UnreadableImagesError lists every file Pillow cannot
    read, unless `skip_unreadable` (then they are left out, and counted through `log`)."""
    root = Path(root)
    classes, files, test_name = list_files(root)
    arrays = _decoded(root, files, image_size, log)
    errors = [str(e) for e in arrays["unreadable"]]
    if errors and not skip_unreadable:
        raise UnreadableImagesError(
            f"{len(errors)} file(s) in {root} cannot be read as images:\n  "
            + "\n  ".join(errors)
            + "\nRemove or fix them, or pass --skip-unreadable to train without them.")
    keep = arrays["readable"]
    if errors:
        log(f"skipped {len(errors)} unreadable file(s) (--skip-unreadable)")
    images, labels, splits = arrays["images"][keep], arrays["labels"][keep], arrays["splits"][keep]
    order = sorted(files)
    is_train = splits == order.index(TRAIN_SPLIT)
    if test_name is not None:
        is_test, split_note = ~is_train, f"test split: {test_name}/"
    else:
        is_test = stratified_holdout(labels, holdout, seed)
        is_train = ~is_test
        split_note = (f"no {'/, '.join(TEST_SPLITS)}/ folder: held out {holdout:.0%} of each "
                      f"class of {TRAIN_SPLIT}/ as the test split (seed {seed})")
    if not is_train.any() or not is_test.any():
        raise CorruptDataError(f"{root}: the train and test splits each need at least one "
                               f"readable image")
    log(f"folder data set: {len(classes)} classes ({', '.join(classes)}); {split_note}")
    train_images = images[is_train]
    return Dataset(name="folder", source=f"{root.absolute()} at {image_size}x{image_size}",
                   train_images=train_images, train_labels=labels[is_train],
                   test_images=images[is_test], test_labels=labels[is_test],
                   class_names=classes, normalization=normalization_of(train_images),
                   skip_unreadable=skip_unreadable)
