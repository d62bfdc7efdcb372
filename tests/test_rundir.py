"""Run directories (cbam_jax.rundir): atomic creation, the lock, a new run only in a new or
empty directory, --overwrite, and what a resume takes from run.json and refuses to change.
Standard library only, in-process (one short subprocess holds a lock and is killed).
Runtime: about 2 s."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cbam_jax import rundir
from cbam_jax.recipe import TrainConfig
from cbam_jax.rundir import LOCK_FILE, ResumeMismatchError, RunDirError, RunLock

ROOT = Path(__file__).resolve().parents[1]


def make_run(path: Path, **config) -> dict:
    """A run directory as a finished run leaves it (its record and a few of its files)."""
    record = rundir.new_record(dataclasses.asdict(TrainConfig(**config)), "digits", devices=2,
                               data_dir="/data/here")
    rundir.write_record(path, record)
    (path / "checkpoints" / "latest" / "1").mkdir(parents=True)
    (path / "events.out.tfevents.1.host.1").write_bytes(b"events")
    return record


# --- default directories ---------------------------------------------------------------------

def test_default_run_dirs_are_created_as_base_then_1_2(tmp_path):
    base = str(tmp_path / "runs" / "CBAM_CNN_experiment")
    assert rundir.latest(base) is None
    Path(f"{base}_1").parent.mkdir(parents=True)
    for expected in (base, f"{base}_1", f"{base}_2"):
        run_dir = rundir.create_new(base)
        assert str(run_dir) == expected and run_dir.is_dir()
        assert rundir.latest(base) == run_dir


def test_a_file_with_the_default_name_is_skipped(tmp_path):
    base = tmp_path / "run"
    base.write_text("not a directory")
    assert rundir.create_new(str(base)) == Path(f"{base}_1")


def test_runs_created_at_once_get_different_directories(tmp_path):
    base, made, start = str(tmp_path / "run"), [], threading.Barrier(8)

    def create():
        start.wait()
        made.append(rundir.create_new(base))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(str, made)) == sorted([base] + [f"{base}_{i}" for i in range(1, 8)])


# --- the lock --------------------------------------------------------------------------------

def test_a_second_lock_is_refused_naming_the_holder_and_a_release_lets_it_go(tmp_path):
    with RunLock.acquire(tmp_path):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(RunDirError) as refused:  # another open file: locks apart
            RunLock.acquire(tmp_path)
        message = str(refused.value)
        assert f"is in use by process {os.getpid()} on {holder['host']}" in message
        assert "\n" not in message
    assert not (tmp_path / LOCK_FILE).exists()  # a clean release leaves nothing behind
    RunLock.acquire(tmp_path).release()


def test_a_lock_file_left_by_a_killed_run_is_taken(tmp_path):
    (tmp_path / LOCK_FILE).write_text('{"pid": 1, "host": "gone", "started": "then"}')
    with RunLock.acquire(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_the_lock_is_released_when_its_process_is_killed(tmp_path):
    code = ("import sys, time\nfrom cbam_jax.rundir import RunLock\n"
            "RunLock.acquire(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(60)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"in use by process {holder.pid} on "):
            RunLock.acquire(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunLock.acquire(tmp_path).release()


# --- claiming a run directory ----------------------------------------------------------------

def test_a_default_run_directory_is_new_and_locked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = rundir.claim(), rundir.claim()
    assert (first.run_dir, second.run_dir) == (Path("runs/CBAM_CNN_experiment"),
                                               Path("runs/CBAM_CNN_experiment_1"))
    with pytest.raises(RunDirError, match="is in use by process"):
        rundir.claim(first.run_dir, resume=True)
    first.release()
    second.release()


def test_a_new_run_is_refused_in_a_used_directory_in_one_line(tmp_path):
    make_run(tmp_path / "run")
    with pytest.raises(RunDirError) as refused:
        rundir.claim(tmp_path / "run")
    message = str(refused.value)
    assert "already holds a run: continue it with --resume" in message
    assert "new --run-dir" in message and "--overwrite" in message and "\n" not in message
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released


def test_a_new_run_may_use_an_empty_directory_or_one_a_killed_start_left(tmp_path):
    (tmp_path / "empty").mkdir()
    rundir.claim(tmp_path / "empty").release()
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / LOCK_FILE).write_text("{}")
    rundir.claim(tmp_path / "stale").release()
    rundir.claim(tmp_path / "new" / "run").release()  # created, parents too


def test_a_directory_that_holds_no_run_is_never_overwritten(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(RunDirError, match="holds no run"):
            rundir.claim(other, overwrite=overwrite)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match="is a file"):
        rundir.claim(tmp_path / "file")


def test_overwrite_replaces_a_run_directory_whole_by_an_empty_one(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    with rundir.claim(run, overwrite=True) as lock:
        assert lock.run_dir == run
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
        with pytest.raises(RunDirError, match="is in use"):  # the new directory is held
            RunLock.acquire(run)
    assert list(run.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing left aside


def test_overwrite_of_a_running_run_is_refused_and_deletes_nothing(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    with RunLock.acquire(run):
        with pytest.raises(RunDirError, match="is in use"):
            rundir.claim(run, overwrite=True)
        assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before + [LOCK_FILE]


def test_overwrite_of_a_symbolic_link_is_refused(tmp_path):
    make_run(tmp_path / "target")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(RunDirError, match="is a symbolic link"):
        rundir.claim(tmp_path / "link", overwrite=True)
    assert (tmp_path / "target" / "run.json").is_file()


def test_a_used_checkpoint_directory_outside_the_run_is_refused_before_anything_is_deleted(
        tmp_path):
    run, checkpoints = tmp_path / "run", tmp_path / "checkpoints"
    make_run(run)
    (checkpoints / "latest" / "3").mkdir(parents=True)
    with pytest.raises(RunDirError, match="--checkpoint-dir .* is not empty"):
        rundir.claim(run, overwrite=True, checkpoint_dir=checkpoints)
    assert (run / "run.json").is_file()
    rundir.claim(tmp_path / "new", checkpoint_dir=tmp_path / "new" / "ckpt").release()


# --- the record ------------------------------------------------------------------------------

def test_a_record_that_cannot_be_read_is_one_line_naming_the_file(tmp_path):
    assert rundir.read_record(tmp_path) is None
    (tmp_path / "run.json").write_text("{garbage")
    with pytest.raises(RunDirError, match=rf"{tmp_path / 'run.json'} cannot be read as a run "
                                          r"record: Expecting property name"):
        rundir.read_record(tmp_path)
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(RunDirError, match="is not a run record"):
        rundir.read_record(tmp_path)


def test_a_resume_takes_every_recorded_setting_by_its_flags_name(tmp_path):
    record = make_run(tmp_path / "run", epochs=2, log_every=5, batch_size=32)
    assert rundir.read_record(tmp_path / "run") == record
    settings = rundir.recorded_settings(record)
    assert settings == {**dataclasses.asdict(TrainConfig(epochs=2, log_every=5, batch_size=32)),
                        "dataset": "digits", "data_dir": "/data/here", "devices": 2}
    two_processes = dict(record, processes=2)  # --devices counts each process's devices
    assert rundir.recorded_settings(two_processes)["devices"] == 1


def test_an_older_record_without_data_dir_or_devices_leaves_those_to_the_flags():
    record = {"config": dataclasses.asdict(TrainConfig(epochs=3)), "dataset": "cifar10"}
    settings = rundir.recorded_settings(record)
    assert "data_dir" not in settings and "devices" not in settings
    assert settings["epochs"] == 3 and settings["dataset"] == "cifar10"
    given = {**dataclasses.asdict(TrainConfig(epochs=3)), "dataset": "cifar10", "devices": 8}
    rundir.check_resume(record, given, "run")  # no device count recorded: none checked


def test_a_resume_records_more_epochs_and_a_moved_data_directory_and_nothing_else(tmp_path):
    record = make_run(tmp_path / "run", epochs=2)
    assert rundir.continued_record(record, epochs=2) == record
    continued = rundir.continued_record(record, epochs=5, data_dir="moved")
    assert continued == {**record, "config": {**record["config"], "epochs": 5},
                         "data_dir": os.path.abspath("moved")}


def _given(record, **changes):
    return {**record["config"], "dataset": record["dataset"], "devices": record["devices"],
            **changes}


def test_a_resume_with_the_recorded_settings_or_more_epochs_is_accepted(tmp_path):
    record = make_run(tmp_path / "run", epochs=2)
    rundir.check_resume(record, _given(record), "run")
    rundir.check_resume(record, _given(record, epochs=5), "run")
    rundir.check_resume(record, _given(record, checkpoint_dir="run/checkpoints"), "run")


@pytest.mark.parametrize("changes, refused", [
    (dict(log_every=7), "--log-every 7 (recorded: 100)"),
    (dict(hist_every=9), "--hist-every 9 (recorded: 500)"),
    (dict(learning_rate=0.01), "--lr 0.01 (recorded: 0.001)"),
    (dict(steps_per_call=2), "--steps-per-call 2 (recorded: automatic)"),
    (dict(epochs=1), "--epochs 1 (recorded: 2)"),
    (dict(dataset="cifar10"), "--dataset cifar10 (recorded: digits)"),
    (dict(devices=1), "devices 1 (recorded: 2; --allow-device-change continues on 1"),
    (dict(checkpoint_dir="/elsewhere"), "--checkpoint-dir /elsewhere (recorded: "
                                        "RUN_DIR/checkpoints)"),
])
def test_a_resume_that_would_change_the_result_is_refused_in_one_line(tmp_path, changes,
                                                                      refused):
    record = make_run(tmp_path / "run", epochs=2)
    with pytest.raises(ResumeMismatchError) as error:
        rundir.check_resume(record, _given(record, **changes), tmp_path / "run")
    message = str(error.value)
    assert message.startswith(f"cannot resume {tmp_path / 'run'} with settings other than its "
                              f"run.json records: {refused}")
    assert "leave those flags out to continue as recorded" in message and "\n" not in message


def test_another_device_count_is_accepted_when_asked_for(tmp_path):
    record = make_run(tmp_path / "run")
    rundir.check_resume(record, _given(record, devices=1), "run", allow_device_change=True)
