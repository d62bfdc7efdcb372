"""Where a run's measurements go: TensorBoard event files, the progress line, PNG plots.

Tags and cadence are the tutorial's (docs/recipe.md, "What is reported and logged"), plus the
test metrics, epoch time, throughput, attention maps and hyperparameters it left out. Steps
follow the tutorial too: the per-batch tags and histograms are at the global batch step, the
per-epoch tags (and the attention images) at the 0-based epoch. The batch cadences count within
the epoch, as the tutorial's do; an epoch shorter than a cadence records its last batch
(`recipe.cadence_in_epoch`), so every data set gets every tag.

Nothing is lost on a kill: events are written synchronously (tensorboardX's summary builders and
record writer, without its background queue) and flushed to disk (fsync) at every epoch
boundary, before the checkpoint that commits the epoch. A resumed run first rewrites the event
files to what that checkpoint committed (its epochs and their batches), dropping the
half-written tail of the killed run, so every tag has exactly one record per step.
Plots use matplotlib's object API (no pyplot, so no interactive backend).
"""
import contextlib
import os
import socket
import struct
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from tensorboardX import summary
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import RecordWriter, masked_crc32c
from tqdm import tqdm

from cbam_jax.naming import named_leaves
from cbam_jax.recipe import cadence_in_epoch

EPOCH_TAG_PREFIXES = ("Train/Epoch_", "Test/", "Attention/", "Train/Images_per_s",
                      "Hyperparameters")  # stepped by epoch; every other tag by batch
HISTOGRAM_BINS = 30  # tf.summary.histogram's default bucket count


# --- TensorBoard event files -----------------------------------------------------------------

def read_events(path, strict: bool = False) -> list[event_pb2.Event]:
    """The events of one file (TFRecord framing: length, crc, data, crc), up to the first record
    that a kill cut off or that fails its checksum; `strict` raises a ValueError there instead."""
    data, pos, events = Path(path).read_bytes(), 0, []
    while pos < len(data):
        header = data[pos:pos + 8]
        end = pos + 12 + (struct.unpack("<Q", header)[0] if len(header) == 8 else 0) + 4
        payload = data[pos + 12:end - 4]
        if (end > len(data)
                or struct.unpack("<I", data[pos + 8:pos + 12])[0] != masked_crc32c(header)
                or struct.unpack("<I", data[end - 4:end])[0] != masked_crc32c(payload)):
            if strict:
                raise ValueError(f"{path}: the record at byte {pos} of {len(data)} is cut off "
                                 "or fails its checksum")
            break
        event = event_pb2.Event()
        event.ParseFromString(payload)
        events.append(event)
        pos = end
    return events


def event_files(run_dir) -> list[Path]:
    return sorted(Path(run_dir).glob("events.out.tfevents.*"))


def _is_epoch_tag(tag: str) -> bool:
    return tag.startswith(EPOCH_TAG_PREFIXES)


class Logbook:
    """TensorBoard records of a run, one method per kind; written synchronously, durable at
    each `epoch` (see the module docstring).

    `resume_at=(epochs, batches)`: first rewrite the run's event files to the records of the
    first `epochs` epochs (epoch tags) and `batches` batches (batch tags).
    """

    def __init__(self, run_dir, resume_at: tuple[int, int] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept = self._committed_events(*resume_at) if resume_at else []
        old = event_files(self.run_dir)
        self.path = self.run_dir / (f"events.out.tfevents.{time.time():.6f}."
                                    f"{socket.gethostname()}.{os.getpid()}")
        self._records = RecordWriter(str(self.path))
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        for event in kept:
            self._write(event)
        self._records.flush()  # the kept records are on disk before the old files go
        for path in old:
            path.unlink()

    def _committed_events(self, epochs: int, batches: int) -> list[event_pb2.Event]:
        """Summary events below the resume point, once per (tag, step), in file order."""
        kept, seen = [], set()
        for path in event_files(self.run_dir):
            for event in read_events(path):
                values = [v for v in event.summary.value
                          if event.step < (epochs if _is_epoch_tag(v.tag) else batches)
                          and (v.tag, event.step) not in seen]
                if values:
                    seen.update((v.tag, event.step) for v in values)
                    del event.summary.value[:]
                    event.summary.value.extend(values)
                    kept.append(event)
        return kept

    def _write(self, event: event_pb2.Event):
        try:
            self._records.write(event.SerializeToString())
        except OSError as e:  # disk full, permission denied
            raise _naming(e, self.path) from e

    def _add(self, summary_proto, step: int):
        self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_proto))

    def batch_scalars(self, global_step: int, loss: float, running_acc: float, lr: float):
        self._add(summary.scalar("Train/Batch_Loss", loss), global_step)
        self._add(summary.scalar("Train/Batch_Accuracy", running_acc), global_step)
        self._add(summary.scalar("Train/Learning_Rate", lr), global_step)

    def histograms(self, global_step: int, params, grads):
        """Every parameter after the step and its gradient of that step, by PyTorch name. An
        array holding a NaN or an infinity has no histogram (its range is not finite): it is
        left out, and the run stops at its next read of the losses if they diverged too."""
        for kind, tree in (("weights", params), ("grads", grads)):
            for name, value in named_leaves(tree).items():
                value = np.asarray(value, np.float32)
                if np.isfinite(value).all():
                    self._add(summary.histogram(f"{kind}/{name}", value, HISTOGRAM_BINS),
                              global_step)

    def epoch(self, result, images, maps):
        """One finished epoch (cbam_jax.train.EpochResult) and its attention maps, made durable:
        images uint8 [n, 32, 32, 3]; maps one [n, h, w] gate in [0, 1] per CBAM block."""
        e = result.epoch
        for tag, value in (("Train/Epoch_Loss", result.train_loss),
                           ("Train/Epoch_Accuracy", result.train_acc),
                           ("Test/Epoch_Loss", result.test_loss),
                           ("Test/Epoch_Accuracy", result.test_acc),
                           ("Train/Epoch_Time_s", result.epoch_time),
                           ("Train/Images_per_s", result.images_per_s)):
            self._add(summary.scalar(tag, value), e)
        # As SummaryWriter.add_images: a batch [n, h, w, c] in [0, 1], laid out by tensorboardX.
        self._add(summary.image("Attention/inputs", np.asarray(images, np.float32) / 255.0,
                                dataformats="NHWC"), e)
        for i, m in enumerate(maps, start=1):
            self._add(summary.image(f"Attention/cbam{i}", np.asarray(m, np.float32)[..., None],
                                    dataformats="NHWC"), e)
        self.flush()

    def hyperparameters(self, hparams: dict):
        rows = "\n".join(f"| {k} | {v} |" for k, v in hparams.items())
        self._add(summary.text("Hyperparameters", "| name | value |\n|---|---|\n" + rows), 0)
        self.flush()

    def flush(self):
        """To disk (fsync): what was written survives a kill or a power cut."""
        try:
            self._records.flush()
        except OSError as e:
            raise _naming(e, self.path) from e

    def close(self):
        try:
            self.flush()
        finally:  # closed even if the disk is full (then flush has said so)
            with contextlib.suppress(OSError):
                self._records.close()


# --- progress --------------------------------------------------------------------------------

class _Lines:
    """A stream for tqdm that writes each refresh as its own line (a log file, a job scheduler:
    no carriage returns that pile up on one line)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str):
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


class EpochReporter:
    """fit's observer of one epoch (cbam_jax.train.EpochObserver): TensorBoard's batch scalars
    and histograms, and a tqdm progress line with the running loss, accuracy and images/s.

    On a terminal the line redraws every second; elsewhere a new line is printed at least every
    `line_every_s` seconds and at every `log_every` batches, so a log never stays silent for
    long. The first epoch of a process says that it is compiling before its first step.
    """

    def __init__(self, book, epoch: int, config, batch_sizes, lr: float, stream=None,
                 compiling: bool = False, line_every_s: float = 30.0):
        self.batch_sizes = np.asarray(batch_sizes)  # images in each batch of the epoch
        num_batches = len(self.batch_sizes)
        self.book, self.lr = book, lr
        self.log_every = cadence_in_epoch(config.log_every, num_batches)
        stream = stream or sys.stdout
        tty = getattr(stream, "isatty", lambda: False)()
        self.read_every_s = 1.0 if tty else line_every_s
        # The first epoch of a process shows its bar at once, saying it is compiling; later
        # ones show it at their first read (tqdm's `delay`), not as an empty line.
        self.bar = tqdm(total=num_batches, desc=f"Epoch {epoch + 1}/{config.epochs}",
                        file=stream if tty else _Lines(stream), ascii=".#", leave=False,
                        bar_format="{desc} [{bar:20}] {n_fmt}/{total_fmt}{postfix}",
                        postfix="compiling the train step..." if compiling else None,
                        delay=0 if compiling else 1e-6, mininterval=0, dynamic_ncols=False,
                        # every read redraws the line: tqdm's default adapts miniters to the
                        # updates so far, and skipped the epoch's last batch after updates of 2
                        miniters=1)
        self.start = self.last_read = time.monotonic()
        self.logged_until = 0

    def read_due(self) -> bool:
        return time.monotonic() - self.last_read >= self.read_every_s

    def batches(self, epoch: int, done: int, losses, correct):
        self.last_read = time.monotonic()
        seen = np.cumsum(self.batch_sizes[:done])  # images, and correct ones, up to each batch
        hits = np.cumsum(correct)
        if self.book is not None:  # the tutorial's running accuracy of the epoch
            for b in range(self.logged_until, done):
                if (b + 1) % self.log_every == 0:
                    self.book.batch_scalars(epoch * len(self.batch_sizes) + b, float(losses[b]),
                                            100.0 * hits[b] / seen[b], self.lr)
        self.logged_until = done
        rate = seen[-1] / max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(
            f"loss {float(np.mean(losses, dtype=np.float64)):.4f} | acc "
            f"{100.0 * hits[-1] / seen[-1]:.2f}% | {rate:,.0f} img/s", refresh=False)
        self.bar.update(done - self.bar.n)

    def histograms(self, global_step: int, params, grads):
        if self.book is not None:
            self.book.histograms(global_step, params, grads)

    def close(self):
        self.bar.close()


# --- figures ---------------------------------------------------------------------------------

def _naming(error: OSError, path) -> OSError:
    """The OSError of a failed write (disk full: no file name) naming the file written."""
    return OSError(error.errno, error.strerror or str(error), str(path))


def _save_png(fig: Figure, path):
    """Whole or not at all: the figure goes to a temporary file that then replaces `path`, so a
    kill while drawing leaves no cut-off PNG (a resumed run draws the figures again)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, dpi=100, format="png")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _naming(e, path) from e
    os.replace(tmp, path)


def plot_iter_losses(losses, path):
    """The tutorial's first figure: the training loss of every batch."""
    fig = Figure(figsize=(10, 4))
    ax = fig.add_subplot()
    ax.plot(np.arange(1, len(losses) + 1), losses, "b-", alpha=0.7, label="Iteration Loss")
    ax.set(xlabel="Iteration (batch number)", ylabel="Loss", title="Training loss per iteration")
    ax.legend()
    ax.grid(True)
    fig.tight_layout()
    _save_png(fig, path)


def plot_epoch_metrics(history, path):
    """The tutorial's second figure: accuracy and loss per epoch, train and test, two panels."""
    epochs = np.arange(1, len(history.train_acc) + 1)
    fig = Figure(figsize=(12, 4))
    panels = (("accuracy", "Accuracy (%)", history.train_acc, history.test_acc),
              ("loss", "Loss", history.train_loss, history.test_loss))
    for i, (what, unit, train, test) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, 2, i)
        ax.plot(epochs, train, "b-", label=f"Train {what}")
        ax.plot(epochs, test, "r-", label=f"Test {what}")
        ax.set(xlabel="Epoch", ylabel=unit, title=f"Training and test {what}")
        ax.legend()
        ax.grid(True)
    fig.tight_layout()
    _save_png(fig, path)


def plot_attention(images, maps, class_names, labels, path):
    """One row per image: the input, then the spatial attention gate of each CBAM block."""
    n = len(images)
    cols = 1 + len(maps)
    fig = Figure(figsize=(2 * cols, 2 * n))
    for row in range(n):
        ax = fig.add_subplot(n, cols, row * cols + 1)
        ax.imshow(np.asarray(images[row]), interpolation="nearest")
        ax.set_title(class_names[labels[row]] if row < len(labels) else "", fontsize=8)
        ax.axis("off")
        for j, m in enumerate(maps, start=1):
            ax = fig.add_subplot(n, cols, row * cols + 1 + j)
            ax.imshow(np.asarray(m[row], np.float32), cmap="viridis", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
            if row == 0:
                h, w = m.shape[1:3]
                ax.set_title(f"cbam{j} ({h}x{w})", fontsize=8)
            ax.axis("off")
    fig.suptitle("CBAM spatial attention (test images)")
    fig.tight_layout()
    _save_png(fig, path)


def plot_run(run_dir, history, images, maps, class_names, labels):
    """The run's three figures: iteration_loss.png, epoch_metrics.png, attention_maps.png."""
    run_dir = Path(run_dir)
    plot_iter_losses(history.iter_loss, run_dir / "iteration_loss.png")
    plot_epoch_metrics(history, run_dir / "epoch_metrics.png")
    plot_attention(images, maps, class_names, labels, run_dir / "attention_maps.png")


def plot_prediction(image, maps, caption: str, path):
    """One image's figure: the input the model saw (32x32 in the recipe), captioned with its
    top classes, then each CBAM block's spatial gate upsampled bilinearly to its size and laid
    over it. Each gate is
    coloured from its own lowest value (blue) to its highest (red), stated in its title: a
    trained gate often spans a narrow band of (0, 1)."""
    image = np.asarray(image)
    fig = Figure(figsize=(2.2 * (1 + len(maps)), 3.0))
    ax = fig.add_subplot(1, 1 + len(maps), 1)
    ax.imshow(image, interpolation="nearest")
    ax.set_title(caption, fontsize=8)
    ax.axis("off")
    extent = (-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5)  # the image's pixels
    for j, gate in enumerate(maps, start=1):
        gate = np.asarray(gate, np.float32)
        ax = fig.add_subplot(1, 1 + len(maps), 1 + j)
        ax.imshow(image, interpolation="nearest")
        ax.imshow(gate, cmap="jet", alpha=0.5, interpolation="bilinear", extent=extent)
        h, w = gate.shape
        ax.set_title(f"cbam{j} gate ({h}x{w})\n{gate.min():.2f} to {gate.max():.2f}",
                     fontsize=8)
        ax.axis("off")
    fig.savefig(Path(path), dpi=100, bbox_inches="tight")


def plot_gradcam(image, cam, caption: str, path):
    """One image's Grad-CAM figure: the input the model saw, and the map (0 blue to 1 red)
    laid over it; `caption` names the class and the layer explained."""
    image = np.asarray(image)
    fig = Figure(figsize=(4.4, 3.0))
    extent = (-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5)  # the image's pixels
    for j, overlay in enumerate((False, True), start=1):
        ax = fig.add_subplot(1, 2, j)
        ax.imshow(image, interpolation="nearest")
        if overlay:
            ax.imshow(np.asarray(cam, np.float32), cmap="jet", alpha=0.5, vmin=0, vmax=1,
                      interpolation="bilinear", extent=extent)
        ax.set_title(caption if overlay else f"input ({image.shape[0]}x{image.shape[1]})",
                     fontsize=8)
        ax.axis("off")
    fig.savefig(Path(path), dpi=100, bbox_inches="tight")


def plot_confusion_matrix(matrix, class_names, title: str, path):
    """Rows: the true class, columns: the predicted one (counts of test images)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = Figure(figsize=(1.0 + 0.6 * len(class_names), 0.6 + 0.6 * len(class_names)))
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(class_names)).plot(
        ax=ax, colorbar=False, values_format="d", xticks_rotation=45)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=100)
