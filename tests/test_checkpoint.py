"""Checkpoints that verify themselves, fall back when damaged, and fail in one line.

The fast tests save small pytrees with `cbam_jax.checkpoint.Checkpoints` (no training): the
manifest and what counts as committed, damage of every kind (flipped bytes, a truncated chunk,
a missing file, garbage JSON, non-finite values, a garbage manifest), checkpoints from before
digests existed, and a write that the file-size limit stops. The slow ones run the command
lines: a run on a full disk (a small tmpfs where this machine lets root mount one) and under a
file-size limit, and a run whose checkpoints are damaged, which `evaluate.py` and `predict.py`
refuse and `--resume` skips to finish exactly as an uninterrupted run.
"""
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from cbam_jax import checkpoint
from cbam_jax.checkpoint import (MANIFEST, Checkpoints, DamagedCheckpointError, read_meta,
                                 restore_variables, status, step_directory, verify)

from conftest import DIGITS_RUN

ROOT = Path(__file__).resolve().parents[1]
FLIPPED = 64  # bytes flipped in each chunk, the file's size unchanged


def meta(epoch: int) -> dict:
    return {"epoch": epoch, "dataset": "digits", "config": {}, "history": {"test_acc": [epoch]}}


def state(value: float) -> dict:
    """A train state's shape in small: arrays of floats, an integer step."""
    return {"params": {"conv": {"kernel": jnp.full((64, 64), value, jnp.float32)},
                       "fc": {"bias": jnp.arange(10, dtype=jnp.float32) + value}},
            "batch_stats": {"bn": {"mean": jnp.full((32,), value, jnp.float32)}},
            "step": jnp.int32(value)}


def saved(directory: Path, epochs=(1, 2, 3), best=(1, 2)) -> Checkpoints:
    """Epochs saved as fit saves them: best/ first on a new best, then latest/."""
    checkpoints = Checkpoints(directory)
    for epoch in epochs:
        checkpoints.save(epoch, state(float(epoch)), meta(epoch), is_best=epoch in best)
    return checkpoints


def chunks(step_dir: Path) -> list[Path]:
    """The files that hold a step's arrays (orbax names them by content, in a `d/` folder)."""
    found = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d")
    assert found, f"no array chunk in {step_dir}"
    return found


def flip(path: Path, count: int = FLIPPED) -> None:
    data = bytearray(path.read_bytes())
    middle = max(0, len(data) // 2 - count // 2)
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(data)


def names(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.glob("*/*"))


def unverified_step(step_dir: Path, value: float, epoch: int) -> Path:
    """A step as checkpoints were written before they carried digests: orbax alone."""
    with ocp.CheckpointManager(step_dir.parent, item_names=checkpoint.ITEMS) as manager:
        manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state(value)),
                                                    meta=ocp.args.JsonSave(meta(epoch))))
    return step_dir


# --- the manifest ----------------------------------------------------------------------------

def test_each_save_commits_with_a_manifest_written_last_that_sha256sum_checks(tmp_path):
    checkpoints = saved(tmp_path)
    # latest/ keeps two committed steps (one to fall back to), best/ one.
    assert names(tmp_path) == ["best/2", "latest/2", "latest/3"]
    assert checkpoints.committed() == ["latest/3", "latest/2", "best/2"]
    step = tmp_path / "latest" / "3"
    listed = [line.split("  ", 1)[1] for line in (step / MANIFEST).read_text().splitlines()]
    every_file = sorted(str(p.relative_to(step)) for p in step.rglob("*")
                        if p.is_file() and p.name != MANIFEST)
    assert listed == every_file and "meta/metadata" in listed and "_CHECKPOINT_METADATA" in listed
    checked = subprocess.run(["sha256sum", "--check", "--strict", MANIFEST], cwd=step,
                             capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stdout.count(": OK") == len(listed)
    assert status(step) == "committed" and verify(step) is True
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*orbax-checkpoint-tmp*"))
    checkpoints.close()


def test_resume_takes_the_newest_epoch_latest_before_best(tmp_path):
    checkpoints = saved(tmp_path, epochs=(1, 2), best=(1, 2))
    lines = []
    restored = checkpoints.resume(state(0.0), log=lines.append)
    assert restored.step_dir == tmp_path / "latest" / "2" and lines == []
    assert restored.meta == meta(2)
    jax.tree.map(np.testing.assert_array_equal, restored.state, state(2.0))


def test_a_step_without_its_manifest_was_never_committed_and_is_ignored(tmp_path):
    """A kill between orbax's rename and the manifest: orbax's metadata promises a manifest."""
    checkpoints = saved(tmp_path)
    (tmp_path / "latest" / "3" / MANIFEST).unlink()
    assert status(tmp_path / "latest" / "3") == "uncommitted"
    assert step_directory(tmp_path, "latest") == tmp_path / "latest" / "2"
    with pytest.raises(DamagedCheckpointError, match=r"latest/3 was never committed"):
        verify(tmp_path / "latest" / "3")
    lines = []
    restored = checkpoints.resume(state(0.0), log=lines.append)
    assert restored.step_dir == tmp_path / "latest" / "2" and lines == []  # not damage: no word
    assert names(tmp_path) == ["best/2", "latest/2"]  # the resumed run writes epoch 3 again


# --- damage ----------------------------------------------------------------------------------

def test_flipped_bytes_are_named_and_resume_falls_back_to_the_previous_checkpoint(tmp_path):
    checkpoints = saved(tmp_path)
    damaged = tmp_path / "latest" / "3"
    for chunk in chunks(damaged):
        size = chunk.stat().st_size
        flip(chunk)
        assert chunk.stat().st_size == size
    first = chunks(damaged)[0].relative_to(damaged)
    with pytest.raises(DamagedCheckpointError, match=rf"{damaged} is damaged: its file {first} "
                                                     rf"does not match its SHA-256"):
        verify(damaged)
    lines = []
    restored = checkpoints.resume(state(0.0), log=lines.append)
    assert len(lines) == 1 and str(first) in lines[0] and "skipping it" in lines[0]
    assert restored.step_dir == tmp_path / "latest" / "2"
    jax.tree.map(np.testing.assert_array_equal, restored.state, state(2.0))
    assert names(tmp_path) == ["best/2", "latest/2"]  # the damaged one is gone


def test_every_damage_falls_back_latest_then_best_and_none_left_is_an_error(tmp_path):
    checkpoints = saved(tmp_path)
    for chunk in chunks(tmp_path / "latest" / "3")[:1]:
        chunk.write_bytes(chunk.read_bytes()[:-100])  # truncated
    (tmp_path / "latest" / "2" / "meta" / "metadata").unlink()  # missing
    lines = []
    restored = checkpoints.resume(state(0.0), log=lines.append)
    assert restored.step_dir == tmp_path / "best" / "2"  # the newest intact epoch
    assert "latest/3 is damaged: its file" in lines[0]
    assert "latest/2 is damaged: its file meta/metadata is missing" in lines[1]
    assert len(lines) == 2
    # latest/ holds the epoch again, as an uninterrupted run's does.
    assert names(tmp_path) == ["best/2", "latest/2"] and verify(tmp_path / "latest" / "2")
    assert read_meta(tmp_path / "latest" / "2") == meta(2)

    for step in ("best/2", "latest/2"):
        flip(chunks(tmp_path / step)[0])
    with pytest.raises(DamagedCheckpointError, match=r"no intact checkpoint to resume from in "
                                                     r".* \(damaged: latest/2, best/2\)"):
        checkpoints.resume(state(0.0), log=lines.append)


def test_a_truncated_chunk_and_garbage_json_are_named(tmp_path):
    saved(tmp_path, epochs=(1,), best=(1,))
    step = tmp_path / "best" / "1"
    chunk = chunks(step)[0]
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(DamagedCheckpointError, match=rf"its file {chunk.relative_to(step)} does "
                                                     r"not match"):
        verify(step)
    latest = tmp_path / "latest" / "1"
    (latest / "meta" / "metadata").write_text("{garbage")
    with pytest.raises(DamagedCheckpointError, match="its file meta/metadata does not match"):
        verify(latest)
    with pytest.raises(DamagedCheckpointError, match=rf"{latest} is damaged: meta/metadata is not "
                                                     r"valid JSON \(Expecting property name"):
        read_meta(latest)


def test_a_garbage_or_unreadable_manifest_is_damage(tmp_path):
    saved(tmp_path, epochs=(1,), best=())
    step = tmp_path / "latest" / "1"
    good = (step / MANIFEST).read_text()
    for text, error in [("not a digest line\n", "line 1 is not"), ("", "lists no file"),
                        (f"{'0' * 64}  ../../run.json\n", "line 1 is not"),
                        (good.replace("  ", " ", 1), "line 1 is not"),
                        (good.replace(good[:8], "0" * 8, 1), "does not match")]:
        (step / MANIFEST).write_text(text)
        with pytest.raises(DamagedCheckpointError, match=error):
            verify(step)
    (step / MANIFEST).write_text(good)
    assert verify(step) is True  # the negative control: the same step, its manifest restored


def test_values_that_are_not_finite_are_refused_naming_the_array(tmp_path):
    checkpoints = Checkpoints(tmp_path)
    bad = state(1.0)
    bad["params"]["fc"]["bias"] = bad["params"]["fc"]["bias"].at[3].set(jnp.nan)
    checkpoints.save(1, bad, meta(1), is_best=True)
    step = tmp_path / "best" / "1"
    assert verify(step) is True  # written so, not damaged on disk: still unusable
    target = {k: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), v)
              for k, v in state(0.0).items() if k in ("params", "batch_stats")}
    with pytest.raises(DamagedCheckpointError, match=rf"{step} holds non-finite values in "
                                                     r"params/fc/bias"):
        restore_variables(step, target)
    with pytest.raises(DamagedCheckpointError, match="no intact checkpoint"):
        checkpoints.resume(state(0.0), log=lambda line: None)


# --- checkpoints from before digests ---------------------------------------------------------

def test_a_checkpoint_without_digests_is_read_unverified_with_a_note(tmp_path, capfd):
    step = unverified_step(tmp_path / "latest" / "4", 4.0, 4)
    assert not (step / MANIFEST).exists()
    assert status(step) == "unverified" and verify(step) is False
    assert step_directory(tmp_path, "latest") == step
    lines = []
    restored = Checkpoints(tmp_path).resume(state(0.0), log=lines.append)
    assert restored.step_dir == step and restored.meta == meta(4)
    assert lines == [f"note: {step} has no {MANIFEST} (written before checkpoints carried "
                     f"digests): read unverified"]
    # What it cannot check it cannot see; what it reads it still refuses, in one line.
    chunk = chunks(step)[0]
    chunk.write_bytes(chunk.read_bytes()[:10])
    target = {k: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), v)
              for k, v in state(0.0).items() if k in ("params", "batch_stats")}
    capfd.readouterr()
    with pytest.raises(DamagedCheckpointError, match=rf"{step} is damaged: its arrays cannot be "
                                                     r"read \(ValueError: "):
        restore_variables(step, target)
    assert capfd.readouterr().err == ""
    (step / "meta" / "metadata").write_text("[1, 2")
    with pytest.raises(DamagedCheckpointError, match=r"meta/metadata is not valid JSON"):
        read_meta(step)


def test_a_resumed_old_run_commits_its_next_epochs_and_prunes_the_old_step(tmp_path):
    unverified_step(tmp_path / "latest" / "1", 1.0, 1)
    checkpoints = Checkpoints(tmp_path)
    assert checkpoints.resume(state(0.0), log=lambda line: None).meta["epoch"] == 1
    for epoch in (2, 3):
        checkpoints.save(epoch, state(float(epoch)), meta(epoch), is_best=False)
    assert names(tmp_path) == ["latest/2", "latest/3"]
    assert all(verify(tmp_path / "latest" / s) for s in ("2", "3"))


# --- a write that fails ----------------------------------------------------------------------

@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past `nbytes` fail with EFBIG ('File too large'; Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_failed_write_is_one_oserror_naming_the_step_and_nothing_else_is_printed(
        tmp_path, capfd):
    checkpoints = saved(tmp_path, epochs=(1,), best=(1,))
    big = state(2.0)
    big["params"]["conv"]["kernel"] = jax.random.normal(jax.random.key(0), (512, 1024))  # 2 MiB
    capfd.readouterr()
    with file_size_limit(1 << 20), pytest.raises(OSError) as error:
        checkpoints.save(2, big, meta(2), is_best=True)
    assert str(error.value) == f"[Errno 27] File too large: '{tmp_path / 'best' / '2'}'"
    assert capfd.readouterr().err == ""  # no orbax, absl or asyncio report
    assert names(tmp_path) == ["best/1", "latest/1"]  # the partial step is gone
    assert verify(tmp_path / "best" / "1") and verify(tmp_path / "latest" / "1")
    checkpoints.save(2, big, meta(2), is_best=True)  # the disk has room again
    assert names(tmp_path) == ["best/2", "latest/1", "latest/2"]



def test_writes_that_fail_after_the_error_was_raised_are_not_reported_again(
        tmp_path, caplog, monkeypatch):
    """On a busy machine orbax's other writes of the step may end after the first failure was
    raised: tensorstore then wakes orbax's closed event loop (an unraisable "Event loop is
    closed"), and asyncio reports each failed write when it is collected. After a storage
    error those reports are dropped; other unraisable exceptions and asyncio's other reports
    are not."""
    import asyncio
    import threading

    import tensorstore as ts

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(u.exc_value))
    failed = ValueError("RESOURCE_EXHAUSTED: Error writing x: No space left on device "
                        "[os_error_code='28']")
    in_flight, write = ts.Promise.new()

    def save_like_orbax():  # a loop closed with a task still waiting for a write
        async def first_write_fails():
            asyncio.ensure_future(write)
            await asyncio.sleep(0)
            raise failed
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(first_write_fails())
        finally:
            loop.close()

    with pytest.raises(OSError):
        checkpoint._orbax(save_like_orbax,
                          lambda e: checkpoint._storage_failure(e, tmp_path / "best" / "2"))
    ends = threading.Thread(target=in_flight.set_exception, args=(ValueError(f"late: {failed}"),))
    ends.start()
    ends.join()

    class FailsWhenCollected:
        def __del__(self):
            raise RuntimeError("something else")
    FailsWhenCollected()
    assert [repr(e) for e in unraisable] == ["RuntimeError('something else')"]

    caplog.clear()
    loop = asyncio.new_event_loop()
    try:
        for exception in (ValueError(f"late: {failed}"), RuntimeError("something else")):
            future = loop.create_future()
            future.set_exception(exception)
            del future  # collected unretrieved: asyncio logs it through logging.getLogger
    finally:
        loop.close()
    reported = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(reported) == 1 and "something else" in reported[0]


def test_a_failed_events_or_figure_write_names_the_file(tmp_path):
    from matplotlib.figure import Figure

    from cbam_jax.logbook import Logbook, _save_png

    book = Logbook(tmp_path)
    with file_size_limit(64 << 10), pytest.raises(OSError) as error:
        book.hyperparameters({"text": "y" * (200 << 10)})
    assert (error.value.filename, error.value.strerror) == (str(book.path), "File too large")
    book.close()
    figure = Figure(figsize=(8, 8))
    figure.add_subplot().imshow(np.random.default_rng(0).random((400, 400)))
    with file_size_limit(16 << 10), pytest.raises(OSError) as error:
        _save_png(figure, tmp_path / "big.png")
    assert (error.value.filename, error.value.strerror) == (str(tmp_path / "big.png"),
                                                            "File too large")
    assert not list(tmp_path.glob("big.png*"))


# --- the command lines -----------------------------------------------------------------------


def run(script: str, *args, cache: Path, env=None, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    flags = ["--compile-cache", str(cache)] if script == "train.py" else []
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args),
                           *flags], env=env, capture_output=True, text=True, timeout=900,
                          **kwargs)


@pytest.fixture(scope="module")
def cache():
    """The pytest run's compilation cache (tests/conftest.py): compiled once for every run."""
    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])


@contextlib.contextmanager
def small_disk(size_mb: int):
    """A tmpfs of `size_mb` (root may mount one here), or None where mounting is refused."""
    folder = Path(tempfile.mkdtemp(prefix="small_disk_"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs",
                              str(folder)], capture_output=True).returncode == 0
    try:
        yield folder if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)
        shutil.rmtree(folder, ignore_errors=True)


def set_file_size_limit():  # in the child, before it runs
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))


@pytest.fixture(scope="module")
def one_epoch(cache, tmp_path_factory):
    """A run directory whose epoch 1 is committed (a run names no path of its own in it: a copy
    resumes as the run would)."""
    run_dir = tmp_path_factory.mktemp("one_epoch") / "run"
    first = run("train.py", *DIGITS_RUN, "--epochs", 1, "--run-dir", run_dir, cache=cache)
    assert first.returncode == 0, first.stderr[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["disk full", "file size limit"])
def test_a_run_that_runs_out_of_space_ends_in_one_error_line_keeping_its_checkpoints(
        failure, one_epoch, cache, tmp_path):
    """A copy of a run whose epoch 1 is committed resumes; then the disk is full (a tmpfs filled
    to 2 MB of room), or writes past 1 MiB fail (where no tmpfs can be mounted, both cases use
    the limit)."""
    with small_disk(64) as disk:
        run_dir = (disk or tmp_path) / "run"
        shutil.copytree(one_epoch, run_dir)
        limit, cause = {}, "File too large"
        if failure == "disk full" and disk is not None:
            free = shutil.disk_usage(disk).free
            with open(disk / "filler", "wb") as f:
                f.truncate(0)
                f.write(b"\0" * (free - (2 << 20)))
            cause = "No space left on device"
        else:
            limit = {"preexec_fn": set_file_size_limit}
        second = run("train.py", *DIGITS_RUN, "--epochs", 2, "--resume", run_dir, cache=cache,
                     **limit)
        lines = second.stderr.splitlines()
        assert second.returncode == 1 and len(lines) == 1, second.stderr[-3000:]
        assert lines[0].startswith(f"error: cannot write {run_dir / 'checkpoints'}/")
        assert f": {cause}. Kept in {run_dir / 'checkpoints'}: latest/1, best/1." in lines[0]
        assert names(run_dir / "checkpoints") == ["best/1", "latest/1"]
        assert all(verify(run_dir / "checkpoints" / kind / "1") for kind in ("latest", "best"))


@pytest.fixture(scope="module")
def damaged_run(cache, tmp_path_factory):
    """A 2-epoch digits run whose epoch-2 checkpoints (latest/2, and best/2 if it is one) have
    64 bytes flipped in each array chunk, and an uninterrupted 3-epoch run to compare with."""
    root = tmp_path_factory.mktemp("damaged")
    for name, epochs in (("whole", 3), ("run", 2)):
        result = run("train.py", *DIGITS_RUN, "--epochs", epochs, "--run-dir", root / name,
                     cache=cache)
        assert result.returncode == 0, result.stderr[-3000:]
    run_dir = root / "run"
    damaged = [p for p in (run_dir / "checkpoints").glob("*/2")]
    for step in damaged:
        for chunk in chunks(step):
            flip(chunk)
    return root, run_dir, damaged


@pytest.mark.slow
def test_evaluate_and_predict_refuse_a_damaged_checkpoint_in_one_line(damaged_run, tmp_path):
    _, run_dir, damaged = damaged_run
    step = run_dir / "checkpoints" / "latest" / "2"
    evaluated = run("evaluate.py", run_dir, "--which", "latest", "--out-dir", tmp_path,
                    cache=None)
    assert evaluated.returncode == 1, evaluated.stdout[-2000:]
    (line,) = evaluated.stderr.splitlines()
    assert line.startswith(f"error: checkpoint {step} is damaged: its file state/")
    assert line.endswith(f"does not match its SHA-256 in {MANIFEST}")
    assert "nan" not in evaluated.stdout and not list(tmp_path.iterdir())
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "image.png")
    predicted = run("predict.py", step, tmp_path / "image.png", "--no-figures", cache=None)
    assert predicted.returncode == 1 and "nan" not in predicted.stdout
    assert predicted.stderr.splitlines() == [line]
    if step.parent.parent / "best" / "2" not in damaged:  # the other checkpoint, when asked
        assert run("evaluate.py", run_dir, "--which", "best", "--out-dir", tmp_path,
                   cache=None).returncode == 0


@pytest.mark.slow
def test_resume_skips_the_damaged_checkpoints_and_ends_as_an_uninterrupted_run(damaged_run,
                                                                                cache):
    root, run_dir, damaged = damaged_run
    resumed = run("train.py", *DIGITS_RUN, "--epochs", 3, "--resume", run_dir, cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    skipped = [line for line in resumed.stdout.splitlines() if "skipping it" in line]
    assert sorted(line.split()[1] for line in skipped) == sorted(map(str, damaged))
    assert all(f"does not match its SHA-256 in {MANIFEST}" in line for line in skipped)
    assert f"Resuming from {run_dir / 'checkpoints' / 'latest' / '1'} after epoch 1" \
        in resumed.stdout
    whole = root / "whole" / "checkpoints"
    ours = run_dir / "checkpoints"
    assert names(ours) == names(whole)
    for name in names(whole):
        assert verify(ours / name)
        with ocp.StandardCheckpointer() as reader:
            theirs_state, ours_state = (reader.restore(d / name / "state") for d in (whole, ours))
        jax.tree.map(np.testing.assert_array_equal, ours_state, theirs_state)
        theirs_meta, ours_meta = (json.loads((d / name / "meta" / "metadata").read_text())
                                  for d in (whole, ours))
        for record in (theirs_meta, ours_meta):
            for timing in ("epoch_time", "images_per_s"):
                del record["history"][timing]
            del record["config"]["epochs"]  # the damaged run was started for 2
        assert ours_meta == theirs_meta, name
    # The logbook resumed from the epoch restored: the damaged epoch's records were dropped
    # and written again, once, as the uninterrupted run wrote them. (The hyperparameters list
    # --epochs, which differ.)
    ours, theirs = events(run_dir), events(root / "whole")
    for records in (ours, theirs):
        del records["Hyperparameters/text_summary"]
    assert ours == theirs and ours["Test/Epoch_Loss"][-1][0] == 2
    assert {"Train/Batch_Loss", "Train/Learning_Rate", "weights/fc2.weight"} <= ours.keys()


def events(run_dir: Path) -> dict:
    """tag -> [(step, value)] over the run's event files, but for wall-clock tags."""
    from cbam_jax.logbook import event_files, read_events

    records = {}
    for path in event_files(run_dir):
        for event in read_events(path, strict=True):
            for value in event.summary.value:
                if value.tag not in ("Train/Epoch_Time_s", "Train/Images_per_s"):
                    records.setdefault(value.tag, []).append(
                        (event.step, value.SerializeToString(deterministic=True)))
    return {tag: sorted(steps) for tag, steps in records.items()}
