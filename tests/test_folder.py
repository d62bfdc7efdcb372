"""A folder of your own images as a data set (cbam_jax/folder.py), and what adapts to it: the
image size the models take, the crop's padding, the memory check before placing the data."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from cbam_jax import augment, folder, loader, registry
from cbam_jax.data import CorruptDataError, load_dataset
from cbam_jax.distributed import make_mesh
from cbam_jax.folder import UnreadableImagesError, load_folder, stratified_holdout

from conftest import CONTROL_FLOW_ONLY

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "fox")
# One image of each kind a folder holds: (file name, Pillow mode, size, format).
KINDS = [("rgb.png", "RGB", (40, 30), "PNG"), ("photo.jpg", "RGB", (64, 48), "JPEG"),
         ("old.bmp", "RGB", (20, 20), "BMP"), ("web.webp", "RGB", (33, 50), "WEBP"),
         ("grey.png", "L", (32, 32), "PNG"), ("clear.png", "RGBA", (24, 36), "PNG"),
         ("deep.png", "I;16", (30, 30), "PNG")]


def write_image(path: Path, mode: str, size, fmt: str, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode == "I;16":
        pixels = np.full((h, w), value * 257, np.uint16)
        Image.fromarray(pixels).save(path, fmt)
        return
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = np.full((h, w, channels), value, np.uint8)
    if mode == "RGBA":
        pixels[..., 3] = 255
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path, fmt)


def make_folder(root: Path, splits=("train", "test"), per_class=None, broken=()) -> Path:
    """CLASSES x KINDS images in each split (class k's pixels all 60 * k + 30, so each class
    is one grey level), plus a file of garbage at each path of `broken`."""
    for split in splits:
        for label, name in enumerate(CLASSES):
            for kind in (per_class or KINDS):
                file, mode, size, fmt = kind
                write_image(root / split / name / file, mode, size, fmt, 60 * label + 30)
    for path in broken:
        (root / path).write_bytes(b"not an image at all")
    return root


def quiet(*_):
    pass


def test_every_format_arrives_as_rgb_uint8_with_its_class(tmp_path):
    data = load_folder(make_folder(tmp_path), 16, log=quiet)
    assert data.class_names == CLASSES
    assert data.train_images.shape == (len(CLASSES) * len(KINDS), 16, 16, 3)
    assert data.train_images.dtype == np.uint8 and data.test_images.shape[0] == 21
    for images, labels in ((data.train_images, data.train_labels),
                           (data.test_images, data.test_labels)):
        for image, label in zip(images, labels):
            # Grey, RGBA, 16-bit, BMP, WebP and PNG carry their class's grey level; JPEG is
            # lossy within a level or two.
            assert np.abs(image.astype(int) - (60 * label + 30)).max() <= 2
    assert data.image_size == 16 and data.description()["class_names"] == list(CLASSES)


def test_unreadable_files_are_all_named_in_one_error_or_skipped_and_counted(tmp_path):
    broken = ("train/cat/broken.png", "test/fox/empty.jpg")
    root = make_folder(tmp_path, per_class=KINDS[:2], broken=broken)
    with pytest.raises(UnreadableImagesError) as error:
        load_folder(root, 8, log=quiet)
    message = str(error.value)
    assert message.startswith("2 file(s)") and "--skip-unreadable" in message
    assert all(str(root / path) in message for path in broken)
    lines = []
    data = load_folder(root, 8, skip_unreadable=True, log=lines.append)
    assert "skipped 2 unreadable file(s) (--skip-unreadable)" in lines
    assert len(data.train_labels) == len(data.test_labels) == len(CLASSES) * 2
    assert data.description()["skip_unreadable"] is True  # recorded with the run


def test_a_resume_reads_the_folder_as_the_run_did_and_refuses_another_way(tmp_path):
    from cbam_jax import rundir
    from cbam_jax.cli import train as script

    data = {"class_names": ["a", "b"], "image_size": 32, "mean": [0.5] * 3, "std": [0.2] * 3}
    skipping = rundir.new_record({"epochs": 1}, "folder", devices=1, data_dir="pets",
                                 data={**data, "skip_unreadable": True})
    rundir.write_record(tmp_path / "run", skipping)
    args = script.parse_args(["--resume", str(tmp_path / "run"), "--epochs", "2"])
    assert args.skip_unreadable is False
    script.take_recorded_settings(args)
    assert (args.dataset, args.skip_unreadable) == ("folder", True)  # no flag needed again
    settings = {"epochs": 2, "dataset": "folder", "devices": 1, "image_size": 32}
    rundir.check_resume(skipping, {**settings, "skip_unreadable": True}, "run")
    strict = rundir.new_record({"epochs": 1}, "folder", devices=1, data_dir="pets",
                               data={**data, "skip_unreadable": False})
    with pytest.raises(rundir.ResumeMismatchError,
                       match="--skip-unreadable on \\(recorded: off\\)"):
        rundir.check_resume(strict, {**settings, "skip_unreadable": True}, "run")
    assert "skip_unreadable" not in load_dataset("digits", log=quiet).description()


def test_a_second_run_reads_the_cache_and_decodes_nothing(tmp_path, monkeypatch):
    root = make_folder(tmp_path, per_class=KINDS[:3])
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    first = load_folder(root, 12, log=quiet)
    assert len(opened) == 18
    assert len(list(root.glob(".cbam_jax_cache_12px_*.npz"))) == 1
    opened.clear()
    lines = []
    second = load_folder(root, 12, log=lines.append)
    assert opened == [] and any("from the cache" in line for line in lines)
    np.testing.assert_array_equal(first.train_images, second.train_images)
    np.testing.assert_array_equal(first.test_labels, second.test_labels)
    assert first.normalization == second.normalization
    # Another size, or a file touched, is another fingerprint: decoded again.
    load_folder(root, 10, log=quiet)
    assert len(opened) == 18
    opened.clear()
    os.utime(root / "train/cat/rgb.png", ns=(1, 1))
    load_folder(root, 12, log=quiet)
    assert len(opened) == 18


def test_a_folder_that_cannot_be_written_goes_on_without_a_cache(tmp_path, monkeypatch):
    root = make_folder(tmp_path, per_class=KINDS[:1])

    def refuse(*_, **__):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(folder.tempfile, "mkstemp", refuse)
    lines = []
    data = load_folder(root, 8, log=lines.append)
    assert len(data.train_labels) == 3 and not list(root.glob(".cbam_jax_cache*"))
    assert any(line.startswith(f"cannot write a cache in {root} (Permission denied): going on "
                               f"without one") for line in lines)


def test_without_a_test_split_a_seeded_stratified_fraction_is_held_out(tmp_path):
    labels = np.repeat(np.arange(3, dtype=np.int32), [10, 5, 1])
    held = stratified_holdout(labels, 0.2, seed=0)
    assert [int(held[labels == k].sum()) for k in range(3)] == [2, 1, 0]
    np.testing.assert_array_equal(held, stratified_holdout(labels, 0.2, seed=0))
    assert not np.array_equal(held, stratified_holdout(labels, 0.2, seed=1))

    root = make_folder(tmp_path, splits=("train",), per_class=KINDS[:5])
    lines = []
    data = load_folder(root, 8, log=lines.append)
    assert np.bincount(data.test_labels).tolist() == [1, 1, 1]
    assert np.bincount(data.train_labels).tolist() == [4, 4, 4]
    assert any("held out 20% of each class of train/ as the test split (seed 0)" in line
               for line in lines)


def test_val_is_the_test_split_and_bad_layouts_say_what_is_expected(tmp_path):
    data = load_folder(make_folder(tmp_path / "a", splits=("train", "val"), per_class=KINDS[:1]),
                       8, log=quiet)
    assert len(data.test_labels) == 3
    with pytest.raises(CorruptDataError, match="expected a folder train/ with one folder"):
        load_folder(tmp_path / "nothing", 8, log=quiet)
    odd = make_folder(tmp_path / "b", per_class=KINDS[:1])
    write_image(odd / "test" / "owl" / "x.png", "RGB", (8, 8), "PNG", 0)
    with pytest.raises(CorruptDataError, match="classes owl have no folder in"):
        load_folder(odd, 8, log=quiet)


def test_normalisation_is_the_training_images_own(tmp_path):
    data = load_folder(make_folder(tmp_path, per_class=KINDS[:1]), 8, log=quiet)
    levels = np.asarray([30, 90, 150]) / 255  # one grey level per class, as many images each
    np.testing.assert_allclose(data.normalization.mean, [levels.mean()] * 3, atol=1e-6)
    np.testing.assert_allclose(data.normalization.std, [levels.std()] * 3, atol=1e-6)
    assert load_dataset("digits", log=quiet).normalization == augment.CIFAR10_NORMALIZATION


def test_image_size_is_only_for_folders():
    with pytest.raises(ValueError, match="other sizes are for --dataset folder"):
        load_dataset("digits", image_size=64, log=quiet)


def test_a_size_the_model_cannot_take_is_refused_naming_the_smallest():
    for name in registry.MODEL_NAMES:
        with pytest.raises(ValueError, match=f"{name} cannot take 4x4 images; the smallest "
                                             f"image size it takes is 8"):
            registry.create_model(name, 3, image_size=4)
    from cbam_jax.models import MIN_IMAGE_SIZE, CBAMCNN
    assert registry.MIN_IMAGE_SIZE["cbam_cnn"] == MIN_IMAGE_SIZE
    x = np.zeros((1, 8, 8, 3), np.float32)
    variables = jax.eval_shape(lambda: CBAMCNN(num_classes=3, image_size=8).init(
        jax.random.key(0), x))
    assert variables["params"]["fc1"]["kernel"].shape == (128, 512)  # 1 x 1 x 128 after pools
    with pytest.raises(ValueError, match="CBAMCNN cannot take 4x4 images"):
        CBAMCNN(image_size=4).init(jax.random.key(0), np.zeros((1, 4, 4, 3), np.float32))


def test_crop_padding_scales_with_the_image_size():
    assert [augment.crop_padding(s) for s in (8, 16, 32, 64, 224)] == [1, 2, 4, 8, 28]
    params = augment.sample_params(jax.random.key(0), 256, image_size=64)
    assert int(params.crop_top.max()) == 16 and int(params.crop_left.min()) == 0
    image = np.arange(64 * 64 * 3, dtype=np.uint32).reshape(64, 64, 3).astype(np.uint8)
    cropped = augment.random_crop(image, 16, 16)  # the largest offset: shifted by 8 pixels
    np.testing.assert_array_equal(cropped[:-8, :-8], image[8:, 8:])
    assert not np.asarray(cropped[-8:]).any()


def test_a_data_set_too_large_for_the_device_is_refused_with_a_size_that_fits(tmp_path):
    message = loader.fit_refusal(50_000, 64, copies=2, available=2**30)
    assert message.startswith("the data set (50000 images at 64x64) needs 1.14 GiB (2 copies: "
                              "one per device, all in the host's memory), more than the 50% of "
                              "the device's 1.00 GiB it may take; --image-size 42 would fit")
    fits = int(message.rsplit("--image-size ", 1)[1].split()[0])
    assert 2 * loader.dataset_bytes(50_000, fits) <= 2**29 < 2 * loader.dataset_bytes(
        50_000, fits + 1)
    assert loader.fit_refusal(50_000, 32, copies=1, available=2**30) is None
    data = load_folder(make_folder(tmp_path, per_class=KINDS[:1]), 8, log=quiet)
    with pytest.raises(MemoryError, match="--image-size"):
        loader.check_fits(data, make_mesh(), available=1000)
    loader.check_fits(data, make_mesh(), available=10**9)


# --- the whole way through the command lines -------------------------------------------------

def run_script(name: str, *args, cwd, optimize: bool = False) -> subprocess.CompletedProcess:
    """Each image size is a fresh compile; unless `optimize`, the run checks control flow only."""
    env = dict(os.environ, **({} if optimize else CONTROL_FLOW_ONLY))
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=900, env=env)


@pytest.mark.slow
def test_train_evaluate_predict_and_explain_a_folder(tmp_path):
    data = make_folder(tmp_path / "pets", per_class=KINDS[:4], broken=("train/dog/broken.png",))
    run = tmp_path / "run"
    common = ["--dataset", "folder", "--data-dir", data, "--epochs", 1, "--batch-size", 4,
              "--no-compile-cache", "--devices", 1]
    refused = run_script("train", *common, "--run-dir", tmp_path / "refused", cwd=tmp_path)
    assert refused.returncode == 1
    assert f"{data / 'train/dog/broken.png'}: not an image file" in refused.stderr
    trained = run_script("train", *common, "--run-dir", run, "--skip-unreadable", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "skipped 1 unreadable file(s) (--skip-unreadable)" in trained.stdout
    assert "3 classes (cat, dog, fox)" in trained.stdout

    evaluated = run_script("evaluate", run, cwd=tmp_path)  # skips as the run recorded
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert all(name in evaluated.stdout for name in CLASSES)

    out = tmp_path / "figures"
    predicted = run_script("predict", run, data / "test" / "cat", "--explain", "gradcam",
                           "--class", "fox", "--out-dir", out, cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    lines = [line for line in predicted.stdout.splitlines() if line.startswith(str(data))]
    assert len(lines) == 4 and all(any(n in line for n in CLASSES) for line in lines)
    assert len(list(out.glob("*_gradcam.png"))) == 4
    assert len(list(out.glob("*_attention.png"))) == 4


@pytest.mark.slow
def test_a_folder_run_resumes_with_its_recorded_reading_and_exports_at_its_size(tmp_path,
                                                                                capsys):
    data = make_folder(tmp_path / "pets", per_class=KINDS[:2], broken=("train/fox/broken.png",))
    run = tmp_path / "run"
    first = run_script("train", "--dataset", "folder", "--data-dir", data, "--image-size", 16,
                       "--skip-unreadable", "--epochs", 1, "--batch-size", 4,
                       "--no-compile-cache", "--devices", 1, "--run-dir", run, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    # No data flag again: the folder, its size and --skip-unreadable come from run.json.
    resumed = run_script("train", "--resume", run, "--epochs", 2, "--no-compile-cache",
                         cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout and "after epoch 1" in resumed.stdout
    assert "skipped 1 unreadable file(s) (--skip-unreadable)" in resumed.stdout
    assert "Epoch 2/2 done" in resumed.stdout and "Epoch 1/2 done" not in resumed.stdout
    assert "at 16x16" in resumed.stdout

    from cbam_jax.cli import export
    assert export.main([str(run)]) == 0
    artifact = run / "cbam_cnn_folder.stablehlo"
    exported = jax.export.deserialize(artifact.read_bytes())
    assert str(exported.in_avals[0]) == "float32[batch,16,16,3]"
    assert str(exported.out_avals[0]) == "float32[batch,3]"
    assert "against the JAX model: ok" in capsys.readouterr().out
    assert export.main([str(run), "--format", "onnx"]) == 1
    assert capsys.readouterr().err == (
        "error: --format onnx exports the tutorial's CBAM_CNN, 10 classes at 32x32; this model "
        "has 3 classes at 16x16 (--format stablehlo exports it)\n")
    assert not (run / "cbam_cnn_folder.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cbam_cnn", "cbam_resnet18"])
def test_a_64_pixel_folder_trains_and_4_pixels_are_refused(tmp_path, model):
    """Fully optimised: the step at a new size must train to finite numbers."""
    data = make_folder(tmp_path / "pets", per_class=KINDS[:2])
    common = ["--dataset", "folder", "--data-dir", data, "--epochs", 1, "--batch-size", 6,
              "--model", model, "--no-compile-cache", "--devices", 1]
    trained = run_script("train", *common, "--image-size", 64, "--run-dir", tmp_path / "run",
                         cwd=tmp_path, optimize=True)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "Epoch 1/1 done" in trained.stdout and "at 64x64" in trained.stdout
    refused = run_script("train", *common, "--image-size", 4, "--run-dir", tmp_path / "small",
                         cwd=tmp_path)
    assert refused.returncode == 2
    assert f"{model} cannot take 4x4 images; the smallest image size it takes is 8" \
        in refused.stderr


def test_the_command_line_keeps_image_size_to_folders_and_a_resume_to_its_size():
    from cbam_jax import rundir
    from cbam_jax.cli import train as script

    with pytest.raises(SystemExit):
        script.parse_args(["--dataset", "digits", "--image-size", "64"])
    args = script.parse_args(["--dataset", "folder", "--data-dir", "pets", "--image-size", "64",
                              "--skip-unreadable"])
    assert (args.image_size, args.skip_unreadable) == (64, True)
    record = rundir.new_record({"epochs": 1}, "folder", devices=1, data_dir="pets",
                               data={"class_names": ["a", "b"], "image_size": 64,
                                     "mean": [0.5] * 3, "std": [0.2] * 3})
    assert rundir.recorded_settings(record)["image_size"] == 64
    with pytest.raises(rundir.ResumeMismatchError, match="--image-size 32 \\(recorded: 64\\)"):
        rundir.check_resume(record, {"epochs": 1, "dataset": "folder", "devices": 1,
                                     "image_size": 32}, "run")
