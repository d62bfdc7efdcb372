"""Data sources: torchvision's pickle folder and tarball (written here in their on-disk format),
tfds through `mock_data`, downloads that fail or succeed without the network, digits, bad files.
Runtime: about 5 s (sklearn and tfds imports; the files hold a few images each)."""
import hashlib
import io
import os
import pickle
import pickletools
import socket
import tarfile

import numpy as np
import pytest

from cbam_jax import data

TRAIN_PER_BATCH, NUM_TEST = 3, 4


class _Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the CIFAR-10 batches (protocol 2): byte and text
    strings both as BINSTRING, numpy's reconstructor under its numpy 1 name."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        raw = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + len(raw).to_bytes(4, "little") + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str

    def save_global(self, obj, name=None):
        if obj is np.empty(0).__reduce__()[0]:  # numpy 2 names it numpy._core.multiarray
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def _py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _batch(images_nhwc: np.ndarray, labels, label: str) -> bytes:
    rows = images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1)  # channel-major rows
    return _py2_pickle({"batch_label": label, "labels": [int(y) for y in labels],
                        "data": np.ascontiguousarray(rows),
                        "filenames": [f"img_{i}.png" for i in range(len(labels))]})


def _cifar_files(seed=0):
    """The six batch files and batches.meta, with a few random images each; and the truth."""
    rng = np.random.default_rng(seed)
    n_train = 5 * TRAIN_PER_BATCH
    train_x = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
    train_y = rng.integers(0, 10, n_train)
    test_x = rng.integers(0, 256, (NUM_TEST, 32, 32, 3), dtype=np.uint8)
    test_y = rng.integers(0, 10, NUM_TEST)
    files = {}
    for i in range(5):
        s = slice(i * TRAIN_PER_BATCH, (i + 1) * TRAIN_PER_BATCH)
        files[f"data_batch_{i + 1}"] = _batch(train_x[s], train_y[s],
                                              f"training batch {i + 1} of 5")
    files["test_batch"] = _batch(test_x, test_y, "testing batch 1 of 1")
    files["batches.meta"] = _py2_pickle({"num_cases_per_batch": TRAIN_PER_BATCH,
                                         "label_names": list(data.CIFAR10_CLASSES),
                                         "num_vis": 3072})
    return files, (train_x, train_y, test_x, test_y)


def _write_folder(data_dir, files):
    folder = os.path.join(data_dir, data.CIFAR10_FOLDER)
    os.makedirs(folder)
    for name, raw in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(raw)
    return folder


def _write_tarball(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in files.items():
            info = tarfile.TarInfo(f"{data.CIFAR10_FOLDER}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def _assert_matches(dataset, truth):
    train_x, train_y, test_x, test_y = truth
    assert dataset.name == "cifar10"
    assert dataset.train_images.dtype == np.uint8 and dataset.train_images.shape == (15, 32, 32, 3)
    assert dataset.test_images.dtype == np.uint8 and dataset.test_images.shape == (4, 32, 32, 3)
    assert dataset.train_labels.dtype == np.int32 and dataset.test_labels.dtype == np.int32
    np.testing.assert_array_equal(dataset.train_images, train_x)  # channel-major rows -> HWC
    np.testing.assert_array_equal(dataset.train_labels, train_y)
    np.testing.assert_array_equal(dataset.test_images, test_x)
    np.testing.assert_array_equal(dataset.test_labels, test_y)
    assert dataset.class_names == data.CIFAR10_CLASSES


def test_python2_pickle_writer_uses_the_real_files_opcodes():
    ops = {op.name for op, _, _ in pickletools.genops(_cifar_files()[0]["test_batch"])}
    assert {"SHORT_BINSTRING", "BINSTRING", "GLOBAL"} <= ops
    assert "BINUNICODE" not in ops and "SHORT_BINBYTES" not in ops


def test_torchvision_folder_is_read_exactly(tmp_path):
    files, truth = _cifar_files()
    _write_folder(tmp_path, files)
    dataset = data.load_dataset("cifar10", str(tmp_path), download=False, log=lambda s: None)
    _assert_matches(dataset, truth)
    assert dataset.source.endswith(data.CIFAR10_FOLDER)


def test_torchvision_tarball_is_read_without_extracting(tmp_path):
    files, truth = _cifar_files(seed=1)
    _write_tarball(tmp_path / data.CIFAR10_TARBALL, files)
    dataset = data.load_dataset("cifar10", str(tmp_path), download=False, log=lambda s: None)
    _assert_matches(dataset, truth)
    assert dataset.source.endswith(data.CIFAR10_TARBALL)
    assert not (tmp_path / data.CIFAR10_FOLDER).exists()


def test_tfds_array_record_source_reads_mock_data(tmp_path):
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        dataset = data.load_cifar10_tfds(str(tmp_path))
    assert dataset.train_images.shape == (6, 32, 32, 3) and dataset.train_images.dtype == np.uint8
    assert dataset.test_images.shape == (6, 32, 32, 3)
    assert dataset.train_labels.dtype == np.int32
    assert ((0 <= dataset.train_labels) & (dataset.train_labels < 10)).all()
    assert len(dataset.class_names) == 10 and "tfds" in dataset.source


def test_prepared_tfds_dir_takes_precedence_over_the_folder(tmp_path, monkeypatch):
    files, _ = _cifar_files()
    _write_folder(tmp_path, files)
    (tmp_path / "cifar10").mkdir()
    monkeypatch.setattr(data, "load_cifar10_tfds", lambda d: "tfds" if d == str(tmp_path) else None)
    assert data.load_cifar10(str(tmp_path), download=False) == "tfds"


def test_unreadable_tfds_dir_is_skipped_for_the_torchvision_folder(tmp_path):
    files, truth = _cifar_files()
    _write_folder(tmp_path, files)
    (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)  # e.g. prepared as tfrecord, or partial
    lines = []
    dataset = data.load_cifar10(str(tmp_path), download=False, log=lines.append)
    _assert_matches(dataset, truth)
    assert lines[0].startswith(f"skipping tfds data: {tmp_path / 'cifar10'}: cannot read")


# --- Bad files. ------------------------------------------------------------------------------

def _truncated_pickle_in_the_folder(data_dir):
    files, _ = _cifar_files()
    files["data_batch_3"] = files["data_batch_3"][:500]
    return os.path.join(_write_folder(data_dir, files), "data_batch_3")


def _truncated_tarball(data_dir):
    path = _write_tarball(data_dir / data.CIFAR10_TARBALL, _cifar_files()[0])
    path.write_bytes(path.read_bytes()[:1000])
    return str(path)


def _malicious_pickle_in_the_folder(data_dir):
    class Exploit:
        def __reduce__(self):
            return (os.mkdir, (str(data_dir / "pwned"),))
    files, _ = _cifar_files()
    files["test_batch"] = pickle.dumps({"data": Exploit()}, protocol=2)
    return os.path.join(_write_folder(data_dir, files), "test_batch")


def _unreadable_tfds_dir(data_dir):
    (data_dir / "cifar10" / "3.0.2").mkdir(parents=True)  # e.g. prepared as tfrecord, or partial
    return str(data_dir / "cifar10")


def test_truncated_tarball_names_the_file(tmp_path):
    path = _truncated_tarball(tmp_path)
    with pytest.raises(data.CorruptDataError, match="truncated or corrupt") as info:
        data.load_dataset("cifar10", str(tmp_path), download=False)
    assert path in str(info.value)


def test_tarball_without_the_batches_says_what_is_missing(tmp_path):
    files, _ = _cifar_files()
    del files["test_batch"]
    path = _write_tarball(tmp_path / data.CIFAR10_TARBALL, files)
    with pytest.raises(data.CorruptDataError, match="lacks cifar-10-batches-py/test_batch") as info:
        data.load_cifar10(str(tmp_path), download=False)
    assert str(path) in str(info.value)


def test_truncated_pickle_names_the_file(tmp_path):
    path = _truncated_pickle_in_the_folder(tmp_path)
    with pytest.raises(data.CorruptDataError, match="not a readable CIFAR-10 batch file") as info:
        data.load_cifar10(str(tmp_path), download=False)
    assert path in str(info.value)


def test_pickle_calling_other_code_is_refused(tmp_path):
    _malicious_pickle_in_the_folder(tmp_path)
    with pytest.raises(data.CorruptDataError, match=r"refers to posix\.mkdir"):
        data.load_cifar10(str(tmp_path), download=False)
    assert not (tmp_path / "pwned").exists()


def test_wrong_array_shape_in_a_batch_is_reported(tmp_path):
    files, _ = _cifar_files()
    files["data_batch_1"] = _py2_pickle({"labels": [1, 2], "data": np.zeros((2, 100), np.uint8)})
    _write_folder(tmp_path, files)
    with pytest.raises(data.CorruptDataError,
                       match=r"data_batch_1: 'data' should be a uint8 array of shape \[n, 3072\], "
                             r"found uint8 array of shape \(2, 100\)"):
        data.load_cifar10(str(tmp_path), download=False)


def test_labels_out_of_range_are_reported(tmp_path):
    files, _ = _cifar_files()
    files["test_batch"] = _py2_pickle({"labels": [3, 10],
                                       "data": np.zeros((2, 3072), np.uint8)})
    _write_folder(tmp_path, files)
    with pytest.raises(data.CorruptDataError,
                       match=r"test_batch: 'labels' should be a list of 2 ints in 0\.\.9, "
                             r"but label 1 is 10"):
        data.load_cifar10(str(tmp_path), download=False)


def test_folder_missing_a_batch_lists_what_it_needs(tmp_path):
    files, _ = _cifar_files()
    del files["data_batch_5"]
    _write_folder(tmp_path, files)
    with pytest.raises(data.CorruptDataError, match="missing data_batch_5"):
        data.load_cifar10(str(tmp_path), download=False)


# --- Downloads, without the network. ----------------------------------------------------------

def _closed_port_url():
    with socket.socket() as s:  # bind, read the port, close: connecting is then refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{data.CIFAR10_TARBALL}"


WAYS = ("cifar-10-batches-py/", data.CIFAR10_TARBALL, "tensorflow-datasets",
        os.path.join("downloads", "manual"), data.TFDS_MANUAL_TARBALL, "--dataset digits")


def test_failed_download_raises_a_message_naming_every_way(tmp_path, monkeypatch):
    url = _closed_port_url()
    monkeypatch.setattr(data, "CIFAR10_URL", url)
    monkeypatch.setattr(data, "_tensorflow_available", lambda: False)
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load_dataset("cifar10", str(tmp_path / "d"), download=True, log=lambda s: None)
    message = str(info.value)
    assert f"Could not download CIFAR-10 from {url}" in message
    for way in WAYS:
        assert way in message, way
    assert info.value.__suppress_context__  # no chained network traceback
    assert not (tmp_path / "d").exists()  # no partial file, not even an empty data folder


def test_failed_tfds_preparation_is_reported_the_same_way(tmp_path, monkeypatch):
    def fail(data_dir):
        raise ConnectionError("Name or service not known")
    monkeypatch.setattr(data, "_tensorflow_available", lambda: True)
    monkeypatch.setattr(data, "_tfds_download_and_prepare", fail)
    with pytest.raises(data.DatasetUnavailableError,
                       match="tensorflow-datasets could not prepare CIFAR-10") as info:
        data.load_cifar10(str(tmp_path), download=True, log=lambda s: None)
    for way in WAYS:
        assert way in str(info.value), way


def test_download_is_md5_checked_extracted_and_then_read_from_the_folder(tmp_path, monkeypatch):
    files, truth = _cifar_files(seed=2)
    served = _write_tarball(tmp_path / "served.tar.gz", files)
    monkeypatch.setattr(data, "_tensorflow_available", lambda: False)
    monkeypatch.setattr(data, "CIFAR10_TARBALL_MD5", hashlib.md5(served.read_bytes()).hexdigest())
    data_dir = str(tmp_path / "d")
    os.mkdir(data_dir)  # _fetch makes it once the server answers; this stand-in does not
    monkeypatch.setattr(data, "_fetch", lambda url, dest: os.link(served, dest))
    first = data.load_dataset("cifar10", data_dir, download=True, log=lambda s: None)
    _assert_matches(first, truth)
    assert first.source.startswith("downloaded")
    monkeypatch.setattr(data, "_fetch", None)  # a second run must not download
    second = data.load_dataset("cifar10", data_dir, download=True, log=lambda s: None)
    _assert_matches(second, truth)
    assert second.source == os.path.join(data_dir, data.CIFAR10_FOLDER)


def test_download_with_wrong_md5_is_deleted_and_reported(tmp_path, monkeypatch):
    def fetch(url, dest):
        with open(dest, "wb") as f:
            f.write(b"<html>captive portal</html>")
    monkeypatch.setattr(data, "_tensorflow_available", lambda: False)
    monkeypatch.setattr(data, "_fetch", fetch)
    with pytest.raises(data.DatasetUnavailableError,
                       match=f"expected {data.CIFAR10_TARBALL_MD5}; deleted it"):
        data.load_cifar10(str(tmp_path), download=True, log=lambda s: None)
    assert not (tmp_path / data.CIFAR10_TARBALL).exists()


def test_without_download_a_missing_dataset_says_how_to_supply_it(tmp_path):
    with pytest.raises(data.DatasetUnavailableError, match="downloading is off") as info:
        data.load_dataset("cifar10", str(tmp_path), download=False)
    for way in WAYS:
        assert way in str(info.value), way


def test_without_download_the_advice_is_to_allow_downloading(tmp_path):
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load_dataset("cifar10", str(tmp_path), download=False)
    assert "allow downloading (drop --no-download" in str(info.value)
    assert "network access" not in str(info.value)  # the network was never the problem


@pytest.mark.parametrize("break_copy", [
    _truncated_pickle_in_the_folder, _truncated_tarball, _malicious_pickle_in_the_folder,
    _unreadable_tfds_dir], ids=["folder", "tarball", "pickle", "tfds"])
def test_auto_reports_a_broken_local_copy_instead_of_training_on_digits(tmp_path, monkeypatch,
                                                                        break_copy):
    broken = break_copy(tmp_path)

    def download(*args):
        raise AssertionError("downloaded although a local copy exists")
    monkeypatch.setattr(data, "_fetch", download)
    monkeypatch.setattr(data, "_tfds_download_and_prepare", download)
    lines = []
    with pytest.raises(data.CorruptDataError) as info:
        data.load_dataset("auto", str(tmp_path), download=True, log=lines.append)
    assert broken in str(info.value)  # the message names the file
    assert not any("digits" in line for line in lines)
    assert not (tmp_path / "pwned").exists()


def test_auto_falls_back_to_digits_and_says_why(tmp_path):
    lines = []
    dataset = data.load_dataset("auto", str(tmp_path), download=False, log=lines.append)
    assert dataset.name == "digits"
    text = "\n".join(lines)
    assert "CIFAR-10 is unavailable" in text and "downloading is off" in text
    assert "dataset: digits (1437 train / 360 test) from scikit-learn" in lines[-1]


def test_auto_prefers_cifar10_when_present(tmp_path):
    files, truth = _cifar_files()
    _write_folder(tmp_path, files)
    lines = []
    dataset = data.load_dataset("auto", str(tmp_path), download=False, log=lines.append)
    _assert_matches(dataset, truth)
    assert lines == [f"dataset: cifar10 (15 train / 4 test) from {dataset.source}"]


def test_unknown_dataset_name_lists_the_choices():
    with pytest.raises(ValueError, match="expected one of auto, cifar10, digits"):
        data.load_dataset("mnist")


# --- Digits. ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits", log=lambda s: None)


def test_digits_split_sizes_dtypes_and_shapes(digits):
    assert digits.train_images.shape == (data.DIGITS_NUM_TRAIN, 32, 32, 3) == (1437, 32, 32, 3)
    assert digits.test_images.shape == (data.DIGITS_NUM_TEST, 32, 32, 3) == (360, 32, 32, 3)
    assert digits.train_images.dtype == np.uint8 and digits.train_labels.dtype == np.int32
    assert digits.class_names == tuple("0123456789")


def test_digits_split_is_stratified_and_fixed(digits):
    counts = np.bincount(digits.test_labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37, counts
    again = data.load_digits()
    np.testing.assert_array_equal(again.test_labels, digits.test_labels)
    np.testing.assert_array_equal(again.train_images, digits.train_images)


def test_digits_pixels_are_scaled_upsampled_and_grey(digits):
    from sklearn.datasets import load_digits
    x = digits.train_images
    assert x.min() == 0 and x.max() == 255
    assert (x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all()
    blocks = x[..., 0].reshape(-1, 8, 4, 8, 4)
    assert (blocks == blocks[:, :, :1, :, :1]).all()  # each source pixel became a 4x4 block
    levels = set(np.unique(blocks[:, :, 0, :, 0]))
    assert levels <= {(v * 255 + 8) // 16 for v in range(17)}
    source = {tuple(im.ravel()) for im in load_digits().images.astype(int)}
    recovered = tuple(np.round(blocks[0, :, 0, :, 0].astype(float) * 16 / 255).astype(int).ravel())
    assert recovered in source
