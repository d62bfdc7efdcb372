"""`kill -9` at eleven moments of `python scripts/train.py`, each followed by `--resume`: nothing
is lost, nothing is written twice, and the run ends bit for bit where an uninterrupted one ends.

One digits run (2 epochs of 23 batches of 64, one CPU device, every batch logged, histograms
every 10 batches) is killed eleven times in a chain: the resume of each kill is the next process
to kill, and the last resume finishes the run. Each kill is aimed by watching what the process
prints and what it leaves in its run directory (no hook in the code under test): when the
moment is near, the process is frozen (SIGSTOP) and the moment is checked on the frozen
process; only then is it killed (SIGKILL), else let go (SIGCONT) to be caught later. So each
kill is known to have hit its moment.

Then, against an uninterrupted run with the same flags, four things:
- the final state is bit-identical: every array of checkpoints/latest and checkpoints/best,
  the JSON record beside them (but for the timings), and the exported .pth;
- every event file is readable to its last byte;
- each tag has exactly one record per step, at the uninterrupted run's steps (0 to the last,
  without a gap, for the tags logged at every batch or epoch), with the same values;
- the checkpoint directories hold only complete checkpoints, the uninterrupted run's, each
  matching its SHA256SUMS; and no kill left a committed checkpoint, figure or .pth cut off (a
  step orbax renamed but whose SHA256SUMS a kill prevented is not committed: the resume
  removes it).

All processes share one compilation cache: the first kill lands while the cold cache is being
filled (a real compilation), and the later processes load the compiled steps from it.

Runtime: 13 processes (the 11 killed, the last resume, the reference), about 10 epochs in all.
On 2 CPU cores: about 3.5 min of CPU time over all processes, 2-5 min wall (up to 7 min when
other jobs share the cores).
"""
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from PIL import Image

from cbam_jax.checkpoint import MANIFEST, verify
from cbam_jax.logbook import event_files, read_events

# Every test here kills or runs whole trainings: the module is in the slow tier.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"
EPOCHS, BATCHES = 2, 23  # digits: 1437 train images = 22 batches of 64 + one of 29
FLAGS = ["--dataset", "digits", "--epochs", str(EPOCHS), "--batch-size", "64", "--log-every",
         "1", "--hist-every", "10", "--devices", "1"]
TMP = ".orbax-checkpoint-tmp"  # orbax writes a checkpoint under this suffix, then renames it
PROGRESS = re.compile(rf"Epoch (\d+)/{EPOCHS} \[[.#]+\] (\d+)/{BATCHES}")
TIMING_TAGS = ("Train/Epoch_Time_s", "Train/Images_per_s")  # wall-clock: differ between runs


# --- what a process shows: its output and its run directory ----------------------------------

class Seen:
    """One look at a training process: its output lines and its run directory."""

    def __init__(self, lines, run_dir: Path, pid: int, events_cache: dict):
        self.lines, self.pid = list(lines), pid
        self.names = sorted(os.listdir(run_dir)) if run_dir.is_dir() else []
        self.event_files = event_files(run_dir)
        self.latest, self.best = (
            {p.name for p in (run_dir / "checkpoints" / name).glob("*")}
            for name in ("latest", "best"))
        # Steps whose SHA256SUMS is written: committed (a renamed step without it is not).
        self.latest_committed, self.best_committed = (
            {p.parent.name for p in (run_dir / "checkpoints" / name).glob(f"*/{MANIFEST}")}
            for name in ("latest", "best"))
        self._events_cache = events_cache

    @functools.cached_property
    def steps(self) -> dict[str, list[int]]:
        """tag -> the steps of its complete records on disk (parsed only when files changed:
        a look must stay quick, not to miss a moment)."""
        sizes = tuple((p.name, _size(p)) for p in self.event_files)
        if sizes not in self._events_cache:
            self._events_cache.clear()
            self._events_cache[sizes] = _steps_on_disk(self.event_files)
        return self._events_cache[sizes]

    def progress(self) -> tuple[int, int] | None:
        """(epoch, batches done) when the last line is the progress line, else None."""
        found = PROGRESS.match(self.lines[-1]) if self.lines else None
        return (int(found.group(1)), int(found.group(2))) if found else None

    def committed(self) -> int:
        """Epochs committed: the newest committed checkpoint, in latest/ or best/ (best/ is
        saved first: a kill before latest/ is committed leaves the epoch in best/)."""
        return max((int(name) for name in self.latest_committed | self.best_committed),
                   default=0)

    def printed(self, text: str) -> bool:
        return any(text in line for line in self.lines)


def _size(path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # deleted by a compaction since it was listed
        return -1


def _steps_on_disk(paths) -> dict[str, list[int]]:
    steps = {}
    for path in paths:
        try:
            events = read_events(path)
        except FileNotFoundError:  # deleted by a compaction between listing and reading
            continue
        for event in events:
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return steps


# --- the eleven moments ----------------------------------------------------------------------

class Moment(NamedTuple):
    """Where to kill. `near` is quick (output and file names): when it holds, the process is
    frozen and `now` decides on the frozen process (it may read the event files). `past`: this
    process got past the moment, which it will not meet again (None: it recurs every epoch)."""

    name: str
    now: Callable[[Seen], bool]
    near: Callable[[Seen], bool] | None = None  # None: `now` itself is quick
    past: Callable[[Seen], bool] | None = None


def _compiling(s):
    return bool(s.lines) and s.lines[-1].endswith("compiling the train step...")


def _trained_a_step(s):
    return any(PROGRESS.match(line) and not line.endswith("...") for line in s.lines)


def _mid_epoch_before_the_first_checkpoint(s):
    p = s.progress()
    return p is not None and 10 <= p[1] < BATCHES and s.committed() == 0


def _trained_the_epoch(s) -> int | None:
    """The epoch (1-based) whose last batch is the last line printed, else None. (A moment
    after an epoch asks for it: the process is past its start, when the killed run's files
    are still there.)"""
    p = s.progress()
    return p[0] if p is not None and p[1] == BATCHES else None


def _epoch_not_yet_saved(s):
    epoch = _trained_the_epoch(s)
    return epoch is not None and not {str(epoch), str(epoch) + TMP} & (s.latest | s.best)


def _evaluating(s):  # the epoch trained, none of its records on disk
    return _epoch_not_yet_saved(s) and _trained_the_epoch(s) - 1 not in s.steps.get(
        "Train/Epoch_Loss", ())


def _just_after_the_flush(s):  # the epoch's last record on disk, its checkpoint not begun
    return _epoch_not_yet_saved(s) and _trained_the_epoch(s) - 1 in s.steps.get(
        "Attention/cbam3", ())


def _saving_a_checkpoint(s):
    epoch = _trained_the_epoch(s)
    return epoch is not None and str(epoch) + TMP in s.latest | s.best


def _between_the_commit_and_the_manifest(s):  # orbax renamed the step; no SHA256SUMS yet
    epoch = _trained_the_epoch(s)
    return (epoch is not None and str(epoch) in s.latest
            and str(epoch) not in s.latest_committed)


def _mid_epoch_after_a_checkpoint(s):
    p = s.progress()
    return p is not None and 10 <= p[1] < BATCHES and s.committed() >= 1


def _own_event_file(s):
    return [p for p in s.event_files if p.name.endswith(f".{s.pid}")]


def _compacting_the_event_files(s):  # a resume copies the committed records to a new file
    return bool(_own_event_file(s)) and len(s.event_files) > 1


def _compacted(s):
    return bool(_own_event_file(s)) and len(s.event_files) == 1


def _saving_latest_with_the_previous_in_place(s):
    epoch = _trained_the_epoch(s)
    return epoch is not None and str(epoch) + TMP in s.latest and str(epoch - 1) in s.latest


def _saving_best_of_the_last_epoch(s):
    return _trained_the_epoch(s) == EPOCHS and f"{EPOCHS}{TMP}" in s.best


def _drawing_the_figures(s):
    # Past the last epoch: trained it, or resumed after it (from best/, a kill having stopped
    # the save of latest/) and rewritten the event files: the figures are what is left.
    past = s.printed(f"Epoch {EPOCHS}/{EPOCHS} done") or (
        s.printed(_resumed_line(EPOCHS)) and _compacted(s))
    return past and not s.printed("Training finished")


MOMENTS = [
    Moment("during compilation (cold cache)", _compiling, past=_trained_a_step),
    Moment("mid-epoch, before the first checkpoint", _mid_epoch_before_the_first_checkpoint),
    Moment("during evaluation", _evaluating, near=_epoch_not_yet_saved),
    Moment("just after the logbook flush, before the checkpoint", _just_after_the_flush,
           near=_epoch_not_yet_saved),
    Moment("during a checkpoint save", _saving_a_checkpoint),
    Moment("between orbax's commit of latest/ and its SHA256SUMS",
           _between_the_commit_and_the_manifest),
    Moment("mid-epoch, after a checkpoint", _mid_epoch_after_a_checkpoint),
    Moment("while resume compacts the event files", _compacting_the_event_files,
           past=_compacted),
    # best/ is saved before latest/: a resume that repeats an epoch finds best/ holding it.
    Moment("during the save of best/ in the last epoch", _saving_best_of_the_last_epoch),
    Moment("during the save of latest/, the previous one in place",
           _saving_latest_with_the_previous_in_place),
    Moment("while drawing the figures after the last epoch", _drawing_the_figures),
]
ATTEMPTS = 3  # a moment that starts a process (compiling, compacting) may be seen too late
TIMEOUT_S = 600  # for one process; it takes well under a minute


# --- running and killing ---------------------------------------------------------------------

class Training:
    """`scripts/train.py` in a subprocess whose output is read without blocking."""

    def __init__(self, run_dir: Path, cache: Path, resume: bool):
        where = ["--resume", str(run_dir)] if resume else ["--run-dir", str(run_dir)]
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.run_dir = run_dir
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), *FLAGS, "--compile-cache", str(cache), *where],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.lines, self._partial, self._events = [], b"", {}

    def look(self) -> Seen:
        while chunk := self._read():
            *complete, self._partial = (self._partial + chunk).split(b"\n")
            self.lines += [line.decode() for line in complete]
        return Seen(self.lines, self.run_dir, self.proc.pid, self._events)

    def _read(self) -> bytes:
        try:
            return os.read(self.proc.stdout.fileno(), 1 << 16)
        except BlockingIOError:
            return b""

    def kill_at(self, moment: Moment) -> tuple[Seen, bool]:
        """Kill the process at `moment`, checked on the frozen process: (what it showed, True).
        If it gets past the moment first, kill it there: (what it showed, False). Fails if the
        process ends first."""
        near, deadline = moment.near or moment.now, time.monotonic() + TIMEOUT_S
        try:
            while self.proc.poll() is None and time.monotonic() < deadline:
                seen = self.look()
                if near(seen):
                    os.kill(self.proc.pid, signal.SIGSTOP)
                    _, status = os.waitpid(self.proc.pid, os.WUNTRACED)  # every thread stopped
                    assert os.WIFSTOPPED(status), self.output()
                    frozen = self.look()
                    if moment.now(frozen):
                        return self._kill(frozen), True
                    os.kill(self.proc.pid, signal.SIGCONT)  # not yet, or just missed
                elif moment.past is not None and moment.past(seen):
                    return self._kill(seen), False
                time.sleep(0.002)
            pytest.fail(f"the process ended or timed out before the moment; its output ends:"
                        f"\n{self.output()}")
        finally:
            if self.proc.poll() is None:  # a failure above: leave no process behind, stopped
                self.proc.kill()          # or not
                self.proc.wait()

    def _kill(self, seen: Seen) -> Seen:
        self.proc.kill()  # SIGKILL, also to a stopped process
        self.proc.wait()
        seen.steps  # read now: the next process rewrites the event files
        return seen

    def output(self) -> str:
        return "\n".join(self.lines[-30:] + [self._partial.decode()])

    def finish(self) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.look()  # read as it goes: a full pipe would block the process
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.look()
        assert self.proc.returncode == 0, self.output()


def _resumed_line(committed: int) -> str:
    """What a resume prints about where it continues (fit's log line)."""
    return f"after epoch {committed} (step" if committed else "yet: starting"


def _layout(checkpoint: Path) -> list[str]:
    """A checkpoint's files, but for its data files (named after their content)."""
    return sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*")
                  if p.parent.name != "d")


def _cut_off(run_dir: Path, whole: Path) -> list[str]:
    """Files a kill left incomplete: a committed checkpoint (with its SHA256SUMS) without every
    file of a complete one or failing its digests, or a figure or .pth that does not load."""
    complete = _layout(whole / "checkpoints" / "latest" / str(EPOCHS))
    cut = []
    for c in run_dir.glob(f"checkpoints/*/*/{MANIFEST}"):
        try:
            verify(c.parent)
        except ValueError:
            cut.append(str(c.parent))
        else:
            if _layout(c.parent) != complete:
                cut.append(str(c.parent))
    for figure in run_dir.glob("*.png"):
        try:
            with Image.open(figure) as image:
                image.verify()
        except Exception:  # PIL raises assorted types for a cut-off PNG
            cut.append(figure.name)
    for model in run_dir.glob("*.pth"):
        try:
            torch.load(model, weights_only=True)
        except Exception:
            cut.append(model.name)
    return cut


class Kill(NamedTuple):
    moment: str
    seen: Seen      # what the process showed when it was killed
    cut_off: list   # the files it left incomplete


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the uninterrupted run's directory, the killed-and-resumed run's, the eleven kills)."""
    root = tmp_path_factory.mktemp("kill")
    cache, killed, whole = root / "compile_cache", root / "killed", root / "whole"
    kills, committed = [], None
    for moment in MOMENTS:
        for _ in range(ATTEMPTS):
            training = Training(killed, cache, resume=committed is not None)
            seen, hit = training.kill_at(moment)
            if committed is not None:  # it continued from the last checkpoint of the last kill
                assert seen.printed(_resumed_line(committed)), training.output()
            committed = seen.committed()
            if not whole.exists():  # the first process filled the cache: now the reference
                Training(whole, cache, resume=False).finish()
            if hit:
                kills.append(Kill(moment.name, seen, _cut_off(killed, whole)))
                break
        else:
            pytest.fail(f"{ATTEMPTS} processes got past {moment.name!r} before it was seen")
    final = Training(killed, cache, resume=True)
    final.finish()
    assert final.look().printed(_resumed_line(committed))
    return whole, killed, kills


def test_each_kill_hit_its_moment_and_left_no_file_cut_off(runs):
    _, _, kills = runs
    assert [kill.moment for kill in kills] == [moment.name for moment in MOMENTS]
    for kill, moment in zip(kills, MOMENTS):
        assert moment.now(kill.seen), kill.moment  # what the process showed when it died
        assert kill.cut_off == [], kill.moment
    committed = [kill.seen.committed() for kill in kills]
    assert committed[:2] == [0, 0] and committed[-1] == EPOCHS and committed == sorted(committed)
    first = kills[0].seen
    # No checkpoints/ yet; the lock the run held (the kernel let go of it when the run died,
    # the next resume took it, and the last one, which ended, removed it).
    assert first.names == sorted(["run.json", "run.lock", first.event_files[0].name])


def test_final_state_is_bit_identical_to_an_uninterrupted_run(runs):
    whole, killed, _ = runs
    for kind, step in ((kind, step) for kind in ("latest", "best")
                       for step in os.listdir(whole / "checkpoints" / kind)):
        ours, theirs = (run / "checkpoints" / kind / step for run in (killed, whole))
        with ocp.StandardCheckpointer() as checkpointer:
            ours_state, their_state = (checkpointer.restore(p / "state") for p in (ours, theirs))
        assert jax.tree.structure(ours_state) == jax.tree.structure(their_state)
        leaves = jax.tree_util.tree_leaves_with_path(their_state)
        assert len(leaves) == 93  # params, batch_stats, Adam's state, step, key
        for (path, theirs_leaf), ours_leaf in zip(leaves, jax.tree.leaves(ours_state)):
            np.testing.assert_array_equal(np.asarray(ours_leaf), np.asarray(theirs_leaf),
                                          err_msg=f"{kind} {jax.tree_util.keystr(path)}")
        ours_meta, their_meta = (json.loads((p / "meta" / "metadata").read_text())
                                 for p in (ours, theirs))
        for meta in (ours_meta, their_meta):
            for timing in ("epoch_time", "images_per_s"):
                del meta["history"][timing]
        assert ours_meta == their_meta
    name = "digits_cbam_cnn_model.pth"
    ours, theirs = (torch.load(run / name, weights_only=True) for run in (killed, whole))
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_every_event_file_is_readable_to_its_end(runs):
    whole, killed, _ = runs
    (ours,), (theirs,) = event_files(killed), event_files(whole)  # a resume leaves one file
    assert len(read_events(ours, strict=True)) == len(read_events(theirs, strict=True))


def _expected_steps(tag: str) -> list[int]:
    if tag.startswith(("Train/Batch_", "Train/Learning_Rate")):
        return list(range(EPOCHS * BATCHES))  # --log-every 1
    if tag.startswith(("weights/", "grads/")):
        return [e * BATCHES + b for e in range(EPOCHS) for b in (9, 19)]  # --hist-every 10
    if tag.startswith("Hyperparameters"):
        return [0]
    return list(range(EPOCHS))


def _records(run_dir) -> dict[str, list[tuple[int, bytes]]]:
    """tag -> [(step, the value's bytes)] in file order, over every event file."""
    records = {}
    for path in event_files(run_dir):
        for event in read_events(path, strict=True):
            for value in event.summary.value:
                records.setdefault(value.tag, []).append(
                    (event.step, value.SerializeToString(deterministic=True)))
    return records


def test_each_tag_has_one_record_per_step_with_the_uninterrupted_values(runs):
    whole, killed, _ = runs
    ours, theirs = _records(killed), _records(whole)
    assert ours.keys() == theirs.keys()
    assert len(ours) == 6 + 3 + 4 + 1 + 2 * 25  # epoch, batch, image, text, histogram tags
    for tag, records in ours.items():
        steps = [step for step, _ in records]
        assert sorted(steps) == _expected_steps(tag), tag  # no gap, no duplicate
        assert sorted(step for step, _ in theirs[tag]) == _expected_steps(tag), tag
        if tag not in TIMING_TAGS:
            assert dict(records) == dict(theirs[tag]), f"{tag}: other values"


def test_checkpoint_directories_hold_only_complete_checkpoints(runs):
    whole, killed, _ = runs
    for kind in ("latest", "best"):
        ours, theirs = (sorted(os.listdir(run / "checkpoints" / kind)) for run in (killed, whole))
        assert ours == theirs and ours[-1] == str(EPOCHS), kind
        assert ours == (["1", "2"] if kind == "latest" else [str(EPOCHS)]), kind
        assert all(verify(killed / "checkpoints" / kind / step) for step in ours)
    assert _cut_off(killed, whole) == []


def test_the_run_directory_holds_the_figures_and_nothing_else_left_behind(runs):
    whole, killed, _ = runs
    names = lambda run: sorted(p.name for p in run.iterdir() if not p.name.startswith("events."))
    assert names(killed) == names(whole) == [
        "attention_maps.png", "checkpoints", "digits_cbam_cnn_model.pth", "epoch_metrics.png",
        "iteration_loss.png", "run.json"]
