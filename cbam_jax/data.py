"""Where images come from: CIFAR-10 (tfds or the torchvision folder / tarball), sklearn's digits,
or a folder of your own images, one subfolder per class (`cbam_jax.folder`).

Every source returns the same thing, a `Dataset` of uint8 NHWC images and int32 labels in host
memory; augmentation and batching happen on the device (`cbam_jax.augment`, `cbam_jax.train`).

CIFAR-10 is looked for in this order, first hit wins:
  1. tensorflow-datasets data already prepared under `data_dir` (read with `tfds.data_source`,
     array_record, so reading needs no TensorFlow);
  2. the folder torchvision's download leaves, `<data_dir>/cifar-10-batches-py/`;
  3. torchvision's tarball `<data_dir>/cifar-10-python.tar.gz`;
  4. with `download=True`: tfds `download_and_prepare` when TensorFlow is installed, otherwise
     torchvision's own tarball from the same URL, md5-checked, then read as (2).
"""
import dataclasses
import hashlib
import http.client
import importlib.util
import io
import os
import pickle
import shutil
import socket
import tarfile
import urllib.error
import urllib.request
import zlib
from typing import NamedTuple

import numpy as np

from cbam_jax.recipe import DATASETS

# The tarball torchvision.datasets.CIFAR10 downloads, and its md5 (torchvision/datasets/cifar.py).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_TARBALL_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_META_FILE = "batches.meta"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
DIGITS_CLASSES = tuple(str(d) for d in range(10))
# Each data set's class names by label, known without loading it (a checkpoint names its set).
CLASS_NAMES = {"cifar10": CIFAR10_CLASSES, "digits": DIGITS_CLASSES}
TFDS_MANUAL_TARBALL = "cifar-10-binary.tar.gz"  # what tfds accepts in <data_dir>/downloads/manual/

DIGITS_TEST_FRACTION = 0.2  # 1,797 images -> 1,437 train / 360 test, stratified
DIGITS_SPLIT_SEED = 0
DIGITS_NUM_TRAIN, DIGITS_NUM_TEST = 1437, 360

IMAGE_SHAPE = (32, 32, 3)  # H, W, C of CIFAR-10 and digits (upsampled to it); the default size
_DOWNLOAD_TIMEOUT_S = 60

# transforms.Normalize constants of the tutorial, per RGB channel; digits use them too.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


class Normalization(NamedTuple):
    """The test transform's Normalize: per-channel mean and std of pixel values in [0, 1]."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10_NORMALIZATION = Normalization(CIFAR10_MEAN, CIFAR10_STD)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled image classification data set held in host memory."""
    name: str                 # 'cifar10', 'digits' or 'folder'
    source: str               # human-readable: where it came from (path / tfds / download)
    train_images: np.ndarray  # uint8 [N, S, S, 3] (S = 32 for CIFAR-10 and digits)
    train_labels: np.ndarray  # int32 [N]
    test_images: np.ndarray   # uint8 [M, S, S, 3]
    test_labels: np.ndarray   # int32 [M]
    class_names: tuple[str, ...]
    normalization: Normalization = CIFAR10_NORMALIZATION  # a folder's: its training images'
    skip_unreadable: bool | None = None  # a folder's: whether unreadable files were left out

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[1])

    def description(self) -> dict:
        """What a trained model needs to know of its data: recorded with the run and each
        checkpoint, read back by `cbam_jax.inference.load_checkpoint`; for a folder also
        whether unreadable files were left out, so that evaluating reads the same images."""
        return {"class_names": list(self.class_names), "image_size": self.image_size,
                "mean": list(self.normalization.mean), "std": list(self.normalization.std),
                **({} if self.skip_unreadable is None
                   else {"skip_unreadable": self.skip_unreadable})}


class DatasetUnavailableError(RuntimeError):
    """The data set could not be found, fetched or read; the message says how to supply it."""


class CorruptDataError(DatasetUnavailableError):
    """A local copy exists but cannot be read: truncated, corrupt, not in the expected format,
    or tfds data without tensorflow-datasets installed. Never replaced by a fallback."""


def how_to_supply_cifar10(data_dir: str, download: bool = True) -> str:
    """The ways to supply CIFAR-10, as printed whenever it cannot be obtained; `download` says
    whether this run was allowed to download (otherwise the advice is to allow it)."""
    d = os.path.abspath(data_dir)
    fetch = ("then run again with network access" if download
             else "then run again without --no-download")
    return (
        "Ways to supply CIFAR-10 (any one):\n"
        f"  * torchvision's folder: put cifar-10-batches-py/ (what torchvision.datasets.CIFAR10 "
        f"downloads) in {d}\n"
        f"  * torchvision's tarball: put {CIFAR10_TARBALL} (from {CIFAR10_URL}) in {d}\n"
        f"  * tensorflow-datasets: prepare cifar10 into {d} (pip install 'cbam-jax[tfds-prepare]', "
        f"{fetch}), or place {TFDS_MANUAL_TARBALL} in "
        f"{os.path.join(d, 'downloads', 'manual')} and prepare offline\n"
        + ("  * run with network access: the tarball is downloaded automatically\n" if download
           else "  * allow downloading (drop --no-download; download=True in load_dataset): "
                "the tarball is fetched automatically\n")
        + "  * or train on the offline stand-in: --dataset digits")


# ---------------------------------------------------------------------------------------------
# The torchvision pickle format.

def _numpy_reconstruct():
    # numpy moved `_reconstruct` from numpy.core to numpy._core in 2.0; take it from numpy itself.
    return np.empty(0).__reduce__()[0]


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10's batch files contain: dicts, lists, strings, ints and
    uint8 numpy arrays. Any other global (the way a malicious pickle runs code) is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refers to {module}.{name}, which CIFAR-10 batch files never contain")
        return self._ALLOWED[(module, name)]()


def _unpickle_batch(raw: bytes, where: str) -> dict:
    """Decodes one batch file (Python 2 pickles, hence latin1) into a dict with str keys."""
    try:
        # latin1 is torchvision's choice: it maps Python 2 byte strings 1:1, which numpy needs.
        obj = _CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as e:  # pickle raises many types on corrupt input
        raise CorruptDataError(
            f"{where}: not a readable CIFAR-10 batch file ({type(e).__name__}: {e}). "
            "Delete it (and the folder or tarball it came from) to fetch a fresh copy.") from None
    if not isinstance(obj, dict):
        raise CorruptDataError(f"{where}: expected a pickled dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _decode_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One data_batch_N / test_batch -> (uint8 [n, 32, 32, 3], int32 [n])."""
    batch = _unpickle_batch(raw, where)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        found = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                 else type(data).__name__)
        raise CorruptDataError(f"{where}: 'data' should be a uint8 array of shape [n, 3072], "
                               f"found {found}")
    expected = f"{where}: 'labels' should be a list of {len(data)} ints in 0..9"
    if not isinstance(labels, list) or len(labels) != len(data):
        found = (f"a list of {len(labels)}" if isinstance(labels, list)
                 else type(labels).__name__)
        raise CorruptDataError(f"{expected}, found {found}")
    bad = next((i for i, y in enumerate(labels)
                if not (isinstance(y, int) and 0 <= y < 10)), None)
    if bad is not None:
        raise CorruptDataError(f"{expected}, but label {bad} is {labels[bad]!r}")
    # Rows are channel-major (1024 R, 1024 G, 1024 B), each plane row-major.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(labels, np.int32)


def _decode_meta(raw: bytes, where: str) -> tuple[str, ...]:
    names = _unpickle_batch(raw, where).get("label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise CorruptDataError(f"{where}: 'label_names' should be a list of 10 class names")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _assemble_cifar10(read, source: str) -> Dataset:
    """Builds the Dataset from `read(filename) -> bytes` over the six batch files and the meta."""
    train = [_decode_batch(read(f), f"{source}/{f}") for f in CIFAR10_TRAIN_FILES]
    test_images, test_labels = _decode_batch(read(CIFAR10_TEST_FILE),
                                             f"{source}/{CIFAR10_TEST_FILE}")
    class_names = _decode_meta(read(CIFAR10_META_FILE), f"{source}/{CIFAR10_META_FILE}")
    return Dataset(
        name="cifar10", source=source,
        train_images=np.concatenate([x for x, _ in train]),
        train_labels=np.concatenate([y for _, y in train]),
        test_images=test_images, test_labels=test_labels, class_names=class_names)


def load_cifar10_folder(folder: str) -> Dataset:
    """Reads torchvision's `cifar-10-batches-py/` folder."""
    def read(name):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise CorruptDataError(f"{folder}: missing {name}; the folder should hold "
                                   f"{', '.join(CIFAR10_TRAIN_FILES)}, {CIFAR10_TEST_FILE} and "
                                   f"{CIFAR10_META_FILE}")
        with open(path, "rb") as f:
            return f.read()
    return _assemble_cifar10(read, folder)


def _read_tarball(path: str) -> dict[str, bytes]:
    """The batch files inside torchvision's tarball, read in memory (nothing is extracted)."""
    wanted = {f"{CIFAR10_FOLDER}/{n}": n
              for n in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE, CIFAR10_META_FILE)}
    files = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    files[wanted[member.name]] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise CorruptDataError(
            f"{path}: not a readable gzip tar archive ({type(e).__name__}: {e}); the file is "
            "truncated or corrupt. Delete it to download a fresh copy.") from None
    missing = sorted(set(wanted.values()) - set(files))
    if missing:
        raise CorruptDataError(f"{path}: archive lacks {CIFAR10_FOLDER}/{', '.join(missing)}; "
                               "is it the CIFAR-10 python version?")
    return files


def load_cifar10_tarball(path: str) -> Dataset:
    """Reads torchvision's `cifar-10-python.tar.gz` without extracting it."""
    files = _read_tarball(path)
    return _assemble_cifar10(files.__getitem__, path)


def _extract_tarball(path: str, data_dir: str) -> str:
    """Writes the batch files of a verified tarball to `<data_dir>/cifar-10-batches-py/`."""
    folder = os.path.join(data_dir, CIFAR10_FOLDER)
    os.makedirs(folder, exist_ok=True)
    for name, raw in _read_tarball(path).items():  # only known names: no path traversal
        with open(os.path.join(folder, name), "wb") as f:
            f.write(raw)
    return folder


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets.

def _tfds_prepared(data_dir: str) -> bool:
    return os.path.isdir(os.path.join(data_dir, "cifar10"))


def load_cifar10_tfds(data_dir: str) -> Dataset:
    """Reads CIFAR-10 prepared by tfds (array_record) under `data_dir`; no TensorFlow needed."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise CorruptDataError(
            f"{data_dir}/cifar10 looks like tfds data, but tensorflow-datasets is not installed "
            "(pip install 'cbam-jax[train]')") from None
    try:
        info = tfds.builder("cifar10", data_dir=data_dir).info
        splits = {}
        for split in ("train", "test"):
            src = tfds.data_source("cifar10", split=split, data_dir=data_dir, download=False)
            examples = [src[i] for i in range(len(src))]
            splits[split] = (np.stack([e["image"] for e in examples]).astype(np.uint8),
                             np.asarray([e["label"] for e in examples], np.int32))
        class_names = tuple(info.features["label"].names)
    except Exception as e:  # tfds raises assorted types for missing or partial data
        raise CorruptDataError(
            f"{os.path.join(data_dir, 'cifar10')}: cannot read tfds CIFAR-10 "
            f"({type(e).__name__}: {e}). It must be prepared with file_format='array_record'; "
            "delete the folder to prepare it again.") from None
    _check_images(splits["train"][0], "tfds cifar10 train")
    source = f"tfds array_record in {os.path.join(data_dir, 'cifar10')}"
    return Dataset(name="cifar10", source=source,
                   train_images=splits["train"][0], train_labels=splits["train"][1],
                   test_images=splits["test"][0], test_labels=splits["test"][1],
                   class_names=class_names)


def _tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _tfds_download_and_prepare(data_dir: str) -> None:
    import tensorflow_datasets as tfds
    builder = tfds.builder("cifar10", data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()


# ---------------------------------------------------------------------------------------------
# Downloading torchvision's tarball.

def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: str) -> None:
    """Streams `url` to `dest` through a temporary file, so an interrupted fetch leaves nothing.
    `dest`'s folder is made only once the server answers: an offline run leaves no empty one."""
    tmp = dest + ".part"
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        try:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def download_cifar10_tarball(data_dir: str, log=print) -> str:
    """Downloads and md5-checks torchvision's tarball into `data_dir`; returns its path."""
    path = os.path.join(data_dir, CIFAR10_TARBALL)
    log(f"downloading CIFAR-10 (163 MB) from {CIFAR10_URL} to {path}")
    try:
        _fetch(CIFAR10_URL, path)
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DatasetUnavailableError(
            f"Could not download CIFAR-10 from {CIFAR10_URL}: {reason}.\n"
            + how_to_supply_cifar10(data_dir)) from None
    digest = _md5(path)
    if digest != CIFAR10_TARBALL_MD5:
        os.remove(path)
        raise DatasetUnavailableError(
            f"Downloaded {path} has md5 {digest}, expected {CIFAR10_TARBALL_MD5}; deleted it.\n"
            + how_to_supply_cifar10(data_dir))
    return path


# ---------------------------------------------------------------------------------------------
# The public entry points.

def load_cifar10(data_dir: str = "./data", download: bool = True, log=print) -> Dataset:
    """CIFAR-10 from the first source that has it (see the module docstring); raises
    DatasetUnavailableError naming every way to supply it when none does."""
    folder = os.path.join(data_dir, CIFAR10_FOLDER)
    tarball = os.path.join(data_dir, CIFAR10_TARBALL)
    unreadable_tfds = None
    if _tfds_prepared(data_dir):
        try:
            return load_cifar10_tfds(data_dir)
        except CorruptDataError as e:  # e.g. prepared as tfrecord: another local copy may do
            log(f"skipping tfds data: {e}")
            unreadable_tfds = e
    if os.path.isdir(folder):
        return load_cifar10_folder(folder)
    if os.path.isfile(tarball):
        return load_cifar10_tarball(tarball)
    if unreadable_tfds is not None:  # the only local copy is broken: say so, fetch nothing
        raise unreadable_tfds
    if not download:
        raise DatasetUnavailableError(
            f"CIFAR-10 not found in {os.path.abspath(data_dir)} and downloading is off.\n"
            + how_to_supply_cifar10(data_dir, download=False))
    if _tensorflow_available():
        log(f"preparing CIFAR-10 with tensorflow-datasets into {data_dir}")
        try:
            _tfds_download_and_prepare(data_dir)
        except Exception as e:  # tfds wraps network failures in assorted types
            raise DatasetUnavailableError(
                f"tensorflow-datasets could not prepare CIFAR-10 ({type(e).__name__}: {e}).\n"
                + how_to_supply_cifar10(data_dir)) from None
        return load_cifar10_tfds(data_dir)
    path = download_cifar10_tarball(data_dir, log)
    dataset = load_cifar10_folder(_extract_tarball(path, data_dir))
    return dataclasses.replace(dataset, source=f"downloaded {CIFAR10_URL}, read from {folder}")


def load_digits() -> Dataset:
    """scikit-learn's 1,797 real 8x8 digits as 32x32x3 uint8 (4x nearest upsampling, grey in
    all three channels), split 1,437 train / 360 test, stratified, with a fixed seed."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split
    digits = sklearn_digits()
    pixels = digits.images.astype(np.int64)                   # [1797, 8, 8] in 0..16
    pixels = ((pixels * 255 + 8) // 16).astype(np.uint8)      # 0..16 -> 0..255, rounded
    images = np.repeat(np.repeat(pixels, 4, axis=1), 4, axis=2)
    images = np.ascontiguousarray(np.broadcast_to(images[..., None], (*images.shape, 3)))
    labels = digits.target.astype(np.int32)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=DIGITS_TEST_FRACTION, stratify=labels,
        random_state=DIGITS_SPLIT_SEED)
    return Dataset(name="digits", source="scikit-learn load_digits (bundled, offline)",
                   train_images=train_x, train_labels=train_y, test_images=test_x,
                   test_labels=test_y, class_names=DIGITS_CLASSES)


def load_dataset(name: str = "auto", data_dir: str = "./data", download: bool = True,
                 log=print, *, image_size: int = IMAGE_SHAPE[0],
                 skip_unreadable: bool = False) -> Dataset:
    """'cifar10' (raises if unavailable), 'digits', 'folder' (your images in `data_dir`, at
    `image_size`: `cbam_jax.folder.load_folder`), or 'auto': CIFAR-10 when it can be had,
    else digits, saying why. `auto` falls back only when there is no local copy and none can be
    fetched: a local copy that cannot be read raises CorruptDataError, as 'cifar10' does.
    The chosen source is printed through `log`."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name != "folder" and image_size != IMAGE_SHAPE[0]:
        raise ValueError(f"--image-size {image_size}: {name} images are "
                         f"{IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}; other sizes are for --dataset "
                         f"folder")
    if name == "folder":
        from cbam_jax.folder import load_folder
        dataset = load_folder(data_dir, image_size, skip_unreadable=skip_unreadable, log=log)
    elif name == "digits":
        dataset = load_digits()
    elif name == "cifar10":
        dataset = load_cifar10(data_dir, download, log)
    else:
        try:
            dataset = load_cifar10(data_dir, download, log)
        except CorruptDataError:
            raise  # the user's own CIFAR-10 is broken: digits would hide that
        except DatasetUnavailableError as e:
            log(f"CIFAR-10 is unavailable, so this run uses scikit-learn's digits instead.\n{e}")
            dataset = load_digits()
    log(f"dataset: {dataset.name} ({len(dataset.train_images)} train / "
        f"{len(dataset.test_images)} test) from {dataset.source}")
    return dataset


def _check_images(images: np.ndarray, where: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise CorruptDataError(f"{where}: expected uint8 images [N, 32, 32, 3], "
                               f"found {images.dtype} {images.shape}")
