"""TensorBoard event files (a resume keeps exactly the committed records, even when it is killed
while it rewrites them), the batch cadences, and the progress lines. Runtime: about 10 s."""
import io
import shutil
import types

import numpy as np
import pytest

from cbam_jax.logbook import EpochReporter, Logbook, event_files, read_events
from cbam_jax.recipe import TrainConfig, cadence_in_epoch
from cbam_jax.train import epoch_plan


# --- event files -----------------------------------------------------------------------------

BATCHES = 4  # per epoch, in the runs written here


def _write_epochs(book: Logbook, epochs: range):
    """What fit writes: a record per batch, then the epoch's scalars and attention images."""
    images = np.zeros((2, 32, 32, 3), np.uint8)
    maps = [np.full((2, 4, 4), 0.5, np.float32)]
    for e in epochs:
        for b in range(BATCHES):
            book.batch_scalars(e * BATCHES + b, loss=1.0 / (1 + b), running_acc=50.0, lr=1e-3)
        result = types.SimpleNamespace(epoch=e, train_loss=1.0, train_acc=50.0, test_loss=1.0,
                                       test_acc=50.0, epoch_time=1.0, images_per_s=100.0)
        book.epoch(result, images, maps)


def _steps(run_dir) -> dict[str, list[int]]:
    """tag -> steps of its records, over every event file, read strictly (to the last byte)."""
    steps = {}
    for path in event_files(run_dir):
        for event in read_events(path, strict=True):
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return steps


def _committed(epochs: int) -> dict[str, list[int]]:
    """The records of the first `epochs` epochs of a run written by _write_epochs."""
    per_epoch = ("Train/Epoch_Loss", "Train/Epoch_Accuracy", "Test/Epoch_Loss",
                 "Test/Epoch_Accuracy", "Train/Epoch_Time_s", "Train/Images_per_s",
                 "Attention/inputs", "Attention/cbam1")
    batches = list(range(epochs * BATCHES))
    return {**{tag: batches for tag in ("Train/Batch_Loss", "Train/Batch_Accuracy",
                                        "Train/Learning_Rate")},
            **{tag: list(range(epochs)) for tag in per_epoch}}


@pytest.fixture
def killed_run(tmp_path):
    """A run killed in its third epoch: two epochs committed, two batches of the third on disk."""
    run_dir = tmp_path / "run"
    book = Logbook(run_dir)
    _write_epochs(book, range(2))
    for b in range(2):
        book.batch_scalars(2 * BATCHES + b, loss=0.5, running_acc=60.0, lr=1e-3)
    book.flush()
    return run_dir


def test_a_cut_off_record_ends_the_events_or_raises_when_strict(killed_run):
    (path,) = event_files(killed_run)
    whole = read_events(path)
    data = path.read_bytes()
    path.write_bytes(data[:-3])  # a kill in the middle of the last record
    assert len(read_events(path)) == len(whole) - 1
    with pytest.raises(ValueError, match=rf"record at byte \d+ of {len(data) - 3} is cut off"):
        read_events(path, strict=True)


def test_resume_keeps_exactly_the_committed_records_in_one_file(killed_run):
    assert _steps(killed_run)["Train/Batch_Loss"] == list(range(2 * BATCHES + 2))
    Logbook(killed_run, resume_at=(2, 2 * BATCHES)).close()
    assert len(event_files(killed_run)) == 1
    assert _steps(killed_run) == _committed(2)


def test_resume_after_the_epochs_records_but_before_its_checkpoint_drops_them(tmp_path):
    run_dir = tmp_path / "run"
    book = Logbook(run_dir)
    _write_epochs(book, range(2))  # epoch 2's records flushed; its checkpoint never written
    Logbook(run_dir, resume_at=(1, BATCHES)).close()
    assert _steps(run_dir) == _committed(1)


def test_a_resume_killed_while_compacting_loses_and_repeats_nothing(killed_run, tmp_path):
    """A kill at any byte of the compacted file, before the old file is deleted: the next
    resume still keeps every committed record exactly once."""
    (old,) = event_files(killed_run)
    old_bytes = old.read_bytes()
    Logbook(killed_run, resume_at=(2, 2 * BATCHES)).close()
    (new,) = event_files(killed_run)
    new_bytes = new.read_bytes()
    for cut in sorted({*range(0, len(new_bytes), 97), len(new_bytes)}):
        run_dir = tmp_path / f"cut_{cut}"
        run_dir.mkdir()
        (run_dir / old.name).write_bytes(old_bytes)
        (run_dir / new.name).write_bytes(new_bytes[:cut])
        Logbook(run_dir, resume_at=(2, 2 * BATCHES)).close()
        assert _steps(run_dir) == _committed(2), cut
        shutil.rmtree(run_dir)


# --- the batch cadences ----------------------------------------------------------------------

class _Book:
    """What EpochReporter writes: the steps of its batch scalars."""

    def __init__(self):
        self.steps = []

    def batch_scalars(self, global_step, loss, running_acc, lr):
        self.steps.append(global_step)


def _logged_steps(num_train: int, batch_size: int, epoch: int) -> list[int]:
    """The global steps of the Train/Batch_* scalars of one epoch, recipe's cadence."""
    sizes = [batch_size] * (num_train // batch_size) + [num_train % batch_size] * bool(
        num_train % batch_size)
    book = _Book()
    reporter = EpochReporter(book, epoch, TrainConfig(), sizes, 1e-3, io.StringIO())
    reporter.batches(epoch, len(sizes), np.ones(len(sizes)), np.ones(len(sizes), int))
    return book.steps


def _histogram_batches(num_train: int, batch_size: int) -> list[int]:
    """The batches of one epoch whose call returns gradients, recipe's cadence (as
    train.train_epoch plans it)."""
    batches = -(-num_train // batch_size)
    hist_every = cadence_in_epoch(TrainConfig().hist_every, batches)
    return [c.first for c in epoch_plan(num_train, batch_size, hist_every)
            if c.shape.with_grads]


def test_cifar10_keeps_the_tutorials_cadence_and_steps():
    """50,000 images in 782 batches of 64: scalars every 100 batches of the epoch, histograms
    every 500, at the global step epoch * 782 + batch (docs/recipe.md, "What is reported and
    logged")."""
    assert _logged_steps(50_000, 64, epoch=0) == [99, 199, 299, 399, 499, 599, 699]
    assert _logged_steps(50_000, 64, epoch=3) == [3 * 782 + b for b in range(99, 782, 100)]
    assert _histogram_batches(50_000, 64) == [499]


def test_an_epoch_shorter_than_the_cadences_records_its_last_batch():
    """Digits: 1437 images in 23 batches of 64 (the last of 29), fewer than 100 and 500."""
    assert _logged_steps(1437, 64, epoch=0) == [22]
    assert _logged_steps(1437, 64, epoch=1) == [45]
    assert _histogram_batches(1437, 64) == [22]  # the partial batch, in its own call


# --- progress lines --------------------------------------------------------------------------

CONFIG = TrainConfig(epochs=3, log_every=100)


def test_the_first_epoch_says_it_is_compiling_before_its_first_step():
    out = io.StringIO()  # not a terminal: every refresh is a line of its own
    EpochReporter(None, 0, CONFIG, [64, 64, 29], 1e-3, out, compiling=True)
    assert out.getvalue() == "Epoch 1/3 [....................] 0/3, compiling the train step...\n"


def test_off_a_terminal_a_line_is_printed_at_each_read_the_interval_asks_for():
    out = io.StringIO()
    reporter = EpochReporter(None, 1, CONFIG, [64, 64, 29], 1e-3, out, line_every_s=0.0)
    losses, correct = np.array([2.0, 1.0, 0.5]), np.array([16, 32, 29])
    for done in (1, 2, 3):
        assert reporter.read_due()  # log_every (100) alone would read only at the end
        reporter.batches(1, done, losses[:done], correct[:done])
    lines = out.getvalue().splitlines()
    assert [line.split(", ")[0] for line in lines] == [
        "Epoch 2/3 [######..............] 1/3", "Epoch 2/3 [#############.......] 2/3",
        "Epoch 2/3 [####################] 3/3"]
    assert lines[-1].split(", ")[1].startswith("loss 1.1667 | acc 49.04% |")  # 77 of 157


def test_off_a_terminal_reads_are_due_every_30_s_by_default():
    reporter = EpochReporter(None, 0, CONFIG, [64], 1e-3, io.StringIO())
    assert reporter.read_every_s == 30.0 and not reporter.read_due()


def test_an_array_with_a_nan_has_no_histogram_and_the_others_are_written(tmp_path):
    """A diverging step's NaN has no histogram range: it is left out, not a numpy error that
    would end the run before its loss check names the step."""
    book = Logbook(tmp_path / "run")
    params = {"fc1": {"kernel": np.ones((3, 2), np.float32), "bias": np.zeros(2, np.float32)}}
    grads = {"fc1": {"kernel": np.full((3, 2), np.nan, np.float32),
                     "bias": np.array([np.inf, 0.0], np.float32)}}
    book.histograms(7, params, grads)
    book.flush()
    steps = _steps(tmp_path / "run")
    assert steps == {"weights/fc1.weight": [7], "weights/fc1.bias": [7]}
