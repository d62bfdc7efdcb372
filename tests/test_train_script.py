"""`python scripts/train.py`: flags, messages, and an offline run on digits.

Runtime: about 30 s on 2 cores (one epoch on digits in-process, reusing the compiled steps of
tests/test_train.py when both run in one session; --help in a subprocess).
"""
import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"


@pytest.fixture(scope="module")
def script():
    """The command's module, which scripts/train.py runs."""
    return importlib.import_module("cbam_jax.cli.train")


def test_help_explains_every_flag():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--epochs", "--batch-size", "--lr", "--dataset", "--data-dir", "--run-dir",
                 "--seed", "--resume", "--checkpoint-dir", "--dtype", "--steps-per-call",
                 "--log-every", "--hist-every", "--no-download"):
        assert flag in out, flag
    assert "(default: 50)" in out and "(default: 64)" in out and "(default: 0.001)" in out
    assert "ReduceLROnPlateau" in out


def test_help_answers_without_importing_jax():
    code = (f"import runpy, sys\nsys.argv = ['train.py', '--help']\n"
            f"try:\n    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
            f"except SystemExit:\n    pass\n"
            f"print('jax' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_flags_build_the_recipe_config(script):
    from cbam_jax.recipe import TrainConfig, config_from_args

    assert config_from_args(script.parse_args([])) == TrainConfig()
    config = config_from_args(script.parse_args(["--lr", "0.01", "--model", "cbam_resnet18"]))
    assert (config.learning_rate, config.model) == (0.01, "cbam_resnet18")


def test_defaults_are_the_tutorial_recipe(script):
    args = script.parse_args([])
    assert (args.epochs, args.batch_size, args.learning_rate, args.dataset, args.data_dir, args.dtype,
            args.log_every, args.hist_every) == (50, 64, 1e-3, "auto", "./data", "float32", 100,
                                                 500)
    assert args.resume is None and args.run_dir is None


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs: expected a positive integer, got '0'"),
    (["--batch-size", "abc"], "--batch-size: expected a positive integer, got 'abc'"),
    (["--lr", "-1"], "--lr: expected a positive finite number, got '-1'"),
    (["--lr", "nan"], "--lr: expected a positive finite number, got 'nan'"),
    (["--seed", "-3"], "--seed: expected an integer >= 0, got '-3'"),
    (["--dataset", "mnist"], "--dataset: invalid choice: 'mnist'"),
    (["--dtype", "float16"], "--dtype: invalid choice: 'float16'"),
    (["--model", "vgg16"], "--model: invalid choice: 'vgg16'"),
    (["--steps-per-call", "0"], "--steps-per-call: expected a positive integer, got '0'"),
    (["--resume", "runs/a", "--run-dir", "runs/b"], "do not also pass --run-dir"),
])
def test_bad_flags_are_rejected_with_a_clear_message(script, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        script.parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_digits_run_prints_device_parameters_epochs_and_final_accuracy(script, capsys, tmp_path):
    run_dir = tmp_path / "run"
    # Batch 32 and these cadences: the compiled steps of tests/test_train.py serve again.
    flags = ["--dataset", "digits", "--batch-size", "32", "--log-every", "5", "--hist-every", "20",
             "--no-compile-cache"]
    code = script.main(flags + ["--epochs", "1", "--run-dir", str(run_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert f"Device: {jax.devices()[0]} (cpu)" in out
    assert "Total trainable parameters: 1,150,896" in out
    table = out.split("Parameters per layer:\n", 1)[1].splitlines()
    assert table[:2] == ["conv1.weight: 864", "conv1.bias: 32"]  # the tutorial's order
    assert table[24] == "fc2.bias: 10"
    assert "Epoch 1/1 [####################] 45/45" in out  # the progress bar
    assert "Epoch 1/1 done | train loss" in out and "| lr 0.001 |" in out
    assert "Training finished! Final test accuracy:" in out
    for name in ("iteration_loss.png", "epoch_metrics.png", "attention_maps.png",
                 "checkpoints/latest/1", "digits_cbam_cnn_model.pth"):
        assert (run_dir / name).exists(), name
    state_dict = torch.load(run_dir / "digits_cbam_cnn_model.pth", weights_only=True)
    assert state_dict["fc1.weight"].shape == (512, 2048)
    assert int(state_dict["bn1.num_batches_tracked"]) == 45

    # Resuming the finished run with a larger --epochs trains only the new epoch.
    code = script.main(flags + ["--epochs", "2", "--resume", str(run_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert "Resuming from" in out and "after epoch 1" in out
    assert "Epoch 1/2 done" not in out and "Epoch 2/2 done" in out


def test_resume_of_a_missing_run_is_an_error(script, capsys, tmp_path):
    assert script.main(["--dataset", "digits", "--resume", str(tmp_path / "nope")]) == 2
    assert "no run directory" in capsys.readouterr().err


def test_mismatched_resume_is_refused_before_the_model_is_built_and_writes_nothing(
        script, capsys, tmp_path):
    from cbam_jax.recipe import TrainConfig

    run_dir = tmp_path / "run"  # as a digits run with batch 32 leaves it when it is killed early
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps(
        {"config": dataclasses.asdict(TrainConfig(batch_size=32)), "dataset": "digits"}))
    code = script.main(["--dataset", "digits", "--batch-size", "64", "--no-compile-cache",
                        "--resume", str(run_dir)])
    out, err = capsys.readouterr()
    assert code == 1
    assert "error: cannot resume with different settings (saved, given): batch_size: 32 != 64" \
        in err
    assert "Total trainable parameters" not in out  # refused before the model was built
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.json"]


def test_resume_of_a_directory_with_nothing_to_resume_leaves_it_empty(script, capsys, tmp_path):
    code = script.main(["--dataset", "digits", "--no-compile-cache", "--resume", str(tmp_path)])
    assert code == 1
    assert "holds no run record (run.json): nothing to resume" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no checkpoints/latest, checkpoints/best



def test_a_second_run_compiles_nothing(tmp_path):
    """Every compile of the first run lands in the persistent cache (minimum compile time 0),
    so a second run that compiled anything would add an entry: it adds none. (A subprocess
    each: JAX reads the cache settings before its first compile.)"""
    cache = tmp_path / "cache"
    flags = ["--dataset", "digits", "--epochs", "1", "--devices", "1", "--log-every", "1000",
             "--hist-every", "1000", "--compile-cache", str(cache)]
    entries = []
    for run in ("first", "second"):
        result = subprocess.run([sys.executable, str(SCRIPT), *flags, "--run-dir",
                                 str(tmp_path / run)], capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        entries.append(sorted(p.name for p in cache.iterdir()))
    assert len(entries[0]) > 10  # the train step, evaluation, init's many small programs
    assert entries[1] == entries[0]
