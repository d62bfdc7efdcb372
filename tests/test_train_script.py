"""`python scripts/train.py`: flags, messages, the run directory (one owner, one history: a
second writer, a rerun without --resume and a resume that would change the result are refused
in one line), and offline runs on digits.

Runtime on 2 CPU cores: 9 s for the fast tests. The slow ones: 2 min for a digits run
in-process (interrupted, resumed, refused, overwritten, then read back by evaluate.py; reusing
the compiled steps of tests/test_train.py when both run in one pytest process),
2 min for two runs started together, 1 min 40 s for a second run that compiles nothing, 5 s for
two processes refused together.
"""
import dataclasses
import importlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest
import torch

from cbam_jax import rundir
from cbam_jax.logbook import event_files, read_events
from cbam_jax.recipe import TrainConfig

from conftest import CONTROL_FLOW_ONLY

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                               os.environ.get("PYTHONPATH")])))


@pytest.fixture(scope="module")
def script():
    """The command's module, which scripts/train.py runs."""
    return importlib.import_module("cbam_jax.cli.train")


def test_help_explains_every_flag():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--epochs", "--batch-size", "--lr", "--dataset", "--data-dir", "--run-dir",
                 "--seed", "--resume", "--checkpoint-dir", "--dtype", "--steps-per-call",
                 "--log-every", "--hist-every", "--no-download", "--overwrite",
                 "--allow-device-change"):
        assert flag in out, flag
    assert "(default: 50)" in out and "(default: 64)" in out and "(default: 0.001)" in out
    assert "ReduceLROnPlateau" in out


def defaults_stated_twice(help_text: str) -> list[str]:
    """The options whose help says "(default:" more than once (an option's help may wrap)."""
    options = re.split(r"\n  (?=-)", help_text.split("options:", 1)[1])
    return [o.split()[0] for o in options if " ".join(o.split()).count("(default:") > 1]


@pytest.mark.parametrize("module", ["cbam_jax.cli.train", "cbam_jax.cli.evaluate"])
def test_help_states_each_default_once(module, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(module).parse_args(["--help"])
    out = capsys.readouterr().out
    assert defaults_stated_twice(out) == []
    assert out.count("(default:") >= 4
    # The check finds what argparse's ArgumentDefaultsHelpFormatter did to a default in words.
    doubled = ("options:\n  --run-dir RUN_DIR  logs (default: runs/x, or _1,\n"
               "                     _2, ...) (default: None)\n  --seed SEED  (default: 0)\n")
    assert defaults_stated_twice(doubled) == ["--run-dir"]


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
    assert args.given == frozenset()


def test_the_flags_given_are_told_apart_from_their_defaults(script):
    args = script.parse_args(["--epochs", "50", "--dataset", "auto", "--no-download",
                              "--resume"])
    assert args.given == {"epochs", "dataset", "no_download", "resume"}
    assert (args.epochs, args.dataset, args.resume) == (50, "auto", "")


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
    (["--resume", "runs/a", "--run-dir", "runs/b"], "do not also pass --run-dir or --overwrite"),
    (["--resume", "runs/a", "--overwrite"], "do not also pass --run-dir or --overwrite"),
    (["--overwrite"], "--overwrite needs --run-dir"),
    (["--allow-device-change"], "--allow-device-change goes with --resume"),
])
def test_bad_flags_are_rejected_with_a_clear_message(script, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        script.parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The one line a refusal prints (and nothing else)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def recorded_run(path: Path, **config) -> Path:
    """A run directory as a digits run on one device leaves it (its record and some files)."""
    rundir.write_record(path, rundir.new_record(
        dataclasses.asdict(TrainConfig(**config)), "digits", devices=1))
    (path / "checkpoints" / "latest" / "1").mkdir(parents=True)
    return path


FAST = ["--no-compile-cache"]  # no run here gets as far as compiling


def test_a_rerun_without_resume_is_refused_in_one_line(script, capsys, tmp_path):
    run = recorded_run(tmp_path / "run")
    assert script.main(FAST + ["--dataset", "digits", "--run-dir", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{run} already holds a run: continue it with --resume {run}" in line
    assert "--overwrite" in line
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "run.json"]


def test_a_second_writer_is_refused_in_one_line_naming_the_holder(script, capsys, tmp_path):
    run = recorded_run(tmp_path / "run")
    with rundir.RunLock.acquire(run):  # a run that is training there
        for flags in (["--resume", str(run)], ["--run-dir", str(run), "--overwrite"]):
            assert script.main(FAST + flags) == 2
            line = one_error_line(capsys.readouterr().err)
            assert f"{run} is in use by process {os.getpid()} on {socket.gethostname()}" in line
    assert (run / "run.json").is_file()


@pytest.mark.parametrize("flags, refused", [
    (["--log-every", "7"], "--log-every 7 (recorded: 5)"),
    (["--hist-every", "9", "--epochs", "4"], "--hist-every 9 (recorded: 20)"),
    (["--epochs", "1"], "--epochs 1 (recorded: 2)"),
    (["--dataset", "cifar10"], "--dataset cifar10 (recorded: digits)"),
])
def test_a_resume_that_would_change_the_result_is_refused_in_one_line(script, capsys, tmp_path,
                                                                      flags, refused):
    run = recorded_run(tmp_path / "run", epochs=2, batch_size=32, log_every=5, hist_every=20)
    assert script.main(FAST + flags + ["--resume", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (f"error: cannot resume {run} with settings other than its run.json "
                    f"records: {refused}; leave those flags out to continue as recorded (a "
                    f"larger --epochs may be given)")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "run.json"]


def test_a_resume_on_another_device_count_is_refused_unless_asked_for(script, capsys, tmp_path):
    run = tmp_path / "run"
    rundir.write_record(run, rundir.new_record(dataclasses.asdict(TrainConfig()), "digits",
                                               devices=2))
    assert script.main(FAST + ["--devices", "1", "--resume", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "devices 1 (recorded: 2; --allow-device-change continues on 1" in line
    # Asked for, the resume goes on: here to the end of a run with no checkpoint yet, whose
    # data set is refused (no CIFAR-10 offline) only after the devices were accepted.
    (run / "run.json").write_text((run / "run.json").read_text().replace('"digits"',
                                                                          '"cifar10"'))
    code = script.main(FAST + ["--devices", "1", "--allow-device-change", "--no-download",
                               "--data-dir", str(tmp_path / "nothing"), "--resume", str(run)])
    out, err = capsys.readouterr()
    assert code == 1 and "CIFAR-10" in err and "devices" not in err


@pytest.mark.slow
def test_digits_run_interrupted_resumed_as_recorded_refused_overwritten_and_evaluated(
        script, capsys, tmp_path, monkeypatch):
    """One run directory through its life: a 2-epoch run stopped after its first epoch; a
    resume given no flag at all, which takes them all from run.json (2 epochs, not 50); a rerun
    without --resume, refused; --overwrite, which leaves only the new run; evaluate.py, which
    reads the data directory from the run."""
    from cbam_jax import train
    from cbam_jax.cli import evaluate

    run_dir, data_dir = tmp_path / "run", tmp_path / "data-elsewhere"
    # Batch 32 and these cadences: the compiled steps of tests/test_train.py serve again.
    flags = ["--dataset", "digits", "--batch-size", "32", "--log-every", "5", "--hist-every", "20",
             "--data-dir", str(data_dir), "--no-compile-cache"]
    epoch_line = train._epoch_line

    def stop_after_the_first_epoch(result, *args):  # as Ctrl-C once the epoch is committed
        if result.epoch == 0:
            raise KeyboardInterrupt
        return epoch_line(result, *args)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(train, "_epoch_line", stop_after_the_first_epoch)
        script.main(flags + ["--epochs", "2", "--run-dir", str(run_dir)])
    out = capsys.readouterr().out
    assert f"Device: {jax.devices()[0]} (cpu)" in out
    assert "Total trainable parameters: 1,150,896" in out
    table = out.split("Parameters per layer:\n", 1)[1].splitlines()
    assert table[:2] == ["conv1.weight: 864", "conv1.bias: 32"]  # the tutorial's order
    assert table[24] == "fc2.bias: 10"
    assert "Epoch 1/2 [####################] 45/45" in out  # the progress bar
    assert sorted(p.name for p in (run_dir / "checkpoints" / "latest").iterdir()) == ["1"]
    assert not (run_dir / rundir.LOCK_FILE).exists()  # released on the way out

    assert script.main(["--no-compile-cache", "--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "Resuming from" in out and "after epoch 1" in out
    assert "Epoch 1/2 done" not in out and "Epoch 2/2 done | train loss" in out
    assert "Training finished! Final test accuracy:" in out
    for name in ("iteration_loss.png", "epoch_metrics.png", "attention_maps.png",
                 "checkpoints/latest/2", "digits_cbam_cnn_model.pth"):
        assert (run_dir / name).exists(), name
    state_dict = torch.load(run_dir / "digits_cbam_cnn_model.pth", weights_only=True)
    assert state_dict["fc1.weight"].shape == (512, 2048)
    assert int(state_dict["bn1.num_batches_tracked"]) == 2 * 45

    assert script.main(flags + ["--run-dir", str(run_dir)]) == 2
    assert "already holds a run" in one_error_line(capsys.readouterr().err)

    assert script.main(flags + ["--epochs", "1", "--run-dir", str(run_dir), "--overwrite"]) == 0
    assert "Epoch 1/1 done" in capsys.readouterr().out
    assert len(event_files(run_dir)) == 1
    assert sorted(p.name for p in (run_dir / "checkpoints" / "latest").iterdir()) == ["1"]
    assert sorted(p.name for p in (run_dir / "checkpoints" / "best").iterdir()) == ["1"]
    assert json.loads((run_dir / "run.json").read_text())["config"]["epochs"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing left aside

    read_from = []

    def load_dataset(name, data_dir, **kwargs):  # records where evaluate.py looks
        from cbam_jax.data import DatasetUnavailableError
        read_from.append((name, data_dir))
        raise DatasetUnavailableError("enough")

    monkeypatch.setattr("cbam_jax.data.load_dataset", load_dataset)
    assert evaluate.main([str(run_dir)]) == 1
    assert evaluate.main([str(run_dir), "--data-dir", "given"]) == 1  # a flag still wins
    assert read_from == [("digits", str(data_dir)), ("digits", "given")]


def test_resume_of_a_missing_run_is_an_error(script, capsys, tmp_path):
    assert script.main(["--dataset", "digits", "--resume", str(tmp_path / "nope")]) == 2
    assert "no run directory" in capsys.readouterr().err


def test_mismatched_resume_is_refused_before_the_model_is_built_and_writes_nothing(
        script, capsys, tmp_path):
    run_dir = tmp_path / "run"  # as a digits run with batch 32 leaves it when it is killed early
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps(
        {"config": dataclasses.asdict(TrainConfig(batch_size=32)), "dataset": "digits"}))
    code = script.main(["--dataset", "digits", "--batch-size", "64", "--no-compile-cache",
                        "--resume", str(run_dir)])
    out, err = capsys.readouterr()
    assert code == 2
    assert (f"error: cannot resume {run_dir} with settings other than its run.json records: "
            f"--batch-size 64 (recorded: 32)") in err
    assert "Total trainable parameters" not in out  # refused before the model was built
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.json"]


def test_resume_of_a_directory_with_nothing_to_resume_leaves_it_empty(script, capsys, tmp_path):
    code = script.main(["--dataset", "digits", "--no-compile-cache", "--resume", str(tmp_path)])
    assert code == 2  # a run directory that cannot be used as asked
    assert "holds no run record (run.json): nothing to resume" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no checkpoints/latest, checkpoints/best, lock


@pytest.mark.slow
def test_two_default_runs_started_together_finish_in_two_directories(tmp_path):
    # The steps of conftest.DIGITS_RUN's runs (batch 64, one device; an epoch shorter than
    # the cadences logs its last batch either way), from the pytest run's compilation cache (a
    # run's default cache is the user's).
    flags = ["--dataset", "digits", "--epochs", "1", "--devices", "1", "--compile-cache",
             os.environ["JAX_COMPILATION_CACHE_DIR"]]
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), *flags], cwd=tmp_path, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out[-2000:] + err[-2000:]
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["CBAM_CNN_experiment",
                                                      "CBAM_CNN_experiment_1"]
    said = sorted(re.search(r"Run directory: (\S+)", out).group(1) for out, _ in outputs)
    assert said == ["runs/CBAM_CNN_experiment", "runs/CBAM_CNN_experiment_1"]
    for run in runs.iterdir():
        assert sorted(p.name for p in (run / "checkpoints" / "latest").iterdir()) == ["1"]
        (events,) = event_files(run)
        tags = {v.tag for e in read_events(events, strict=True) for v in e.summary.value}
        assert {"Train/Epoch_Loss", "Test/Epoch_Accuracy", "Train/Batch_Loss"} <= tags
        assert not (run / rundir.LOCK_FILE).exists()


@pytest.mark.slow
def test_a_run_directory_refused_by_process_0_stops_every_process(tmp_path):
    """Only process 0 takes the run directory; the others hear its refusal and stop too,
    instead of waiting for it in the first collective."""
    run = recorded_run(tmp_path / "run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(ENV, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    procs = [subprocess.Popen(
        [sys.executable, str(SCRIPT), "--dataset", "digits", "--run-dir", str(run),
         "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i), "--devices", "1", "--no-compile-cache"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [2, 2], errs
    assert f"error: {run} already holds a run" in errs[0]
    assert f"error: process 0 could not take {run} (its message says why)" in errs[1]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "run.json"]


@pytest.mark.slow
def test_a_second_run_compiles_nothing(tmp_path):
    """Every compile of the first run lands in the persistent cache (minimum compile time 0),
    so a second run that compiled anything would add an entry: it adds none. (A subprocess
    each: JAX reads the cache settings before its first compile.)"""
    cache = tmp_path / "cache"
    env = dict(os.environ, **CONTROL_FLOW_ONLY)
    flags = ["--dataset", "digits", "--epochs", "1", "--devices", "1", "--log-every", "1000",
             "--hist-every", "1000", "--compile-cache", str(cache)]
    entries = []
    for run in ("first", "second"):
        result = subprocess.run([sys.executable, str(SCRIPT), *flags, "--run-dir",
                                 str(tmp_path / run)], capture_output=True, text=True,
                                timeout=900, env=env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        entries.append(sorted(p.name for p in cache.iterdir()))
    compiled = {name.split("-")[0] for name in entries[0]}  # jit_<function>-<key>
    assert {"jit_initial", "jit_train_batches", "jit_eval_batches",
            "jit_attention_maps"} <= compiled
    assert entries[1] == entries[0]
