"""Where a run's measurements go: TensorBoard event files (tensorboardX) and PNG plots.

Tags and cadence are the tutorial's (shared/SPEC.md, "Logging"), plus the test metrics, epoch
time, throughput, attention maps and hyperparameters it left out. Plots use matplotlib's
object API (no pyplot, so no interactive backend) and its default DejaVu font.
"""
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from tensorboardX import SummaryWriter

from cbam_jax.models import named_leaves

DEFAULT_RUN_DIR = "runs/CBAM_CNN_experiment"


def next_run_dir(base: str = DEFAULT_RUN_DIR) -> Path:
    """`base` if it does not exist, else the first free `base_1`, `base_2`, ... (the tutorial's)."""
    if not Path(base).exists():
        return Path(base)
    i = 1
    while Path(f"{base}_{i}").exists():
        i += 1
    return Path(f"{base}_{i}")


def latest_run_dir(base: str = DEFAULT_RUN_DIR) -> Path | None:
    """The most recent run directory `next_run_dir` handed out, or None."""
    if not Path(base).exists():
        return None
    i = 1
    while Path(f"{base}_{i}").exists():
        i += 1
    return Path(base) if i == 1 else Path(f"{base}_{i - 1}")


class Logbook:
    """TensorBoard writer with one method per kind of record; steps are the tutorial's."""

    def __init__(self, run_dir, purge_step: int | None = None):
        # purge_step: on resume, TensorBoard drops the killed run's events from this step on.
        self.writer = SummaryWriter(str(run_dir), purge_step=purge_step)

    def batch_scalars(self, global_step: int, loss: float, running_acc: float, lr: float):
        self.writer.add_scalar("Train/Batch_Loss", loss, global_step)
        self.writer.add_scalar("Train/Batch_Accuracy", running_acc, global_step)
        self.writer.add_scalar("Train/Learning_Rate", lr, global_step)

    def histograms(self, global_step: int, params, grads):
        """Every parameter after the step and its gradient of that step, by PyTorch name."""
        for name, value in named_leaves(params).items():
            self.writer.add_histogram(f"weights/{name}", np.asarray(value, np.float32),
                                      global_step)
        for name, value in named_leaves(grads).items():
            self.writer.add_histogram(f"grads/{name}", np.asarray(value, np.float32),
                                      global_step)

    def epoch_scalars(self, epoch: int, train_loss, train_acc, test_loss, test_acc, seconds,
                      images_per_s):
        """Step = 0-based epoch, as the tutorial's Train/Epoch_* scalars."""
        for tag, value in (("Train/Epoch_Loss", train_loss), ("Train/Epoch_Accuracy", train_acc),
                           ("Test/Epoch_Loss", test_loss), ("Test/Epoch_Accuracy", test_acc),
                           ("Train/Epoch_Time_s", seconds), ("Train/Images_per_s", images_per_s)):
            self.writer.add_scalar(tag, value, epoch)

    def attention(self, epoch: int, images, maps):
        """images: uint8 [n, 32, 32, 3]; maps: one [n, h, w] gate in [0, 1] per CBAM block."""
        self.writer.add_images("Attention/inputs", np.asarray(images, np.float32) / 255.0,
                               epoch, dataformats="NHWC")
        for i, m in enumerate(maps, start=1):
            self.writer.add_images(f"Attention/cbam{i}", np.asarray(m, np.float32)[..., None],
                                   epoch, dataformats="NHWC")

    def hyperparameters(self, hparams: dict):
        rows = "\n".join(f"| {k} | {v} |" for k, v in hparams.items())
        self.writer.add_text("Hyperparameters", "| name | value |\n|---|---|\n" + rows, 0)

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


def plot_iter_losses(losses, path):
    """The tutorial's first figure: the training loss of every batch."""
    fig = Figure(figsize=(10, 4))
    ax = fig.add_subplot()
    ax.plot(np.arange(1, len(losses) + 1), losses, "b-", alpha=0.7, label="Iteration Loss")
    ax.set(xlabel="Iteration (batch number)", ylabel="Loss", title="Training loss per iteration")
    ax.legend()
    ax.grid(True)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=100)


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
    fig.savefig(Path(path), dpi=100)


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
    fig.savefig(Path(path), dpi=100)
