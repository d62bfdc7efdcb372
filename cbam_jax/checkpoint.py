"""Orbax checkpoints of a training run: `latest/` (every epoch) and `best/` (by test accuracy).

Each checkpoint holds the train state (params, batch_stats, optimizer state, step, PRNG key)
and a JSON record of the rest (epoch, plateau schedule, metric histories, settings), which is
everything a resumed run needs to finish exactly as an uninterrupted one would.

Checkpoints verify themselves. Orbax writes a step into a temporary directory and renames it;
then `SHA256SUMS` (the format of coreutils' `sha256sum`: `sha256sum -c SHA256SUMS` in the step
directory checks it by hand) records the SHA-256 digest of every file of the step, after each
file is synced to disk. It is written last, atomically, and it is the step's commit mark:

- committed: the step has its SHA256SUMS. Reading it first checks every digest; a file that is
  missing, unreadable or changed makes the checkpoint damaged (`DamagedCheckpointError`, one
  line naming the file and the checkpoint).
- not committed: orbax's step metadata promises a SHA256SUMS but there is none (a kill between
  orbax's rename and the manifest, or a manifest deleted). Such a step is ignored, as orbax
  ignores its temporary directories; a resumed run removes it.
- unverified: neither a SHA256SUMS nor the promise: a checkpoint written before checkpoints
  carried digests. It is read as before, and the reader is told that it is unverified.

`latest/` keeps the newest 2 committed steps and `best/` the newest 1; older ones are removed
only after the new one is committed. `Checkpoints.resume` takes the newest intact checkpoint:
newest epoch first, `latest/` before `best/` at the same epoch, skipping damaged ones.

A failed write (disk full, permission denied) is an `OSError` naming the step directory and
the cause. Orbax reports one failed write dozens of times before it raises (its threads log
through absl, tensorstore's late callbacks print 'Event loop is closed', the abandoned writes'
coroutines complain at exit): those reports are held back while orbax works and dropped when
the failure is raised as one error, unless the environment sets CBAM_JAX_DEBUG=1, which leaves
orbax's own reports and exceptions as they are.
"""
import contextlib
import gc
import hashlib
import logging
import os
import re
import shutil
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from cbam_jax import distributed
from cbam_jax.recipe import debugging

ITEMS = ("state", "meta")
MANIFEST = "SHA256SUMS"
KEEP = {"latest": 2, "best": 1}  # committed steps kept in each directory
# Orbax's custom step metadata, written before its rename: this step gets a MANIFEST.
_PROMISE = {"cbam_jax": {"manifest": MANIFEST}}
_MANIFEST_LINE = re.compile(r"([0-9a-f]{64})  (.+)")


class DamagedCheckpointError(ValueError):
    """A checkpoint that fails its digests or cannot be read; the message names the file."""


class Restored(NamedTuple):
    state: Any
    meta: dict
    step_dir: Path  # the checkpoint it came from


# --- the manifest ----------------------------------------------------------------------------

def _files(step_dir: Path) -> list[str]:
    """Every file of a step (but its manifest), relative, in a fixed order."""
    return sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")
                  if p.is_file() and not p.name.startswith(MANIFEST))


def _sha256(path: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
        if sync:  # on disk before the manifest that says it is there
            os.fsync(f.fileno())
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(step_dir) -> None:
    """Commit a step orbax has written: the digest of each of its files into SHA256SUMS,
    written to a temporary file, synced and renamed, so it is whole or absent."""
    step_dir = Path(step_dir)
    names = _files(step_dir)
    lines = "".join(f"{_sha256(step_dir / name, sync=True)}  {name}\n" for name in names)
    for folder in {(step_dir / name).parent for name in names}:  # the files' names, too
        _fsync_dir(folder)
    tmp = step_dir / f"{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / MANIFEST)
    _fsync_dir(step_dir)
    _fsync_dir(step_dir.parent)  # orbax's rename of the step


def _read_manifest(step_dir: Path) -> dict[str, str]:
    def damaged(what):
        return DamagedCheckpointError(f"checkpoint {step_dir} is damaged: {MANIFEST} {what}")

    try:
        text = (step_dir / MANIFEST).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise damaged(f"cannot be read ({getattr(e, 'strerror', None) or e})") from None
    digests = {}
    for number, line in enumerate(text.splitlines(), start=1):
        found = _MANIFEST_LINE.fullmatch(line)
        name = found and found.group(2)
        if not found or name.startswith("/") or ".." in name.split("/"):
            raise damaged(f"line {number} is not '<sha256>  <file in the step>'")
        digests[name] = found.group(1)
    if not digests:
        raise damaged("lists no file")
    return digests


def status(step_dir) -> str:
    """'committed' (it has its SHA256SUMS), 'uncommitted' (orbax's metadata promises one that
    is not there) or 'unverified' (written before checkpoints carried digests)."""
    step_dir = Path(step_dir)
    if (step_dir / MANIFEST).is_file():
        return "committed"
    try:
        with _reports_held():
            custom = ocp.metadata.get_step_metadata(step_dir).custom_metadata or {}
    except Exception:  # no readable step metadata: no promise either
        custom = {}
    return "uncommitted" if custom.get("cbam_jax") == _PROMISE["cbam_jax"] else "unverified"


def verify(step_dir) -> bool:
    """Check a checkpoint's files against its SHA256SUMS: True if it holds, False for a
    checkpoint without digests (written before they existed). DamagedCheckpointError names the
    file that is missing, unreadable or changed, or a step that was never committed."""
    step_dir = Path(step_dir)
    state = status(step_dir)
    if state == "unverified":
        return False
    if state == "uncommitted":
        raise DamagedCheckpointError(
            f"checkpoint {step_dir} was never committed: it has no {MANIFEST} (the run stopped "
            f"while saving it); use an earlier one")
    for name, expected in _read_manifest(step_dir).items():
        try:
            actual = _sha256(step_dir / name)
        except OSError as e:
            cause = "is missing" if isinstance(e, FileNotFoundError) else (
                f"cannot be read ({e.strerror or e})")
            raise DamagedCheckpointError(
                f"checkpoint {step_dir} is damaged: its file {name} {cause}") from None
        if actual != expected:
            raise DamagedCheckpointError(
                f"checkpoint {step_dir} is damaged: its file {name} does not match its SHA-256 "
                f"in {MANIFEST}")
    return True


def unverified_note(step_dir) -> str:
    return (f"note: {step_dir} has no {MANIFEST} (written before checkpoints carried digests): "
            f"read unverified")


def _steps(directory: Path) -> list[Path]:
    """The committed and unverified steps of a best/ or latest/ directory, newest first."""
    if not directory.is_dir():
        return []
    # Orbax names each step by its number; a save that a kill interrupted is a '*.orbax-
    # checkpoint-tmp' directory beside them, never a bare number.
    steps = [p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()]
    return sorted((p for p in steps if status(p) != "uncommitted"), key=lambda p: -int(p.name))


def _remove(step_dir: Path) -> None:
    """Un-commit first (a kill while deleting leaves a step that is ignored), then delete."""
    (step_dir / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(step_dir, ignore_errors=True)


# --- holding back orbax's reports of a failure -----------------------------------------------

class _Held:
    """What absl's logger and the unraisable hook received while orbax worked, as text (no
    reference to the exceptions, so their frames can be collected)."""

    def __init__(self):
        self.records, self.unraisable = [], []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        self.records.append(record)
        return False

    def hook(self, unraisable) -> None:
        lines = traceback.format_exception(unraisable.exc_type, unraisable.exc_value,
                                           unraisable.exc_traceback)
        self.unraisable.append("".join(lines))


@contextlib.contextmanager
def _reports_held():
    """While orbax reads or writes: what its threads log through absl and what tensorstore's
    callbacks report as unraisable exceptions is held back, then shown if the block succeeded.
    If it raised, they were that exception told dozens of times over, and are dropped, as are
    the reports of the work it abandoned, which end later: the exception itself says what
    failed. CBAM_JAX_DEBUG=1 holds nothing back."""
    if debugging():
        yield
        return
    held, absl, hook = _Held(), logging.getLogger("absl"), sys.unraisablehook
    absl.addFilter(held.filter)
    sys.unraisablehook = held.hook
    try:
        yield
    except BaseException:
        _drop_late_reports_of_abandoned_writes(hook)  # in place before the held ones go
        raise
    else:
        sys.unraisablehook = hook
    finally:
        absl.removeFilter(held.filter)
    for record in held.records:
        absl.handle(record)
    for text in held.unraisable:
        sys.stderr.write(text)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _storage_failure(error: Exception, path: Path) -> OSError | None:
    """The OSError a failed orbax write stands for, naming `path`; None if it is not one.
    Tensorstore's errors are ValueErrors that carry the OS error's number."""
    if isinstance(error, OSError):
        return OSError(error.errno, error.strerror or str(error), str(path))
    found = re.search(r"os_error_code='?(\d+)", str(error))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code), str(path))
    return None


def _not_an_abandoned_write(record: logging.LogRecord) -> bool:
    """A filter for asyncio's logger: False for a failed orbax write's "exception was never
    retrieved" (tensorstore's errors carry the OS error's number), True for anything else."""
    text = record.getMessage()
    return not ("exception was never retrieved" in text and "os_error_code" in text)


class _LateWakeUpsDropped:
    """sys.unraisablehook less tensorstore's wake-ups of a closed event loop: a write that
    ends after orbax gave up on it and closed the loop that was waiting for it."""

    def __init__(self, hook):
        self.hook = hook

    def __call__(self, unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            self.hook(unraisable)


def _drop_late_reports_of_abandoned_writes(unraisablehook) -> None:
    """After orbax failed, its other reads or writes may still be in flight; each ends later
    (on a busy machine, after the error was raised) and is reported where it ends:
    tensorstore's "Event loop is closed" (orbax closed the loop that waited for it), asyncio's
    "exception was never retrieved" of a failed write, a write's coroutine "never awaited".
    From now on these reports are dropped, on top of `unraisablehook`; every other report
    still shows."""
    if not isinstance(unraisablehook, _LateWakeUpsDropped):
        unraisablehook = _LateWakeUpsDropped(unraisablehook)
    sys.unraisablehook = unraisablehook
    logging.getLogger("asyncio").addFilter(_not_an_abandoned_write)  # a no-op when there
    warnings.filterwarnings("ignore", category=RuntimeWarning,
                            message=r"coroutine 'async_serialize_from_host\.")


def _orbax(run, failure):
    """run() with orbax's reports held; an exception that `failure(e)` turns into one of this
    module's errors is raised as that, after the abandoned work is collected (its coroutines
    end now, quietly, not at exit)."""
    with _reports_held():
        error = None
        try:
            return run()
        except Exception as e:
            error = failure(e)
            if error is None or debugging():
                raise
        gc.collect()
        raise error


# --- what is read back -----------------------------------------------------------------------

def _check_finite(step_dir: Path, tree) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if (jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)
                and not np.isfinite(np.asarray(leaf)).all()):  # replicated: one copy is read
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            raise DamagedCheckpointError(f"checkpoint {step_dir} holds non-finite values in "
                                         f"{name}: it cannot be used")


def read_meta(step_dir) -> dict:
    """The JSON record of one checkpoint step (epoch, data set, settings, history)."""
    step_dir = Path(step_dir).absolute()
    path = step_dir / "meta" / "metadata"
    try:
        meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "meta")
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise DamagedCheckpointError(
            f"checkpoint {step_dir} is damaged: {path.relative_to(step_dir)} is not valid JSON "
            f"({e})") from None
    except FileNotFoundError:
        raise DamagedCheckpointError(f"checkpoint {step_dir} is damaged: its file "
                                     f"{path.relative_to(step_dir)} is missing") from None
    if not isinstance(meta, dict) or not {"epoch", "dataset", "config", "history"} <= meta.keys():
        raise DamagedCheckpointError(f"checkpoint {step_dir} is damaged: "
                                     f"{path.relative_to(step_dir)} is not a run's record")
    return meta


def _unreadable(step_dir: Path):
    def failure(error):
        return DamagedCheckpointError(f"checkpoint {step_dir} is damaged: its arrays cannot be "
                                      f"read ({_first_line(error)})")
    return failure


# --- the training side -----------------------------------------------------------------------

class Checkpoints:
    """Synchronous saves: a checkpoint is complete on disk before the next epoch starts.

    Nothing is created on disk until the first save: looking for a checkpoint to resume from
    leaves no empty directories behind. In a multi-process run every process calls `save`
    (orbax writes collectively: process 0 writes the replicated state); process 0 alone
    writes the manifest and removes old steps.
    """

    def __init__(self, directory):
        self.directory = Path(directory).absolute()
        self._checkpointer = None

    def _orbax(self) -> ocp.Checkpointer:
        if self._checkpointer is None:
            self._checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
        return self._checkpointer

    def save(self, epoch: int, state, meta: dict, is_best: bool):
        """best/ first, then latest/: a kill between the two leaves best/ holding the epoch,
        which a resume takes (the newest epoch first), writing latest/ again. A failed write
        raises an OSError naming the step; the partial step is removed and the committed ones
        are left as they were."""
        for name in ("best", "latest") if is_best else ("latest",):
            self._save(name, epoch, state, meta)

    def _save(self, name: str, epoch: int, state, meta: dict) -> None:
        step_dir = self.directory / name / str(epoch)

        def failure(error):
            if distributed.is_primary_process():  # free the space the partial step took
                for partial in step_dir.parent.glob(f"{step_dir.name}.orbax-checkpoint-tmp*"):
                    shutil.rmtree(partial, ignore_errors=True)
            return _storage_failure(error, step_dir)

        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(meta))
        # force: a step of this number can only be one a resumed run is replacing
        _orbax(lambda: self._orbax().save(step_dir, args=args, force=True,
                                          custom_metadata=_PROMISE), failure)
        if distributed.is_primary_process():
            try:
                write_manifest(step_dir)
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(step_dir)) from e
            self._prune(name, epoch)

    def _prune(self, name: str, epoch: int) -> None:
        """Keep the newest KEEP[name] committed steps up to `epoch`; remove every other step."""
        directory = self.directory / name
        kept = [p for p in _steps(directory) if int(p.name) <= epoch][:KEEP[name]]
        for step_dir in directory.iterdir():
            if step_dir.name.isdigit() and step_dir not in kept:
                _remove(step_dir)

    def committed(self) -> list[str]:
        """The checkpoints a reader would find, as 'latest/2', newest first."""
        return [f"{name}/{p.name}" for name in ("latest", "best")
                for p in _steps(self.directory / name)]

    def latest_epoch(self) -> int | None:
        steps = _steps(self.directory / "latest")
        return int(steps[0].name) if steps else None

    def latest_meta(self) -> dict:
        """The JSON record of the latest checkpoint alone (no arrays are read)."""
        return read_meta(self._newest("latest"))

    def restore_latest(self, target):
        """(state shaped like `target`, meta) of the latest checkpoint, verified."""
        return self._read(self._newest("latest"), target)

    def restore_best(self, target):
        return self._read(self._newest("best"), target)

    def resume(self, target, log=print) -> Restored | None:
        """The state (shaped like `target`) and meta of the newest intact checkpoint, or None if
        none was committed. Newest epoch first, latest/ before best/ at the same epoch; each
        damaged one is skipped with one line through `log`. The steps the resumed run will
        write again (newer than the one restored, damaged, or never committed) are removed; a
        checkpoint restored from best/ is written to latest/ again, as an uninterrupted run
        holds it there."""
        candidates = sorted(((int(p.name), -i, p) for i, name in enumerate(("latest", "best"))
                             for p in _steps(self.directory / name)), reverse=True)
        skipped = []
        for epoch, _, step_dir in candidates:
            try:
                verified = verify(step_dir)
                state, meta = self._read(step_dir, target, verified)
            except DamagedCheckpointError as e:
                log(f"{e}; skipping it")
                skipped.append(step_dir)
                continue
            if not verified:
                log(unverified_note(step_dir))
            self._clear(lambda p: p in skipped or int(p.name) > epoch)
            if step_dir.parent.name == "best":  # latest/ lost it (a kill, damage): as it was
                self._save("latest", epoch, state, meta)
            return Restored(state, meta, step_dir)
        if skipped:
            raise DamagedCheckpointError(
                f"no intact checkpoint to resume from in {self.directory} (damaged: "
                + ", ".join(str(p.relative_to(self.directory)) for p in skipped) + ")")
        self._clear(lambda p: True)
        return None

    def _clear(self, stale) -> None:
        """Remove orbax's temporary directories, uncommitted steps and the `stale` ones."""
        if not distributed.is_primary_process():
            return
        for name in ("latest", "best"):
            directory = self.directory / name
            for path in directory.iterdir() if directory.is_dir() else ():
                if not path.name.isdigit():
                    if ".orbax-checkpoint-tmp" in path.name:
                        shutil.rmtree(path, ignore_errors=True)
                elif status(path) == "uncommitted" or stale(path):
                    _remove(path)

    def _newest(self, name: str) -> Path:
        steps = _steps(self.directory / name)
        if not steps:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.directory / name}")
        return steps[0]

    def _read(self, step_dir: Path, target, verified: bool | None = None):
        if verified is None:
            verify(step_dir)
        meta = read_meta(step_dir)
        restored = _orbax(lambda: self._orbax().restore(step_dir, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))), _unreadable(step_dir))
        _check_finite(step_dir, restored.state)
        return restored.state, meta

    def close(self):
        if self._checkpointer is not None:
            self._checkpointer.close()


# --- reading one checkpoint for inference (cbam_jax.inference) -------------------------------

def step_directory(path, which: str = "best") -> Path:
    """The checkpoint that `path` names, as its step directory (`.../checkpoints/best/7`).

    `path` may be a run directory or its `checkpoints/` (then `which`, 'best' or 'latest', picks
    one), a `best/` or `latest/` directory (its newest committed step), or a step directory
    itself. Only the file system is read, so no JAX backend starts (a CPU device count can
    still be set). Whether the checkpoint is intact is `verify`'s question.
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which: expected 'best' or 'latest', got {which!r}")
    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory; expected a run directory, its "
                                f"checkpoints/, checkpoints/best or latest, or one step in them")
    if all((path / item).is_dir() for item in ITEMS):
        return path
    for sub in ("checkpoints", which):
        if (path / sub).is_dir():
            path = path / sub
    steps = _steps(path)
    if not steps:
        raise FileNotFoundError(
            f"{path} holds no checkpoint: expected a run directory (with checkpoints/best or "
            f"latest), a checkpoints/ directory, best/ or latest/, or a step directory in them "
            f"(with {' and '.join(f'{i}/' for i in ITEMS)})")
    return steps[0]


def restore_variables(step_dir, target) -> dict:
    """The model's {'params', 'batch_stats'} of one checkpoint step, shaped and placed like
    `target` (e.g. jax.ShapeDtypeStructs with a sharding). The optimizer's state is not read:
    inference needs only the variables, whatever the optimizer was. Values that are not finite
    are a DamagedCheckpointError, as are arrays orbax cannot read."""
    step_dir = Path(step_dir).absolute()
    variables = _orbax(lambda: ocp.PyTreeCheckpointer().restore(
        step_dir / "state", args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)), _unreadable(step_dir))
    _check_finite(step_dir, variables)
    return variables
