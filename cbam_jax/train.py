"""Training engine: train state, train_step / eval_step as pure functions, the epoch loop.

The whole training set lives on the device as uint8. Each epoch's permutation is drawn on the
device; a jit-compiled call gathers its batch by index, augments it and takes the Adam step, and
writes the batch's loss and correct count into an on-device accumulator. The host dispatches calls
asynchronously and reads the accumulator only every `log_every` batches and at the end of the
epoch, so no per-step round trip stalls the device.

On XLA:CPU one call per step is the fast path (a rolled loop over steps makes the backward convs
fall off the fast kernels, jax-ml/jax#12868); on GPU/TPU, where dispatch overhead dominates,
`steps_per_call` > 1 runs that many steps in one rolled `fori_loop`.
"""
import dataclasses
import functools
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cbam_jax import distributed
from cbam_jax.augment import augment, normalize
from cbam_jax.models import INPUT_SHAPE
from cbam_jax.resnet import MODEL_NAMES, create_model
from cbam_jax.schedule import PlateauState, tutorial_plateau

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Independent PRNG streams folded from the run's key: per-step (augmentation, dropout) keys
# are folded with the global step, shuffles with the epoch, so the two never collide.
_STEP_STREAM, _SHUFFLE_STREAM = 0, 1


def make_optimizer(learning_rate: float) -> optax.GradientTransformation:
    """Adam with PyTorch's defaults (betas 0.9/0.999, eps 1e-8 outside the square root).

    The learning rate lives in the optimizer state (`inject_hyperparams`), so the plateau
    schedule can change it between epochs without recompiling the step.
    """
    return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate, b1=0.9, b2=0.999,
                                                eps=1e-8)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The tutorial's recipe by default; the cadences are the tutorial's TensorBoard ones."""

    epochs: int = 50
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 0
    dtype: str = "float32"  # compute dtype; params, optimizer, loss and BN stats stay float32
    model: str = "cbam_cnn"  # one of cbam_jax.resnet.MODEL_NAMES
    steps_per_call: int | None = None  # None: 1 on CPU, DEVICE_STEPS_PER_CALL on GPU/TPU
    log_every: int = 100  # batches between Train/Batch_* scalars (and host reads)
    hist_every: int = 500  # batches between weights/ and grads/ histograms
    num_attention_images: int = 8

    def __post_init__(self):
        for name in ("epochs", "batch_size", "log_every", "hist_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps_per_call is not None and self.steps_per_call < 1:
            raise ValueError(f"steps_per_call must be >= 1, got {self.steps_per_call}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive finite number, got "
                             f"{self.learning_rate}")
        if self.model not in MODEL_NAMES:
            raise ValueError(f"model must be one of {MODEL_NAMES}, got {self.model!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


DEVICE_STEPS_PER_CALL = 50


def default_steps_per_call() -> int:
    return 1 if jax.default_backend() == "cpu" else DEVICE_STEPS_PER_CALL


@functools.lru_cache(maxsize=None)
def build(dtype: str = "float32", model: str = "cbam_cnn",
          num_classes: int = 10) -> tuple[nn.Module, optax.GradientTransformation]:
    """The model and optimizer for a compute dtype, built once per process.

    The compiled steps are cached per (model, optimizer) object; building them once lets
    repeated runs in one process (tests, notebooks) reuse the compiled code. The optimizer's
    initial learning rate is irrelevant: the state carries the one in use.
    """
    return create_model(model, num_classes, DTYPES[dtype]), make_optimizer(1e-3)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: batches trained so far (the tutorial's global_step)
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # the run's key; per-step and per-epoch keys are folded from it


def create_train_state(model, tx, rng: jax.Array, learning_rate: float) -> TrainState:
    """Initial state. `init` runs eagerly so `params` keeps the modules' call order (reports)."""
    init_rng, train_rng = jax.random.split(rng)
    variables = model.init(init_rng, jnp.zeros((1, *INPUT_SHAPE), jnp.float32), train=False)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                       batch_stats=variables["batch_stats"],
                       opt_state=tx.init(variables["params"]), rng=train_rng)
    return set_learning_rate(state, learning_rate)


def set_learning_rate(state: TrainState, learning_rate: float) -> TrainState:
    old = state.opt_state.hyperparams["learning_rate"]
    # Where the old value lives (e.g. replicated over a mesh): another placement would recompile.
    new = jax.device_put(np.float32(learning_rate), old.sharding)
    hyperparams = dict(state.opt_state.hyperparams, learning_rate=new)
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))


def learning_rate(state: TrainState) -> float:
    return float(state.opt_state.hyperparams["learning_rate"])


def cross_entropy(logits, labels):
    """Mean cross-entropy over the batch, as `nn.CrossEntropyLoss()`; logits: [B, K] float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def adam_step(model, tx, state: TrainState, x, labels, dropout_key):
    """Forward in train mode on a normalised batch x, cross-entropy, one Adam update.

    Returns (state, loss, logits, grads); `train_step` adds the augmentation and the metrics.
    """
    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, x,
                                      train=True, rngs={"dropout": dropout_key},
                                      mutable=["batch_stats"])
        return cross_entropy(logits, labels), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          batch_stats=batch_stats, opt_state=opt_state)
    return state, loss, logits, grads


def train_step(model, tx, state: TrainState, images, labels, with_grads: bool = False):
    """One Adam step on a uint8 batch: augment, forward in train mode, cross-entropy, update.

    images: uint8 [B, 32, 32, 3]; labels: int32 [B]. Returns (state, metrics) with the batch's
    mean loss and number of correct predictions (and the gradients when `with_grads`).
    """
    key = jax.random.fold_in(jax.random.fold_in(state.rng, _STEP_STREAM), state.step)
    augment_key, dropout_key = jax.random.split(key)
    state, loss, logits, grads = adam_step(model, tx, state, augment(augment_key, images),
                                           labels, dropout_key)
    metrics = {"loss": loss, "correct": jnp.sum(jnp.argmax(logits, -1) == labels)}
    if with_grads:
        metrics["grads"] = grads
    return state, metrics


def eval_step(model, state: TrainState, images, labels, mask):
    """Eval-mode metrics of a uint8 batch whose padding rows have mask False.

    Returns the mean loss over the real rows (the tutorial averages per-batch means) and their
    number of correct predictions. Eval mode uses running statistics, so padding cannot leak
    into the real rows.
    """
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         normalize(images), train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    count = jnp.maximum(mask.sum(), 1)
    return {"loss": jnp.where(mask, losses, 0.0).sum() / count,
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels) & mask)}


# --- on-device epoch iteration ---------------------------------------------------------------

def _new_accumulator(num_batches: int):
    """Per-batch loss and correct count of one epoch, plus the first step with a bad loss."""
    return {"loss": jnp.zeros((num_batches,), jnp.float32),
            "correct": jnp.zeros((num_batches,), jnp.int32),
            "first_nonfinite_step": jnp.full((), -1, jnp.int32)}


def _record(accum, batch, step, metrics):
    first = accum["first_nonfinite_step"]
    bad = ~jnp.isfinite(metrics["loss"])
    return {"loss": accum["loss"].at[batch].set(metrics["loss"]),
            "correct": accum["correct"].at[batch].set(metrics["correct"].astype(jnp.int32)),
            "first_nonfinite_step": jnp.where((first < 0) & bad, step, first)}


@functools.partial(jax.jit, static_argnames=("n",))
def epoch_permutation(rng, epoch, n: int):
    """The epoch's shuffle, drawn on the device from the run's key."""
    key = jax.random.fold_in(jax.random.fold_in(rng, _SHUFFLE_STREAM), epoch)
    return jax.random.permutation(key, n)


@functools.partial(jax.jit, donate_argnames=("state", "accum"),
                   static_argnames=("model", "tx", "batch_size", "size", "looped", "with_grads",
                                    "data_sharding"))
def train_batches(state, accum, images, labels, perm, first_batch, num_batches, *, model, tx,
                  batch_size: int, size: int, looped: bool, with_grads: bool = False,
                  data_sharding=None):
    """Train on batches [first_batch, first_batch + num_batches) of the epoch's permutation.

    images: uint8 [N, 32, 32, 3] and labels [N] of the whole training set (on device);
    batch i is perm[i * batch_size : i * batch_size + size]. `looped` runs a rolled loop over
    `num_batches` (one compile for any count); otherwise exactly one step (`num_batches` == 1).
    `data_sharding` (cbam_jax.distributed.batch_sharding) splits each batch over a mesh.
    """
    shard = functools.partial(distributed.shard_batch, sharding=data_sharding)

    def one(batch, carry):
        state, accum = carry
        idx = jax.lax.dynamic_slice_in_dim(perm, batch * batch_size, size)
        new_state, metrics = train_step(model, tx, state, shard(images[idx]), shard(labels[idx]),
                                        with_grads)
        return new_state, _record(accum, batch, state.step, metrics), metrics.get("grads")

    if looped:
        state, accum = jax.lax.fori_loop(first_batch, first_batch + num_batches,
                                         lambda b, c: one(b, c)[:2], (state, accum))
        return state, accum, None
    return one(first_batch, (state, accum))


def epoch_plan(num_train: int, batch_size: int, steps_per_call: int, hist_every: int):
    """The calls of one epoch: (first_batch, num_batches, batch size, with_grads) tuples.

    Full batches run `steps_per_call` at a time; a histogram batch runs alone in the variant
    that returns gradients. The final partial batch (50,000 = 781 * 64 + 16 in the tutorial,
    whose DataLoader keeps it) is its own call with its own compiled shape: padding it would
    change the BatchNorm batch statistics.
    """
    full, rest = divmod(num_train, batch_size)
    calls, batch = [], 0
    while batch < full:
        if (batch + 1) % hist_every == 0:
            calls.append((batch, 1, batch_size, True))
            batch += 1
            continue
        next_hist = (batch // hist_every + 1) * hist_every - 1
        count = min(steps_per_call, next_hist - batch, full - batch)
        calls.append((batch, count, batch_size, False))
        batch += count
    if rest:
        calls.append((full, 1, rest, (full + 1) % hist_every == 0))
    return calls


@functools.partial(jax.jit, donate_argnames=("accum",),
                   static_argnames=("model", "batch_size", "looped", "data_sharding"))
def eval_batches(state, accum, images, labels, mask, first_batch, num_batches, *, model,
                 batch_size: int, looped: bool, data_sharding=None):
    """Evaluate batches of the padded test set: images uint8 [M, 32, 32, 3], M % batch_size == 0."""

    def one(batch, accum):
        sl = lambda a: distributed.shard_batch(
            jax.lax.dynamic_slice_in_dim(a, batch * batch_size, batch_size), data_sharding)
        metrics = eval_step(model, state, sl(images), sl(labels), sl(mask))
        return {"loss": accum["loss"].at[batch].set(metrics["loss"]),
                "correct": accum["correct"].at[batch].set(metrics["correct"].astype(jnp.int32))}

    if looped:
        return jax.lax.fori_loop(first_batch, first_batch + num_batches, one, accum)
    return one(first_batch, accum)


@functools.partial(jax.jit, static_argnames=("model",))
def attention_maps(model, state: TrainState, images):
    """Each CBAM block's spatial gate, eval mode: CBAMCNN's [n, 16, 16], [n, 8, 8], [n, 4, 4]."""
    _, inter = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                           normalize(images), train=False, mutable=["intermediates"])
    return [gate[..., 0] for path, gate in jax.tree_util.tree_leaves_with_path(inter)
            if any(getattr(k, "key", None) == "spatial_attention" for k in path)]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; the run stopped before checkpointing that state."""


class ResumeMismatchError(ValueError):
    """A resumed run was given settings that would make it differ from the interrupted one."""


@dataclasses.dataclass
class History:
    """Per-epoch metrics and every batch's loss: what the tutorial plots, and resume needs."""

    train_loss: list = dataclasses.field(default_factory=list)
    train_acc: list = dataclasses.field(default_factory=list)
    test_loss: list = dataclasses.field(default_factory=list)
    test_acc: list = dataclasses.field(default_factory=list)
    lr: list = dataclasses.field(default_factory=list)  # the learning rate the epoch trained with
    epoch_time: list = dataclasses.field(default_factory=list)
    images_per_s: list = dataclasses.field(default_factory=list)
    iter_loss: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class FitResult:
    state: TrainState
    history: History
    run_dir: Path
    epochs_done: int

    @property
    def final_test_acc(self) -> float:
        return self.history.test_acc[-1]


class _Progress:
    """A one-line progress bar with images/s (carriage return on a terminal, lines otherwise)."""

    def __init__(self, epoch, epochs, num_batches, stream=None):
        self.epoch, self.epochs, self.num_batches = epoch, epochs, num_batches
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, batches, images, loss, acc):
        rate = images / max(time.perf_counter() - self.start, 1e-9)
        filled = int(20 * batches / self.num_batches)
        line = (f"Epoch {self.epoch}/{self.epochs} [{'#' * filled}{'.' * (20 - filled)}] "
                f"{batches}/{self.num_batches} | loss {loss:.4f} | acc {acc:.2f}% | "
                f"{rate:,.0f} img/s")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()


def _pad_test_set(images, labels, batch_size):
    """Pad the test set to whole batches; the mask marks the real images."""
    n = len(labels)
    padded = -(-n // batch_size) * batch_size
    pad = padded - n
    mask = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    return jax.device_put(images), jax.device_put(labels.astype(np.int32)), jax.device_put(mask)


def evaluate(model, state, test_images, test_labels, test_mask, batch_size, looped,
             data_sharding=None):
    """(mean of per-batch mean losses, accuracy %) over exactly the real test images."""
    num_batches = len(test_mask) // batch_size
    accum = {"loss": jnp.zeros((num_batches,), jnp.float32),
             "correct": jnp.zeros((num_batches,), jnp.int32)}
    if data_sharding is not None:  # where the step returns it, so that no call recompiles
        accum = distributed.put_replicated(accum, data_sharding.mesh)
    kwargs = dict(model=model, batch_size=batch_size, looped=looped, data_sharding=data_sharding)
    if looped:
        accum = eval_batches(state, accum, test_images, test_labels, test_mask, np.int32(0),
                             np.int32(num_batches), **kwargs)
    else:
        for batch in range(num_batches):
            accum = eval_batches(state, accum, test_images, test_labels, test_mask,
                                 np.int32(batch), np.int32(1), **kwargs)
    losses, correct = jax.device_get((accum["loss"], accum["correct"]))
    # Like the tutorial: the sum of per-batch means over the number of batches, in float64.
    test_loss = float(np.sum(losses.astype(np.float64)) / num_batches)
    return test_loss, 100.0 * float(correct.sum()) / float(test_mask.sum())


def _check_finite(first_nonfinite_step, loss_at, num_batches, checkpoint_note):
    if first_nonfinite_step >= 0:
        epoch, batch = divmod(int(first_nonfinite_step), num_batches)
        raise NonFiniteLossError(
            f"training loss is {loss_at} at step {first_nonfinite_step} (epoch {epoch + 1}, "
            f"batch {batch + 1} of {num_batches}): stopping. {checkpoint_note}")


def train_epoch(model, tx, state, train_images, train_labels, epoch: int, config: TrainConfig,
                steps_per_call: int, book=None, progress: _Progress | None = None,
                checkpoint_note: str = "", data_sharding=None):
    """Train one epoch; returns (state, per-batch losses [float32], per-batch correct counts).

    Reads the on-device accumulator every `config.log_every` batches (TensorBoard scalars,
    progress, the non-finite check) and at the end.
    """
    n = len(train_labels)
    batch_size = config.batch_size
    num_batches = -(-n // batch_size)
    sizes = np.minimum(batch_size, n - batch_size * np.arange(num_batches))
    perm = epoch_permutation(state.rng, np.int32(epoch), n)
    accum = _new_accumulator(num_batches)
    if data_sharding is not None:  # where the step returns it, so that no call recompiles
        accum = distributed.put_replicated(accum, data_sharding.mesh)
    lr = learning_rate(state)
    logged_until = 0  # batches whose log boundary has been handled

    def read(done):
        losses, correct, first_bad = jax.device_get(
            (accum["loss"], accum["correct"], accum["first_nonfinite_step"]))
        if first_bad >= 0:
            _check_finite(first_bad, losses[first_bad % num_batches], num_batches,
                          checkpoint_note)
        seen = np.cumsum(sizes[:done])
        hits = np.cumsum(correct[:done])
        for b in range(logged_until, done):
            if (b + 1) % config.log_every == 0 and book is not None:
                book.batch_scalars(epoch * num_batches + b, float(losses[b]),
                                   100.0 * hits[b] / seen[b], lr)
        if progress is not None and done:
            progress.update(done, int(seen[-1]), float(np.mean(losses[:done], dtype=np.float64)),
                            100.0 * hits[-1] / seen[-1])
        return losses, correct

    for first, count, size, with_grads in epoch_plan(n, batch_size, steps_per_call,
                                                      config.hist_every):
        state, accum, grads = train_batches(
            state, accum, train_images, train_labels, perm, np.int32(first), np.int32(count),
            model=model, tx=tx, batch_size=batch_size, size=size, looped=count > 1,
            with_grads=with_grads, data_sharding=data_sharding)
        done = first + count
        if with_grads and book is not None:
            book.histograms(epoch * num_batches + first, state.params, grads)
        if done == num_batches or done // config.log_every > logged_until // config.log_every:
            losses, correct = read(done)
            logged_until = done
    return state, losses, correct


def _meta(config, dataset_name, epoch, plateau, history, best_test_acc):
    return {"epoch": epoch, "dataset": dataset_name, "config": dataclasses.asdict(config),
            "plateau": plateau._asdict(), "history": dataclasses.asdict(history),
            "best_test_acc": best_test_acc}


# Settings whose change would make a resumed run differ from an uninterrupted one.
_RESUME_KEYS = ("batch_size", "learning_rate", "seed", "dtype", "model")


def fit(config: TrainConfig, dataset, run_dir, *, checkpoint_dir=None, resume: bool = False,
        stop_after_epoch: int | None = None, log: Callable[[str], None] = print,
        progress_stream=None, report_params: bool = False, mesh=None) -> FitResult:
    """The tutorial's training run: epochs of training then evaluation, the plateau schedule on
    the test loss, TensorBoard, plots and checkpoints in `run_dir`.

    `resume` continues from the latest checkpoint to exactly the result of an uninterrupted run
    (same device). `stop_after_epoch` ends the run after that epoch's checkpoint, as a kill would.
    `mesh` (default: every device of every process, cbam_jax.distributed.make_mesh) splits each
    batch over its devices; only the primary process logs, writes TensorBoard files and plots.
    """
    from cbam_jax.checkpoint import Checkpoints  # orbax, tensorboardX, matplotlib: train extras
    from cbam_jax.logbook import Logbook, plot_attention, plot_epoch_metrics, plot_iter_losses

    run_dir = Path(run_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else run_dir / "checkpoints"
    mesh = mesh if mesh is not None else distributed.make_mesh()
    distributed.check_batch_size(config.batch_size, mesh)
    data_sharding = distributed.batch_sharding(mesh)
    primary = distributed.is_primary_process()
    if not primary:
        log, progress_stream = (lambda *_: None), open(os.devnull, "w")
    model, tx = build(config.dtype, config.model, len(dataset.class_names))
    steps_per_call = config.steps_per_call or default_steps_per_call()
    looped_eval = steps_per_call > 1
    n_train = len(dataset.train_labels)
    num_batches = -(-n_train // config.batch_size)

    schedule = tutorial_plateau()
    state = create_train_state(model, tx, jax.random.PRNGKey(config.seed), config.learning_rate)
    if report_params:  # before any pytree map, which would sort the modules by name
        from cbam_jax.models import parameter_report
        parameter_report(state.params, log)
    state = distributed.put_replicated(state, mesh)
    plateau, history = schedule.init(config.learning_rate), History()
    start_epoch, best_test_acc = 0, -1.0
    checkpoints = Checkpoints(checkpoint_dir)
    if resume:
        state, meta = checkpoints.restore_latest(state)
        saved = meta["config"]
        changed = {k: (saved[k], getattr(config, k)) for k in _RESUME_KEYS
                   if saved[k] != getattr(config, k)}
        if meta["dataset"] != dataset.name:
            changed["dataset"] = (meta["dataset"], dataset.name)
        if changed:
            raise ResumeMismatchError(
                "cannot resume with different settings (saved, given): "
                + ", ".join(f"{k}: {v[0]!r} != {v[1]!r}" for k, v in changed.items()))
        start_epoch, best_test_acc = meta["epoch"], meta["best_test_acc"]
        plateau = PlateauState(**meta["plateau"])
        history = History(**meta["history"])
        log(f"Resuming from {checkpoint_dir} after epoch {start_epoch} (step "
            f"{int(state.step)}, lr {plateau.lr:.3g})")

    book = (Logbook(run_dir, purge_step=start_epoch * num_batches if resume else None)
            if primary else None)
    if book is not None and not resume:
        book.hyperparameters({**dataclasses.asdict(config), "dataset": dataset.name,
                              "steps_per_call": steps_per_call, "device": str(jax.devices()[0]),
                              "devices": mesh.size, "processes": jax.process_count(),
                              "scheduler": "ReduceLROnPlateau(mode=min, patience=3, factor=0.5) "
                                           "on the test loss"})
    train_images, train_labels = distributed.put_replicated(
        (np.asarray(dataset.train_images, np.uint8), np.asarray(dataset.train_labels, np.int32)),
        mesh)
    test_images, test_labels, test_mask = distributed.put_replicated(_pad_test_set(
        np.asarray(dataset.test_images, np.uint8), np.asarray(dataset.test_labels, np.int32),
        config.batch_size), mesh)
    shown = np.asarray(dataset.test_images[:config.num_attention_images], np.uint8)

    maps = None
    try:
        for epoch in range(start_epoch, config.epochs):
            state = set_learning_rate(state, plateau.lr)
            note = (f"The last good checkpoint (epoch {epoch}) is in {checkpoint_dir}."
                    if epoch else "No checkpoint was written.")
            progress = _Progress(epoch + 1, config.epochs, num_batches, progress_stream)
            start = time.perf_counter()
            state, losses, correct = train_epoch(model, tx, state, train_images, train_labels,
                                                 epoch, config, steps_per_call, book, progress,
                                                 note, data_sharding)
            epoch_time = time.perf_counter() - start
            progress.close()
            train_loss = float(np.mean(losses, dtype=np.float64))
            train_acc = 100.0 * float(correct.sum()) / n_train
            test_loss, test_acc = evaluate(model, state, test_images, test_labels, test_mask,
                                           config.batch_size, looped_eval, data_sharding)
            if not math.isfinite(test_loss):
                raise NonFiniteLossError(f"test loss is {test_loss} after epoch {epoch + 1}: "
                                         f"stopping. {note}")
            history.train_loss.append(train_loss)
            history.train_acc.append(train_acc)
            history.test_loss.append(test_loss)
            history.test_acc.append(test_acc)
            history.lr.append(plateau.lr)
            history.epoch_time.append(epoch_time)
            history.images_per_s.append(n_train / epoch_time)
            history.iter_loss.extend(float(x) for x in losses)
            lr_used = plateau.lr
            plateau = schedule.step(plateau, test_loss)

            # Every process computes the maps: a jitted call over the mesh is a collective.
            maps = [np.asarray(m) for m in attention_maps(model, state, shown)]
            if book is not None:
                book.epoch_scalars(epoch, train_loss, train_acc, test_loss, test_acc, epoch_time,
                                   n_train / epoch_time)
                book.attention(epoch, shown, maps)
                book.flush()

            is_best = test_acc > best_test_acc
            best_test_acc = max(best_test_acc, test_acc)
            checkpoints.save(epoch + 1, state,
                             _meta(config, dataset.name, epoch + 1, plateau, history,
                                   best_test_acc), is_best=is_best)
            lr_note = f"{lr_used:.3g}" + (f" -> {plateau.lr:.3g}" if plateau.lr != lr_used else "")
            log(f"Epoch {epoch + 1}/{config.epochs} done | train loss {train_loss:.4f} acc "
                f"{train_acc:.2f}% | test loss {test_loss:.4f} acc {test_acc:.2f}% | lr {lr_note} "
                f"| {epoch_time:.1f} s, {n_train / epoch_time:,.0f} img/s")
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
    finally:  # also after a failure or Ctrl-C: the figures of the epochs that finished
        if book is not None:
            book.close()
        checkpoints.close()  # orbax saves collectively: process 0 writes the replicated state
        # The last finished epoch's maps (a failed epoch's state is gone); process 0 plots.
        if maps is not None and primary:
            plot_iter_losses(history.iter_loss, run_dir / "iteration_loss.png")
            plot_epoch_metrics(history, run_dir / "epoch_metrics.png")
            plot_attention(shown, maps, dataset.class_names,
                           [int(x) for x in dataset.test_labels[:len(shown)]],
                           run_dir / "attention_maps.png")
    return FitResult(state, history, run_dir, len(history.test_acc))
