"""Using a trained model: `cbam_jax.inference`, `scripts/evaluate.py`, `predict.py` and
`export.py` (StableHLO, and ONNX through `parity.onnx_export`), all on ONE short digits run.

The run is `scripts/train.py --dataset digits --epochs 1` in a subprocess, as a user trains it,
on one device (where a CPU host's default is a device per core: evaluate.py must follow the
run's record), shared by every test here. Its flags are tests/test_checkpoint.py's runs', so
the two files share their compiled steps (conftest.DIGITS_RUN).
Runtime on 2 CPU cores, in `make test-all`: about 2 min; the training subprocess 19 s (its
steps loaded from the cache), the evaluate subprocess 15 s, the StableHLO export and reload
24 s, Grad-CAM on a new ResNet-18 21 s.
The tests that read the run are in the slow tier (make test-all); the image, help and
malicious-file tests are fast.
"""
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cbam_jax import inference, train
from cbam_jax.augment import normalize
from cbam_jax.checkpoint import read_meta, step_directory
from cbam_jax.data import Normalization, load_dataset
from parity import load_checkpoint as load_any_checkpoint
from parity.onnx_export import check_onnx, onnx_ops

from conftest import DIGITS_RUN

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
BATCH_SIZE = 32  # predict's


def run_script(name, *args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600, **kwargs)


def load_script(name):
    """The command's module (`cbam_jax.cli.<name>`), which `scripts/<name>` runs."""
    import importlib

    return importlib.import_module(f"cbam_jax.cli.{name.removesuffix('.py')}")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One epoch on digits through scripts/train.py: run.json, checkpoints, the .pth."""
    jax.devices()  # this process keeps its device count: the scripts below cannot change it
    run_dir = tmp_path_factory.mktemp("inference") / "run"
    result = run_script("train.py", *DIGITS_RUN, "--epochs", 1,
                        "--compile-cache", os.environ["JAX_COMPILATION_CACHE_DIR"],
                        "--run-dir", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def logged(run_dir):
    """What the run logged for its epoch: (test loss, test accuracy, devices)."""
    meta = read_meta(step_directory(run_dir, "latest"))
    return meta["history"]["test_loss"][-1], meta["history"]["test_acc"][-1], meta["devices"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", log=lambda *_: None)


@pytest.fixture(scope="module")
def trained(run_dir):
    return inference.load_checkpoint(run_dir)


# --- evaluate --------------------------------------------------------------------------------

@pytest.mark.slow
def test_evaluate_reproduces_the_runs_test_loss_and_accuracy_exactly(run_dir, logged,
                                                                     tmp_path):
    result = run_script("evaluate.py", run_dir, "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "evaluation.json").read_text())
    test_loss, test_acc, devices = logged
    assert report["devices"] == devices == json.loads((run_dir / "run.json").read_text())[
        "devices"]
    assert report["test_loss"] == test_loss  # bit for bit, not approximately
    assert report["test_acc"] == test_acc
    assert f"Test loss: {test_loss!r}  (the run logged {test_loss!r} for epoch 1: equal)" \
        in result.stdout
    assert "Confusion matrix (rows: true class, columns: predicted):" in result.stdout
    matrix = np.array(report["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 360
    assert 100.0 * np.trace(matrix) / 360 == pytest.approx(test_acc, abs=1e-9)
    per_class = [report["per_class_acc"][str(d)] for d in range(10)]
    np.testing.assert_allclose(per_class, 100.0 * np.diag(matrix) / matrix.sum(1))
    assert Image.open(tmp_path / "confusion_matrix.png").format == "PNG"


@pytest.mark.slow
def test_evaluate_reads_the_runs_pth_with_the_run_json_beside_it(run_dir, logged, tmp_path,
                                                                   capsys):
    """In this process (pytest's one CPU device, without the scripts' XLA settings): the same
    accuracy, and the loss to float32 rounding."""
    code = load_script("evaluate.py").main([str(run_dir / "digits_cbam_cnn_model.pth"),
                                            "--out-dir", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "evaluation.json").read_text())
    test_loss, test_acc, _ = logged
    assert report["dataset"] == "digits" and report["epoch"] is None
    assert report["test_acc"] == test_acc
    assert report["test_loss"] == pytest.approx(test_loss, rel=1e-6)


# --- the library -----------------------------------------------------------------------------

@pytest.mark.slow
def test_every_way_to_name_a_checkpoint_finds_the_same_step(run_dir):
    step = run_dir / "checkpoints" / "best" / "1"
    for path in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "best", step):
        assert step_directory(path) == step
    assert step_directory(run_dir, "latest") == run_dir / "checkpoints" / "latest" / "1"


@pytest.mark.slow
def test_what_is_not_a_checkpoint_gets_a_clear_error(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory; expected a run directory"):
        inference.load_checkpoint(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint: expected a run"):
        inference.load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="PyTorch state_dict: load it with parity"):
        inference.load_checkpoint(run_dir / "digits_cbam_cnn_model.pth")
    with pytest.raises(ValueError, match="which: expected 'best' or 'latest'"):
        inference.load_checkpoint(run_dir, which="last")


@pytest.mark.slow
def test_a_checkpoint_and_the_runs_pth_hold_the_same_model(run_dir, trained):
    from_pth = load_any_checkpoint(run_dir / "digits_cbam_cnn_model.pth")
    assert (trained.dataset, trained.epoch, trained.config.batch_size) == ("digits", 1, 64)
    assert trained.verified is True and from_pth.verified is None  # its SHA256SUMS held
    assert trained.class_names == tuple("0123456789")
    leaves = jax.tree.leaves((trained.state.params, trained.state.batch_stats))
    pth_leaves = jax.tree.leaves((from_pth.state.params, from_pth.state.batch_stats))
    assert all(np.array_equal(a, b) for a, b in zip(leaves, pth_leaves, strict=True))


@pytest.mark.slow
def test_predict_gives_the_top_classes_and_every_cbam_gate(trained, digits):
    images = digits.test_images[:70]  # three batches of 32, the last one padded
    result = inference.predict(trained.state, images, top_k=3, batch_size=BATCH_SIZE,
                               attention=True)
    assert result.classes.shape == result.probabilities.shape == (70, 3)
    assert np.all(np.diff(result.probabilities, axis=1) <= 0)  # most probable first
    logits = np.asarray(inference.eval_logits(trained.state, normalize(images)))
    np.testing.assert_array_equal(result.classes[:, 0], logits.argmax(1))
    assert [g.shape for g in result.attention] == [(70, 16, 16), (70, 8, 8), (70, 4, 4)]
    assert all(0 < g.min() and g.max() < 1 for g in result.attention)  # sigmoid gates
    maps = inference.attention_maps(trained.state, images[:8])
    for gate, block in zip(maps, result.attention, strict=True):
        np.testing.assert_allclose(gate, block[:8], atol=1e-6)
    assert train.attention_maps is inference.attention_maps  # fit draws the same maps
    with pytest.raises(ValueError, match="top_k: expected 1 to 10"):
        inference.predict(trained.state, images, top_k=11, batch_size=BATCH_SIZE)


def test_gates_are_found_by_name_at_any_depth_in_the_order_the_blocks_ran():
    """As a CBAM-ResNet sows them; sorted names would put 'layer10' before 'layer9'."""
    def block(value):
        return {"cbam": {"spatial_attn": {"spatial_attention": (np.full((1, 2, 2, 1), value),)}}}

    gates = inference.spatial_gates({"layer9_0": block(1.0), "layer10_0": block(2.0),
                                     "head": {"other": (np.zeros((1, 2, 2, 1)),)}})
    assert [g.shape for g in gates] == [(1, 2, 2), (1, 2, 2)]
    assert [g[0, 0, 0] for g in gates] == [1.0, 2.0]


# --- predict ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_folder(digits, tmp_path_factory):
    """Test images 0-2 as 32x32 PNGs, image 3 as a 96x96 JPEG, and a file that is no image."""
    folder = tmp_path_factory.mktemp("images")
    for i in range(3):
        Image.fromarray(digits.test_images[i]).save(folder / f"digit{i}.png")
    Image.fromarray(digits.test_images[3]).resize((96, 96), Image.Resampling.NEAREST).save(
        folder / "digit3.jpg", quality=95)
    (folder / "notes.png").write_text("not an image")
    return folder


@pytest.mark.slow
def test_predict_writes_a_figure_per_image_and_reports_bad_inputs(run_dir, trained, digits,
                                                                   image_folder, tmp_path,
                                                                   capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "figures"
    code = load_script("predict.py").main([
        str(run_dir), str(image_folder), str(empty), str(tmp_path / "missing.png"),
        "--out-dir", str(out), "--batch-size", str(BATCH_SIZE), "--top-k", "2"])
    captured = capsys.readouterr()
    assert code == 1  # some inputs failed; the others still ran
    assert f"{image_folder / 'notes.png'}: not an image file that Pillow can read" \
        in captured.err
    assert (f"{empty}: a folder with no .png, .jpg, .jpeg, .bmp, .webp, .tif, .tiff files"
            in captured.err)
    assert f"{tmp_path / 'missing.png'}: no such file or folder" in captured.err
    assert "3 input(s) failed, 4 image(s) predicted" in captured.err
    figures = sorted(p.name for p in out.iterdir())
    assert figures == ["digit0_png_attention.png", "digit1_png_attention.png",
                       "digit2_png_attention.png", "digit3_jpg_attention.png"]
    assert all(Image.open(out / name).format == "PNG" for name in figures)
    # A lossless 32x32 file is the test image itself: the same top classes and probabilities.
    expected = inference.predict(trained.state, digits.test_images[:3], top_k=2,
                                 batch_size=BATCH_SIZE)
    lines = dict(line.split(": ", 1) for line in captured.out.splitlines() if ": " in line)
    for i in range(3):
        assert lines[str(image_folder / f"digit{i}.png")] == ", ".join(
            f"{c} {p:.3f}" for c, p in zip(expected.classes[i], expected.probabilities[i]))
    assert str(image_folder / "digit3.jpg") in lines


@pytest.mark.slow
def test_predict_exits_0_when_every_image_is_read(run_dir, image_folder, tmp_path, capsys):
    code = load_script("predict.py").main([str(run_dir), str(image_folder / "digit3.jpg"),
                                           "--no-figures", "--out-dir", str(tmp_path / "no")])
    assert code == 0 and not (tmp_path / "no").exists()
    assert capsys.readouterr().out.startswith(f"{image_folder / 'digit3.jpg'}: ")


@pytest.mark.slow
def test_predict_refuses_a_class_or_layer_it_cannot_explain_in_one_line(run_dir, trained,
                                                                         image_folder, tmp_path,
                                                                         capsys):
    script, image, out = load_script("predict.py"), str(image_folder / "digit0.png"), tmp_path / "f"
    layers = inference.cbam_layers(trained.state)
    assert layers[-1].startswith("cbam3")  # the default: the last CBAM block
    for flag, value, expected in (
            ("--class", "horse", "expected one of 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 (or 0 to 9)"),
            ("--class", "10", "expected one of 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 (or 0 to 9)"),
            ("--layer", "fc9", f"expected one of {', '.join(layers)}")):
        code = script.main([str(run_dir), image, "--explain", "gradcam", flag, value,
                            "--out-dir", str(out)])
        captured = capsys.readouterr()
        assert code == 1 and captured.err == f"error: {flag} {value}: {expected}\n"
        assert not captured.out and not out.exists()  # refused before any image is read


def test_predict_help_states_the_interpolation():
    result = run_script("predict.py", "--help")
    assert result.returncode == 0 and "bilinear" in result.stdout


# --- images as Pillow opens them: 16 bits, transparency, other modes -------------------------

def _png16(path, array):
    """A 16-bit PNG of uint16 grey [H, W] or RGB [H, W, 3], which Pillow cannot write itself."""
    colour_type = 2 if array.ndim == 3 else 0

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in array)
    header = struct.pack(">IIBBBBB", array.shape[1], array.shape[0], 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


# A full-range horizontal gradient, 32x32 (the model's size: the resize keeps every pixel).
RAMP16 = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (32, 1))
RAMP8 = (RAMP16 >> 8).astype(np.uint8)


def test_a_16_bit_gradient_stays_a_full_range_gradient(tmp_path):
    Image.fromarray(RAMP8).save(tmp_path / "eight.png")
    eight = inference.load_image(tmp_path / "eight.png")
    assert eight[0, 0].tolist() == [0, 0, 0] and eight[0, -1].tolist() == [255, 255, 255]
    files = {"grey16.png": lambda p: _png16(p, RAMP16),
             "rgb16.png": lambda p: _png16(p, np.stack([RAMP16] * 3, -1)),
             "big_endian.tif": lambda p: Image.frombytes(
                 "I;16B", (32, 32), RAMP16.astype(">u2").tobytes()).save(p),
             "int32.tif": lambda p: Image.fromarray(RAMP16.astype(np.int32)).save(p)}
    for name, write in files.items():
        write(tmp_path / name)
        with Image.open(tmp_path / name) as image:
            mode = image.mode
            clipped = np.asarray(image.convert("RGB"))  # Pillow's own conversion
        if mode != "RGB":  # the negative control: Pillow clips wide grey to almost white
            assert mode in ("I;16", "I;16B", "I") and (clipped == 255).mean() > 0.9, name
        np.testing.assert_array_equal(inference.load_image(tmp_path / name), eight, name)


def test_images_with_no_known_range_are_refused(tmp_path):
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(ValueError, match="a 32-bit integer image with values from 70000 to "
                                         "70000; expected 8-bit or 16-bit"):
        inference.load_image(tmp_path / "wide.tif")
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="float.tif: a floating-point image"):
        inference.load_image(tmp_path / "float.tif")


def test_transparent_pixels_are_laid_over_white_and_opaque_ones_kept(tmp_path):
    """Each file: pixel (0, 0) transparent (its hidden colour black or red), the rest opaque."""
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (10, 200, 30), 255
    rgba[0, 0] = (0, 0, 0, 0)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    la = np.dstack([np.full((32, 32), 90, np.uint8), np.full((32, 32), 255, np.uint8)])
    la[0, 0] = (0, 0)
    Image.fromarray(la).save(tmp_path / "la.png")
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([255, 0, 0, 10, 200, 30])
    palette.putpixel((0, 0), 0)
    palette.save(tmp_path / "palette.png", transparency=0)
    grey16 = np.full((32, 32), 23130, np.uint16)  # 0x5A5A: 90 in 8 bits
    grey16[0, 0] = 1000
    Image.fromarray(grey16).save(tmp_path / "grey16.png", transparency=1000)
    half = rgba.copy()
    half[0, 0] = (0, 0, 0, 128)  # half transparent black over white: 127
    Image.fromarray(half).save(tmp_path / "half.png")
    opaque = {"rgba.png": (10, 200, 30), "la.png": (90,) * 3, "palette.png": (10, 200, 30),
              "grey16.png": (90,) * 3, "half.png": (10, 200, 30)}
    for name, colour in opaque.items():
        image = inference.load_image(tmp_path / name)
        assert image[5, 5].tolist() == list(colour), name
        assert image[0, 0].tolist() == ([127] * 3 if name == "half.png" else [255] * 3), name
    # The negative control: dropping the alpha channel shows the hidden black.
    assert np.asarray(Image.open(tmp_path / "rgba.png").convert("RGB"))[0, 0].tolist() == [0] * 3


def test_bilevel_cmyk_and_grey_images_become_rgb(tmp_path):
    Image.fromarray(np.eye(32, dtype=bool)).save(tmp_path / "bilevel.png")
    bilevel = inference.load_image(tmp_path / "bilevel.png")
    assert bilevel[3, 3].tolist() == [255] * 3 and bilevel[3, 4].tolist() == [0] * 3
    Image.new("CMYK", (32, 32), (255, 0, 0, 0)).save(tmp_path / "cyan.tif")
    assert inference.load_image(tmp_path / "cyan.tif")[0, 0].tolist() == [0, 255, 255]
    Image.new("L", (32, 32), 77).save(tmp_path / "grey.png")
    assert inference.load_image(tmp_path / "grey.png")[0, 0].tolist() == [77] * 3


# --- the commands' odd inputs: each one error line -------------------------------------------

def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_an_output_folder_that_is_a_file_is_one_error_line(tmp_path, capsys):
    taken = tmp_path / "taken.png"
    taken.write_text("a file")
    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32)).save(image)
    cases = [("predict.py", [str(tmp_path), str(image), "--out-dir", str(taken)],
              f"--out-dir {taken}: a file, not a folder"),
             ("predict.py", [str(tmp_path), str(image), "--out-dir", str(taken / "figures")],
              f"--out-dir {taken / 'figures'}: {taken} is a file, not a folder"),
             ("evaluate.py", [str(tmp_path), "--out-dir", str(taken)],
              f"--out-dir {taken}: a file, not a folder"),
             ("export.py", [str(tmp_path), "--out", str(tmp_path)],
              f"--out {tmp_path}: a folder; expected the name of the file to write"),
             ("export.py", [str(tmp_path), "--out", str(taken / "model.stablehlo")],
              f"--out {taken / 'model.stablehlo'}: {taken} is a file, not a folder")]
    for script, argv, says in cases:
        assert load_script(script).main(argv) == 1, script
        assert _one_error_line(capsys.readouterr().err) == f"error: {says}", script
    assert taken.read_text() == "a file"


@pytest.mark.parametrize("script", ["predict.py", "evaluate.py", "export.py"])
def test_a_malicious_pth_is_one_error_line_and_never_runs(script, tmp_path, capsys):
    class CreatesAFile:
        def __reduce__(self):
            return open, (str(tmp_path / "ran"), "w")

    import torch

    pth = tmp_path / "model.pth"
    torch.save({"conv1.weight": CreatesAFile()}, pth)
    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32)).save(image)
    argv = [str(pth)] + {"predict.py": [str(image), "--no-figures"],
                         "evaluate.py": ["--out-dir", str(tmp_path / "out")],
                         "export.py": []}[script]
    assert load_script(script).main(argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {pth}: holds pickled Python objects besides tensors")
    assert "weights_only=False" not in line and not (tmp_path / "ran").exists()


# --- export ----------------------------------------------------------------------------------

# Runs the artifact with JAX alone: importing cbam_jax in this process fails.
RELOAD = """
import sys
sys.modules["cbam_jax"] = None
import jax, numpy as np
exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
inputs = np.load(sys.argv[2])
np.savez(sys.argv[3], **{k: np.asarray(exported.call(inputs[k])) for k in inputs.files})
print(exported.in_avals[0], "->", exported.out_avals[0])
"""


@pytest.mark.slow
def test_stablehlo_runs_without_the_project_and_agrees_with_jax(run_dir, trained, digits,
                                                                 tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = load_script("export.py")
    assert script.main([str(run_dir)]) == 0
    artifact = run_dir / "cbam_cnn_digits.stablehlo"  # by default, in the run directory
    assert artifact.is_file() and not list(tmp_path.iterdir())  # nothing in the current one
    assert not list(run_dir.glob("*.tmp.*"))
    inputs = {"one": np.asarray(normalize(digits.test_images[:1])),
              "seven": np.asarray(normalize(digits.test_images[1:8]))}
    np.savez(tmp_path / "inputs.npz", **inputs)
    result = subprocess.run([sys.executable, "-c", RELOAD, artifact, tmp_path / "inputs.npz",
                             tmp_path / "logits.npz"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "float32[batch,32,32,3] -> float32[batch,10]" in result.stdout
    logits = np.load(tmp_path / "logits.npz")
    for name, x in inputs.items():
        expected = np.asarray(inference.eval_logits(trained.state, x))
        # XLA folds the constant variables at compile time: rounding-level differences.
        np.testing.assert_allclose(logits[name], expected, rtol=0, atol=script.STABLEHLO_ATOL
                                   + script.STABLEHLO_RTOL * np.abs(expected).max())


@pytest.mark.slow
def test_onnx_export_meets_standard_ops_and_agrees_with_jax(run_dir, trained, digits,
                                                            tmp_path, capsys):
    artifact = tmp_path / "model.onnx"
    assert load_script("export.py").main([str(run_dir), "--format", "onnx", "--out",
                                          str(artifact)]) == 0
    assert "Check on 16 random images against the JAX model: ok" in capsys.readouterr().out
    ops = onnx_ops(artifact)
    # The adaptive pools are global pools at a fixed shape: ReduceMean / ReduceMax over H, W.
    assert set(ops) == {"Conv", "Relu", "MaxPool", "ReduceMean", "ReduceMax", "Gemm",
                        "Reshape", "Sigmoid", "Mul", "Add", "Concat"}
    assert ops["ReduceMean"] == ops["ReduceMax"] == 6 and ops["MaxPool"] == 3
    x = np.asarray(normalize(digits.test_images[:7]))  # another batch than the export's
    variables = {"params": trained.state.params, "batch_stats": trained.state.batch_stats}
    rows = check_onnx(artifact, variables, x, np.asarray(inference.eval_logits(trained.state, x)))
    assert [row.name for row in rows] == ["ONNX Runtime logits", "JAX logits"]
    assert all(row.passed for row in rows), rows


# --- Grad-CAM --------------------------------------------------------------------------------

class TwoSquares(nn.Module):
    """A known answer: class 0's logit is the red channel over the top-left 8x8 quarter, class
    1's the green channel over the bottom-right one, read from `features` (red -> channel 0,
    green -> channel 1)."""

    @nn.compact
    def __call__(self, x, train=False):
        kernel = np.zeros((1, 1, 3, 2), np.float32)
        kernel[0, 0, 0, 0] = kernel[0, 0, 1, 1] = 1.0
        features = nn.Conv(2, (1, 1), use_bias=False, name="features",
                           kernel_init=lambda *_: jnp.asarray(kernel))(x)
        features = jax.nn.relu(features)
        return jnp.stack([features[:, :8, :8, 0].mean((1, 2)),
                          features[:, 8:, 8:, 1].mean((1, 2))], axis=-1)


def test_gradcam_finds_the_region_each_class_reads():
    model = TwoSquares()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    state = inference.InferenceState(model.apply, variables["params"], {},
                                     Normalization((0.0,) * 3, (1.0,) * 3))
    image = np.zeros((1, 16, 16, 3), np.uint8)
    image[0, 2:6, 2:6, 0] = 255     # red, 16 pixels, in class 0's quarter
    image[0, 11:14, 11:14, 1] = 255  # green, 9 pixels, in class 1's
    predicted_map, predicted = inference.gradcam(state, image, layer="features")
    assert predicted.tolist() == [0]  # 16 / 64 > 9 / 64
    for target, inside, outside in ((0, (slice(2, 6), slice(2, 6)), (12, 12)),
                                    (1, (slice(11, 14), slice(11, 14)), (3, 3))):
        cam, explained = inference.gradcam(state, image, target=target, layer="features")
        assert explained.tolist() == [target] and cam.shape == (1, 16, 16)
        peak = np.unravel_index(cam[0].argmax(), cam[0].shape)
        assert inside[0].start <= peak[0] < inside[0].stop
        assert inside[1].start <= peak[1] < inside[1].stop
        assert cam[0].max() == 1.0 and cam[0][outside] == 0.0
    np.testing.assert_array_equal(predicted_map, inference.gradcam(state, image, target=0,
                                                                   layer="features")[0])
    with pytest.raises(ValueError, match="no module at that path"):
        inference.gradcam(state, image, layer="nowhere")


@pytest.mark.parametrize("name, size, last", [("cbam_cnn", 16, "cbam3"),
                                              ("cbam_resnet18", 8, "layer4_1/cbam")])
def test_gradcam_explains_the_last_cbam_block_of_each_model(name, size, last):
    model, tx = train.build("float32", name, 3, size)
    state = train.create_train_state(model, tx, jax.random.PRNGKey(0), 1e-3, size)
    layers = inference.cbam_layers(state, size)
    assert layers[-1] == last and len(layers) == (3 if name == "cbam_cnn" else 8)
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), np.uint8)
    cams, classes = inference.gradcam(state, images)
    default = inference.gradcam(state, images, layer=last)
    np.testing.assert_array_equal(cams, default[0])
    assert cams.shape == (2, size, size) and np.all((cams >= 0) & (cams <= 1))
    top = inference.predict(state, images, top_k=1).classes[:, 0]
    np.testing.assert_array_equal(classes, top)
