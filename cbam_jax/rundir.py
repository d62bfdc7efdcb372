"""A run directory has one owner and one history.

`claim` takes a run directory for the run about to train into it:

- a default directory is created atomically: `runs/CBAM_CNN_experiment`, then `_1`, `_2`, ...,
  each taken by an exclusive `mkdir` (`create_new`), so two runs started together get two;
- the run holds a lock on it for its whole life (`RunLock`: `fcntl.flock` on `run.lock`, which
  names the holder). The operating system releases it when the process ends, however it ends,
  so a killed run leaves no stale lock; a second writer is refused, naming the holder;
- a new run goes only into a new or empty directory (`check_unused`): a used one is refused
  unless the run resumes it, or `overwrite` replaces it, whole, by an empty one. Only a run
  directory (one whose `run.json` is a run record) is ever deleted.

`run.json` records what a resume needs to continue the run exactly (`new_record`): the recipe's
settings, the data set and where it was read from, the checkpoint directory, the devices. A
resume takes its settings from it (`recorded_settings`) and refuses one that would change the
result (`check_resume`; which settings those are is the recipe's `RESUME_KEYS`).

Standard library only: the command line settles all this before JAX starts (the record sets the
batch size and the device count).
"""
import dataclasses
import datetime
import fcntl
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from cbam_jax.recipe import DEFAULT_RUN_DIR, RESUME_KEYS, RUN_RECORD, TrainConfig, flag_of

LOCK_FILE = "run.lock"


class RunDirError(ValueError):
    """A run directory that cannot be used as asked; the message, one line, says what to do."""


class ResumeMismatchError(RunDirError):
    """A resumed run was given settings that would make it differ from the interrupted one."""


# --- default run directories -----------------------------------------------------------------

def numbered(base: str = DEFAULT_RUN_DIR) -> Iterator[Path]:
    """`base`, `base_1`, `base_2`, ...: the tutorial's names for successive runs."""
    yield Path(base)
    i = 1
    while True:
        yield Path(f"{base}_{i}")
        i += 1


def create_new(base: str = DEFAULT_RUN_DIR) -> Path:
    """Create the first of `base`, `base_1`, ... that does not exist, and return it. Each name is
    taken by `mkdir`, which fails if another process took it first: no two callers get one."""
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    for path in numbered(base):
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def latest(base: str = DEFAULT_RUN_DIR) -> Path | None:
    """The most recent directory `create_new` made (the last before the first free name), or
    None."""
    found = None
    for path in numbered(base):
        if not path.exists():
            return found
        found = path


# --- the lock --------------------------------------------------------------------------------

class RunLock:
    """An exclusive lock on a run directory, from `acquire` until `release` or the end of the
    process: an `fcntl.flock` on `run_dir/run.lock`, so the kernel lets go when the process
    dies, even by `kill -9`. The file names its holder for the message of the next one; a clean
    release removes it."""

    def __init__(self, run_dir: Path, fd: int):
        self.run_dir, self.fd = run_dir, fd

    @classmethod
    def acquire(cls, run_dir) -> "RunLock":
        run_dir = Path(run_dir)
        path = run_dir / LOCK_FILE
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RunDirError(f"cannot lock {run_dir}: {e.strerror} ({path})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunDirError(f"{run_dir} is in use by {holder}: a run directory has one "
                                  f"writer at a time; wait for it to end, or train into another "
                                  f"--run-dir") from None
            except OSError as e:  # e.g. a file system without locks
                os.close(fd)
                raise RunDirError(f"cannot lock {path}: {e.strerror}") from None
            # A holder removes the file before it lets go: locking a removed file locks nothing.
            if _same_file(fd, path):
                break
            os.close(fd)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": started})
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode() + b"\n", 0)
        return cls(run_dir, fd)

    def release(self) -> None:
        if self.fd is None:
            return
        path = self.run_dir / LOCK_FILE
        if _same_file(self.fd, path):  # removed while still held: see `acquire`
            path.unlink()
        os.close(self.fd)  # lets go of the lock
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says (it may not have written it yet)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"process {holder['pid']} on {holder['host']} (started {holder['started']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


# --- taking a run directory ------------------------------------------------------------------

def claim(run_dir=None, *, resume: bool = False, overwrite: bool = False,
          checkpoint_dir=None) -> RunLock:
    """Take a run directory for this process's run, locked until the lock is released.

    `run_dir` None: a new default directory (`create_new`). `resume`: the run in `run_dir`
    continues. Else a new run, in `run_dir` if it is new or empty; `overwrite` first replaces a
    run directory, whole, by an empty one (`replace_with_empty`). An external `checkpoint_dir`
    that already holds checkpoints is refused (never deleted)."""
    if run_dir is None:
        return RunLock.acquire(create_new())
    run_dir = Path(run_dir)
    if not resume:
        _check_checkpoints_unused(checkpoint_dir, run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise RunDirError(f"{run_dir} is a file, not a run directory") from None
        except OSError as e:
            raise RunDirError(f"cannot create {run_dir}: {e.strerror}") from None
    lock = RunLock.acquire(run_dir)
    try:
        if overwrite and _contents(run_dir):
            lock = replace_with_empty(lock)
        if not resume:
            check_unused(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def _contents(run_dir: Path) -> list[str]:
    """The names in a run directory, but for its lock file."""
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)


def check_unused(run_dir, checkpoint_dir=None) -> None:
    """Refuse a new run in a directory that holds anything but a lock file (which a killed run
    leaves), or with a checkpoint directory outside it that is not empty: the new run's history
    would mix with what is there."""
    run_dir = Path(run_dir)
    _check_checkpoints_unused(checkpoint_dir, run_dir)
    names = _contents(run_dir) if run_dir.is_dir() else []
    if (run_dir / RUN_RECORD).is_file():
        raise RunDirError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                          f"train into a new --run-dir, or add --overwrite to delete it first")
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise RunDirError(f"{run_dir} is not empty ({shown}) and holds no run ({RUN_RECORD}): "
                          f"train into a new or empty --run-dir")


def _check_checkpoints_unused(checkpoint_dir, run_dir: Path) -> None:
    if checkpoint_dir is None:
        return
    checkpoint_dir = Path(checkpoint_dir).absolute()
    if checkpoint_dir.is_relative_to(run_dir.absolute()):  # the run directory's own check
        return
    if checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir()):
        raise RunDirError(f"--checkpoint-dir {checkpoint_dir} is not empty: a new run's "
                          f"checkpoints would mix with what is there; choose another or remove "
                          f"it yourself")


def replace_with_empty(lock: RunLock) -> RunLock:
    """Replace the run directory that `lock` holds, whole, by an empty one, and return the lock
    of the new one. The directory is always whole: the old run is renamed aside, a new empty
    directory (locked before it appears) renamed into its place, then the old run deleted. A
    kill in between leaves the old run in a hidden `.<name>.old-*` directory beside it.

    Only a run directory is replaced: one whose run.json is a run record, not a symbolic link."""
    run_dir = lock.run_dir
    if run_dir.is_symlink():
        raise RunDirError(f"--overwrite: {run_dir} is a symbolic link; remove it yourself or "
                          f"choose another --run-dir")
    if read_record(run_dir) is None:
        raise RunDirError(f"--overwrite deletes only a run directory, and {run_dir} holds no "
                          f"run ({RUN_RECORD}): remove it yourself or choose another --run-dir")
    parent = run_dir.absolute().parent
    try:  # beside it, on the same file system: each rename is atomic
        fresh = RunLock.acquire(tempfile.mkdtemp(prefix=f".{run_dir.name}.new-", dir=parent))
    except OSError as e:
        raise RunDirError(f"--overwrite: cannot create a directory in {parent}: "
                          f"{e.strerror}") from None
    aside = old = None
    try:
        aside = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.old-", dir=parent))
        os.rename(run_dir, aside / run_dir.name)
        old = aside / run_dir.name
        os.rename(fresh.run_dir, run_dir)
    except OSError as e:  # e.g. another process created run_dir between the two renames
        fresh.release()
        shutil.rmtree(fresh.run_dir, ignore_errors=True)
        if aside is not None and old is None:
            aside.rmdir()
        kept = f"; the old run is kept in {old}" if old else ""
        raise RunDirError(f"--overwrite: cannot replace {run_dir}: {e.strerror}{kept}") from None
    fresh.run_dir = run_dir
    lock.release()
    try:
        shutil.rmtree(aside)
    except OSError as e:
        fresh.release()
        raise RunDirError(f"--overwrite: {run_dir} is now empty, but the old run could not be "
                          f"deleted from {aside}: {e.strerror}") from None
    return fresh


# --- the run record (run.json) ---------------------------------------------------------------

def new_record(config: Mapping, dataset: str, *, devices: int, processes: int = 1,
               data_dir=None, checkpoint_dir=None, data: Mapping | None = None) -> dict:
    """What run.json records: the recipe's settings, the data set and the directory it was
    read from, what the model knows of it (`data`: class names, image size, mean and std,
    `Dataset.description`), the checkpoint directory (None: the run directory's
    checkpoints/), and the devices each batch was split over, in how many processes."""
    return {"config": dict(config), "dataset": dataset,
            **({} if data is None else {"data": dict(data)}),
            "data_dir": None if data_dir is None else os.path.abspath(data_dir),
            "checkpoint_dir": None if checkpoint_dir is None else os.path.abspath(checkpoint_dir),
            "devices": devices, "processes": processes}


def continued_record(record: Mapping, *, epochs: int, data_dir=None) -> dict:
    """The record of a run as a resume continues it: to `epochs` (a resume may add some) and,
    if given, with its data set read from `data_dir` (the same data set, moved); the rest as
    recorded."""
    continued = {**record, "config": {**record["config"], "epochs": epochs}}
    if data_dir is not None:
        continued["data_dir"] = os.path.abspath(data_dir)
    return continued


def read_record(run_dir) -> dict | None:
    """The run record of `run_dir`, or None if it has none."""
    path = Path(run_dir) / RUN_RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path} cannot be read as a run record: {e}") from None
    if not (isinstance(record, dict) and isinstance(record.get("config"), dict)
            and isinstance(record.get("dataset"), str)):
        raise RunDirError(f"{path} is not a run record: expected a JSON object with 'config' "
                          f"and 'dataset'")
    return record


def write_record(run_dir, record: Mapping) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (RUN_RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, run_dir / RUN_RECORD)  # a kill leaves the old record or the new one


def recorded_settings(record: Mapping) -> dict:
    """The settings a resume takes from `record` where no flag gives them, by the command
    line's names: the recipe's, `dataset`, `data_dir`, `image_size`, `skip_unreadable`,
    `checkpoint_dir` and `devices` (per process). A record written before some of these were
    kept lacks them: their flags' defaults apply, and a missing device count is not checked."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {k: v for k, v in record["config"].items() if k in known}
    settings["dataset"] = record["dataset"]
    for key in ("data_dir", "checkpoint_dir"):
        if record.get(key) is not None:
            settings[key] = record[key]
    settings.update(_data_settings(record))
    if record.get("devices"):
        settings["devices"] = record["devices"] // record.get("processes", 1)
    return settings


# What the data set a run read depends on, besides its directory (which may move): a resume
# that changed one would train on other images.
DATA_KEYS = ("dataset", "image_size", "skip_unreadable")


def _data_settings(record: Mapping) -> dict:
    """The `image_size` and, for a folder, `skip_unreadable` that `record`'s data description
    keeps (none for a record written before it had one)."""
    data = record.get("data") or {}
    return {k: data[k] for k in ("image_size", "skip_unreadable") if k in data}


def check_resume(record: Mapping, settings: Mapping, run_dir, *,
                 allow_device_change: bool = False) -> None:
    """Refuse (ResumeMismatchError) to continue the run that `record` describes with
    `settings` (the recipe's, `dataset`, `devices`: how many in all, and `checkpoint_dir`)
    that would change its result: a `RESUME_KEYS` setting, the data set or how it was read
    (`DATA_KEYS`: its image size, whether unreadable files were left out), fewer epochs than
    recorded, another device count (unless `allow_device_change`: the result then differs in
    its last bits), or another checkpoint directory (whose lack of checkpoints would restart
    the run)."""
    recorded = {**record["config"], "dataset": record["dataset"], **_data_settings(record)}
    changed = [k for k in (*RESUME_KEYS, *DATA_KEYS) if k in recorded
               and k in settings and recorded[k] != settings[k]]
    if settings["epochs"] < recorded.get("epochs", 0):
        changed.append("epochs")
    changes = [f"{flag_of(k)} {_shown(settings[k])} (recorded: {_shown(recorded[k])})"
               for k in changed]
    given = settings.get("checkpoint_dir")
    if "checkpoint_dir" in record and _checkpoints(record["checkpoint_dir"], run_dir) \
            != _checkpoints(given, run_dir):
        changes.append(f"--checkpoint-dir {given or 'RUN_DIR/checkpoints'} (recorded: "
                       f"{record['checkpoint_dir'] or 'RUN_DIR/checkpoints'})")
    if record.get("devices") and record["devices"] != settings["devices"] \
            and not allow_device_change:
        changes.append(f"devices {settings['devices']} (recorded: {record['devices']}; "
                       f"--allow-device-change continues on {settings['devices']}, with "
                       f"results that differ in their last bits)")
    if changes:
        raise ResumeMismatchError(
            f"cannot resume {run_dir} with settings other than its {RUN_RECORD} records: "
            + ", ".join(changes) + "; leave those flags out to continue as recorded (a larger "
            "--epochs may be given)")


def _checkpoints(checkpoint_dir, run_dir) -> Path:
    return Path(checkpoint_dir or Path(run_dir) / "checkpoints").absolute()


def _shown(value) -> str:
    if isinstance(value, bool):  # a switch: --skip-unreadable
        return "on" if value else "off"
    return "automatic" if value is None else str(value)
