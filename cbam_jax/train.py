"""Training engine: the train state, `train_step(state, images, labels)` and `eval_step` as pure
functions, the epoch loop, and `fit`, the tutorial's whole run.

The whole data set lives on the device as uint8 (`cbam_jax.loader.DeviceData`). Each epoch's
permutation is drawn on the device; a jit-compiled call gathers its batch by index, augments it
and takes the Adam step, and writes the batch's loss and correct count into an on-device
record of the epoch. The host dispatches calls asynchronously and reads that record only every
`log_every` batches, every few seconds for the progress line, and at the end of the epoch, so
no per-step round trip stalls the device.

A call trains `steps_per_call` batches (`epoch_plan`): on GPU/TPU, where dispatch overhead
dominates, 50 of them in one rolled `fori_loop`; on XLA:CPU one, since a rolled loop there makes
the backward convolutions fall off the fast kernels (jax-ml/jax#12868).
"""
import dataclasses
import functools
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from cbam_jax import distributed, rundir
from cbam_jax.augment import augment, normalize
from cbam_jax.data import CIFAR10_NORMALIZATION, IMAGE_SHAPE, Normalization
from cbam_jax.inference import attention_maps
from cbam_jax.loader import DeviceData, check_fits, place_data
from cbam_jax.recipe import RUN_RECORD, TrainConfig, cadence_in_epoch
from cbam_jax.registry import create_model
from cbam_jax.schedule import PlateauState, tutorial_plateau

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # the names of recipe.DTYPES
DEVICE_STEPS_PER_CALL = 50  # GPU/TPU: steps per call, in one rolled loop
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


def default_steps_per_call() -> int:
    """Steps per compiled train call when the config leaves it open: 1 on XLA:CPU, where a rolled
    loop is slow (jax-ml/jax#12868) and 2 steps unrolled in one call measured no faster
    (docs/benchmarks.md, "Design decisions"); DEVICE_STEPS_PER_CALL on GPU/TPU."""
    return 1 if jax.default_backend() == "cpu" else DEVICE_STEPS_PER_CALL


@functools.lru_cache(maxsize=None)
def build(dtype: str = "float32", model: str = "cbam_cnn", num_classes: int = 10,
          image_size: int = IMAGE_SHAPE[0]) -> tuple[Any, optax.GradientTransformation]:
    """The model (for square images of `image_size`) and optimizer for a compute dtype, built
    once per process.

    Both ride on the train state as static fields, so they are part of the compiled steps'
    cache key: building them once lets repeated runs in one process (tests, notebooks) reuse
    the compiled code. The optimizer's initial learning rate is irrelevant: the state carries
    the one in use.
    """
    return (create_model(model, num_classes, DTYPES[dtype], image_size=image_size),
            make_optimizer(1e-3))


class TrainState(train_state.TrainState):
    """Flax's train state (step, apply_fn, params, tx, opt_state) plus BatchNorm's running
    statistics and the run's PRNG key; per-step and per-epoch keys are folded from it. The
    data set's `normalization` (static, like apply_fn) is the Normalize its images get."""

    batch_stats: Any
    rng: jax.Array
    normalization: Normalization = flax.struct.field(pytree_node=False,
                                                     default=CIFAR10_NORMALIZATION)


def create_train_state(model, tx, rng: jax.Array, learning_rate: float,
                       image_size: int = IMAGE_SHAPE[0],
                       normalization: Normalization = CIFAR10_NORMALIZATION) -> TrainState:
    """Initial state for images of `image_size`, made in one compiled call (as Flax's examples
    do: op by op, each of the hundreds of initialiser ops would be a dispatch and a compile).
    `params` keeps the modules' call order (reports), which a compiled call's output, its
    dicts sorted by key, does not."""
    call_order = {}

    @jax.jit
    def initial(rng):
        init_rng, train_rng = jax.random.split(rng)
        variables = model.init(init_rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32),
                               train=False)
        call_order["variables"] = _keys(variables)
        return variables, tx.init(variables["params"]), train_rng

    variables, opt_state, train_rng = initial(rng)
    variables = _in_order(variables, call_order["variables"])
    state = TrainState(step=jnp.zeros((), jnp.int32), apply_fn=model.apply,
                       params=variables["params"], tx=tx, opt_state=opt_state,
                       batch_stats=variables["batch_stats"], rng=train_rng,
                       normalization=normalization)
    return set_learning_rate(state, learning_rate)


def _keys(tree):
    """The nested dicts of `tree` with their keys in order, and None for the leaves."""
    return {k: _keys(v) for k, v in tree.items()} if isinstance(tree, dict) else None


def _in_order(tree, keys):
    """`tree` with its nested dicts' keys in the order of `keys` (a `_keys` result)."""
    return {k: _in_order(tree[k], keys[k]) for k in keys} if isinstance(keys, dict) else tree


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


def adam_step(state: TrainState, x, labels, dropout_key):
    """Forward in train mode on a normalised batch x, cross-entropy, one Adam update.

    Returns (state, loss, logits, grads); `train_step` adds the augmentation and the metrics.
    """
    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True,
            rngs={"dropout": dropout_key}, mutable=["batch_stats"])
        return cross_entropy(logits, labels), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss, logits, grads


def train_step(state: TrainState, images, labels):
    """One Adam step on a uint8 batch: augment, forward in train mode, cross-entropy, update.

    images: uint8 [B, S, S, 3]; labels: int32 [B]. Returns (state, metrics): the batch's mean
    loss, its number of correct predictions, and the gradients.
    """
    key = jax.random.fold_in(jax.random.fold_in(state.rng, _STEP_STREAM), state.step)
    augment_key, dropout_key = jax.random.split(key)
    state, loss, logits, grads = adam_step(
        state, augment(augment_key, images, state.normalization), labels, dropout_key)
    return state, {"loss": loss, "correct": jnp.sum(jnp.argmax(logits, -1) == labels),
                   "grads": grads}


def eval_per_image(state: TrainState, images, labels):
    """Eval-mode cross-entropy and correctness of each image of a uint8 batch: ([B] float32,
    [B] bool). Eval mode uses running statistics, so each image's result depends on it alone."""
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                            normalize(images, state.normalization), train=False)
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels),
            jnp.argmax(logits, -1) == labels)


def masked_metrics(losses, correct, mask):
    """Per batch (the last axis): the mean loss over the rows where mask is True (the tutorial
    averages per-batch means) and their number of correct predictions."""
    count = jnp.maximum(mask.sum(axis=-1), 1)
    return {"loss": jnp.where(mask, losses, 0.0).sum(axis=-1) / count,
            "correct": jnp.sum(correct & mask, axis=-1, dtype=jnp.int32)}


def eval_step(state: TrainState, images, labels, mask):
    """Eval-mode metrics of a uint8 batch whose padding rows have mask False: the mean loss over
    the real rows and their number of correct predictions."""
    return masked_metrics(*eval_per_image(state, images, labels), mask)


# --- on-device epoch iteration ---------------------------------------------------------------

@flax.struct.dataclass
class EpochRecord:
    """What one epoch leaves on the device: its shuffle, every batch's loss and correct count,
    and the first step whose loss was not finite (-1: none)."""

    perm: jax.Array                  # int32 [N]
    loss: jax.Array                  # float32 [num_batches]
    correct: jax.Array               # int32 [num_batches]
    first_nonfinite_step: jax.Array  # int32 []

    def record(self, batch, step, metrics) -> "EpochRecord":
        first = self.first_nonfinite_step
        bad = ~jnp.isfinite(metrics["loss"])
        return self.replace(
            loss=self.loss.at[batch].set(metrics["loss"]),
            correct=self.correct.at[batch].set(metrics["correct"].astype(jnp.int32)),
            first_nonfinite_step=jnp.where((first < 0) & bad, step, first))


@functools.partial(jax.jit, static_argnames=("n", "num_batches"))
def new_epoch_record(rng, epoch, n: int, num_batches: int) -> EpochRecord:
    """The epoch's shuffle, drawn on the device from the run's key, and an empty record."""
    key = jax.random.fold_in(jax.random.fold_in(rng, _SHUFFLE_STREAM), epoch)
    return EpochRecord(perm=jax.random.permutation(key, n),
                       loss=jnp.zeros((num_batches,), jnp.float32),
                       correct=jnp.zeros((num_batches,), jnp.int32),
                       first_nonfinite_step=jnp.full((), -1, jnp.int32))


class CallShape(NamedTuple):
    """What a compiled train call is specialised to; each distinct value compiles once."""
    size: int          # images per batch (the epoch's final partial batch has its own)
    looped: bool       # a rolled fori_loop over the call's batches (any count); else one step
    with_grads: bool   # return the step's gradients, for the histograms (one step)


def call_shape(size: int, count: int, with_grads: bool = False) -> CallShape:
    """The shape of a call that trains `count` batches of `size`: one step needs no loop."""
    return CallShape(size, count > 1, with_grads)


class Call(NamedTuple):
    first: int         # the call's first batch in the epoch
    count: int         # how many batches it trains
    shape: CallShape


@functools.partial(jax.jit, donate_argnames=("state", "record"), static_argnames=("shape",))
def train_batches(state: TrainState, record: EpochRecord, data: DeviceData, first_batch,
                  num_batches, *, shape: CallShape):
    """Train on batches [first_batch, first_batch + num_batches) of the epoch's permutation.

    Returns (state, record, the step's gradients or None). `shape.looped` runs a rolled loop
    over `num_batches` (one compile for any count); otherwise `num_batches` is 1.
    """
    def one(batch, carry):
        state, record = carry
        images, labels = data.train_batch(record.perm, batch, shape.size)
        new_state, metrics = train_step(state, images, labels)
        return (new_state, record.record(batch, state.step, metrics)), metrics["grads"]

    if shape.looped:
        carry = jax.lax.fori_loop(first_batch, first_batch + num_batches,
                                  lambda b, c: one(b, c)[0], (state, record))
        return *carry, None
    carry, grads = one(first_batch, (state, record))
    return *carry, grads if shape.with_grads else None


def epoch_plan(num_train: int, batch_size: int, hist_every: int,
               steps_per_call: int | None = None) -> list[Call]:
    """The calls of one epoch: the engine's whole call plan.

    Full batches run `steps_per_call` at a time (None: `default_steps_per_call()`), in a rolled
    loop, fewer up to a histogram batch and at the end; a histogram batch runs alone in the
    variant that returns gradients. The final partial batch
    (50,000 = 781 * 64 + 16 in the tutorial, whose DataLoader keeps it) is its own call with its
    own compiled shape: padding it would change the BatchNorm batch statistics.
    """
    steps_per_call = steps_per_call or default_steps_per_call()
    full, rest = divmod(num_train, batch_size)
    calls, batch = [], 0
    while batch < full:
        if (batch + 1) % hist_every == 0:
            calls.append(Call(batch, 1, call_shape(batch_size, 1, with_grads=True)))
            batch += 1
            continue
        next_hist = (batch // hist_every + 1) * hist_every - 1
        count = min(steps_per_call, next_hist - batch, full - batch)
        calls.append(Call(batch, count, call_shape(batch_size, count)))
        batch += count
    if rest:
        calls.append(Call(full, 1, call_shape(rest, 1, (full + 1) % hist_every == 0)))
    return calls


@functools.partial(jax.jit, donate_argnames=("record",), static_argnames=("looped",))
def eval_batches(state: TrainState, record, data: DeviceData, first_batch, num_batches, *,
                 looped: bool):
    """Evaluate test batches [first_batch, first_batch + num_batches) into `record`
    ({'loss', 'correct'}: [batches, batch_size], one entry per test row, laid out over the
    mesh as the batches are).

    Per image, not per batch: a batch's mean over a mesh would be an all-reduce at the end of
    every call, where each device waits for the slowest (5% of evaluation on 2 CPU devices,
    docs/benchmarks.md); `batch_metrics` reduces the whole record once.
    """

    def one(batch, record):
        images, labels, _ = data.test_batch(batch)
        losses, correct = eval_per_image(state, images, labels)
        return {"loss": record["loss"].at[batch].set(losses),
                "correct": record["correct"].at[batch].set(correct)}

    if looped:
        return jax.lax.fori_loop(first_batch, first_batch + num_batches, one, record)
    return one(first_batch, record)


@jax.jit
def batch_metrics(record, data: DeviceData):
    """`masked_metrics` of every test batch of an `eval_batches` record: {'loss', 'correct'},
    one entry per batch, on every device."""
    mask = data.test_mask.reshape(record["loss"].shape)
    metrics = masked_metrics(record["loss"], record["correct"], mask)
    if data.batch_sharding is None:
        return metrics
    return jax.lax.with_sharding_constraint(
        metrics, distributed.replicated(data.batch_sharding.mesh))


def evaluate(state: TrainState, data: DeviceData, looped: bool = True) -> tuple[float, float]:
    """(mean of per-batch mean losses, accuracy %) over exactly the real test images.

    `looped`: all test batches in one call, a rolled loop, on every backend: the forward convs
    keep their speed in a loop on XLA:CPU, and one call instead of one per batch evaluated
    CIFAR's 10,000 test images 1.24x as fast at batch 64 on 2 CPU devices (docs/benchmarks.md).
    `looped=False` makes one call per batch."""
    n = data.num_test_batches
    record = {"loss": np.zeros((n, data.batch_size), np.float32),
              "correct": np.zeros((n, data.batch_size), bool)}
    # Laid out as eval_batches returns it, so that no call recompiles (and on the device, so
    # that the first call can reuse its buffers).
    record = jax.device_put(record, None if data.batch_sharding is None
                            else distributed.rows_sharding(data.batch_sharding.mesh))
    for first, count in ([(0, n)] if looped else [(b, 1) for b in range(n)]):
        record = eval_batches(state, record, data, np.int32(first), np.int32(count),
                              looped=looped)
    metrics = jax.device_get(batch_metrics(record, data))
    # Like the tutorial: the sum of per-batch means over the number of batches, in float64.
    test_loss = float(np.sum(metrics["loss"].astype(np.float64)) / n)
    return test_loss, 100.0 * float(metrics["correct"].sum()) / data.num_test


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; the run stopped before checkpointing that state."""


class StorageError(OSError):
    """A file of the run could not be written (disk full, permission denied): the message
    names it, the cause, and the checkpoints that are kept."""

    @classmethod
    def of(cls, error: OSError, kept: str) -> "StorageError":
        where = f" {error.filename}" if error.filename else ""
        storage_error = cls(f"cannot write{where}: {error.strerror or error}. {kept}")
        storage_error.errno = error.errno
        return storage_error


class EpochObserver:
    """What the epoch loop reports to: override what you need (fit's is logbook.EpochReporter).

    `read_due()` asks for an extra read of the on-device record (e.g. every few seconds for a
    progress line); every read calls `batches` with all batches done so far.
    """

    def read_due(self) -> bool:
        return False

    def batches(self, epoch: int, done: int, losses: np.ndarray, correct: np.ndarray) -> None:
        pass

    def histograms(self, global_step: int, params, grads) -> None:
        pass


def train_epoch(state: TrainState, data: DeviceData, epoch: int, config: TrainConfig,
                observer: EpochObserver = EpochObserver()):
    """Train one epoch; returns (state, per-batch losses [float32], per-batch correct counts).

    Reads the on-device record every `config.log_every` batches, whenever `observer.read_due()`,
    and at the end; each read checks for a non-finite loss (NonFiniteLossError names the step).
    Histograms come every `config.hist_every` batches; both cadences count within the epoch, at
    least once per epoch (`recipe.cadence_in_epoch`).
    """
    num_batches = data.num_train_batches
    log_every = cadence_in_epoch(config.log_every, num_batches)
    hist_every = cadence_in_epoch(config.hist_every, num_batches)
    record = new_epoch_record(state.rng, np.int32(epoch), data.num_train, num_batches)
    if data.batch_sharding is not None:  # where the step returns it, so that no call recompiles
        record = distributed.put_replicated(record, data.batch_sharding.mesh)
    read_until = 0
    for call in epoch_plan(data.num_train, data.batch_size, hist_every, config.steps_per_call):
        state, record, grads = train_batches(state, record, data, np.int32(call.first),
                                             np.int32(call.count), shape=call.shape)
        if grads is not None:
            observer.histograms(epoch * num_batches + call.first, state.params, grads)
        done = call.first + call.count
        if (done == num_batches or done // log_every > read_until // log_every
                or observer.read_due()):
            losses, correct, first_bad = jax.device_get(
                (record.loss, record.correct, record.first_nonfinite_step))
            if first_bad >= 0:
                bad_epoch, bad_batch = divmod(int(first_bad), num_batches)
                raise NonFiniteLossError(
                    f"training loss is {losses[bad_batch]} at step {first_bad} (epoch "
                    f"{bad_epoch + 1}, batch {bad_batch + 1} of {num_batches}): stopping.")
            observer.batches(epoch, done, losses[:done], correct[:done])
            read_until = done
    return state, losses, correct


# --- the run ---------------------------------------------------------------------------------

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

    def record(self, epoch: "EpochResult") -> None:
        """Append one finished epoch."""
        for name in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time",
                     "images_per_s"):
            getattr(self, name).append(getattr(epoch, name))
        self.iter_loss.extend(float(x) for x in epoch.batch_losses)


@dataclasses.dataclass(frozen=True)
class EpochResult:
    epoch: int  # 0-based
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    lr: float
    epoch_time: float
    images_per_s: float
    batch_losses: np.ndarray


@dataclasses.dataclass
class FitResult:
    state: TrainState
    history: History
    run_dir: Path
    epochs_done: int

    @property
    def final_test_acc(self) -> float:
        return self.history.test_acc[-1]


def fit(config: TrainConfig, dataset, run_dir, *, checkpoint_dir=None, resume: bool = False,
        mesh=None, data_dir=None, allow_device_change: bool = False,
        log: Callable[[str], None] = print, progress_stream=None) -> FitResult:
    """The tutorial's training run: epochs of training then evaluation, the plateau schedule on
    the test loss, TensorBoard, plots and checkpoints in `run_dir`; the parameter table, progress
    and a line per epoch through `log` and `progress_stream` (default stdout).

    A new run needs a new or empty `run_dir` (`rundir.check_unused`); its settings, the data
    set, `data_dir` (where it was read from) and the devices are recorded in run.json. `resume`
    continues from the latest checkpoint (from the start if the run was stopped before its first
    one) to exactly the result of an uninterrupted run on the same devices; settings that would
    change the result, or another device count unless `allow_device_change`, are refused before
    anything is built (`rundir.check_resume`). `mesh` (default: every device of every process,
    cbam_jax.distributed.make_mesh) splits each batch over its devices; only the primary process
    logs, writes TensorBoard files and plots. The caller owns `run_dir` (the command line locks
    it: `rundir.claim`). A file that cannot be written (disk full, permission denied) stops the
    run with a StorageError naming it, the cause and the checkpoints kept.
    """
    from cbam_jax.checkpoint import Checkpoints  # orbax, tensorboardX, matplotlib: train extras
    from cbam_jax.logbook import EpochReporter, Logbook, plot_run

    run_dir = Path(run_dir)
    checkpoints = Checkpoints(Path(checkpoint_dir) if checkpoint_dir else run_dir / "checkpoints")
    mesh = mesh if mesh is not None else distributed.make_mesh()
    primary = distributed.is_primary_process()
    if resume:  # refuse a mismatch before any model is built
        _check_resumable(config, dataset.name, run_dir, checkpoints, mesh.size,
                         allow_device_change, data_dir)
    elif primary:  # a new run's history never mixes with an old one's
        rundir.check_unused(run_dir, checkpoint_dir)
    if not primary:
        log, progress_stream = (lambda *_: None), open(os.devnull, "w")

    check_fits(dataset, mesh)  # before the copy: a data set too large is refused, saying why
    data = place_data(dataset, mesh, config.batch_size)  # also checks the batch fits the mesh
    state = _initial_state(config, dataset, mesh, log)
    plateau, history = tutorial_plateau().init(config.learning_rate), History()
    start_epoch, best_test_acc = 0, -1.0
    shown = np.asarray(dataset.test_images[:config.num_attention_images], np.uint8)
    maps = None  # the attention maps of the last finished epoch, for the figures
    restored = checkpoints.resume(state, log) if resume else None
    if restored is not None:  # the epoch actually restored sets everything that follows
        state, meta = restored.state, restored.meta
        plateau, history = PlateauState(**meta["plateau"]), History(**meta["history"])
        start_epoch, best_test_acc = meta["epoch"], meta["best_test_acc"]
        # The figures are drawn even if no epoch is left (a kill while they were drawn).
        maps = _attention_maps(state, shown)
        log(f"Resuming from {restored.step_dir} after epoch {start_epoch} (step "
            f"{int(state.step)}, lr {plateau.lr:.3g})")
    elif resume:
        log(f"No checkpoint in {checkpoints.directory} yet: starting {run_dir} from epoch 1")
    elif primary:
        rundir.write_record(run_dir, rundir.new_record(
            dataclasses.asdict(config), dataset.name, devices=mesh.size,
            processes=jax.process_count(), data_dir=data_dir, checkpoint_dir=checkpoint_dir,
            data=dataset.description()))

    book = None
    if primary:  # on resume, the logbook drops what the killed run wrote after its checkpoint
        book = Logbook(run_dir, resume_at=(start_epoch, start_epoch * data.num_train_batches)
                       if resume else None)
        if start_epoch == 0:
            book.hyperparameters({
                **dataclasses.asdict(config), "dataset": dataset.name,
                "steps_per_call": config.steps_per_call or default_steps_per_call(),
                "device": str(jax.devices()[0]), "devices": mesh.size,
                "processes": jax.process_count(), "scheduler": repr(tutorial_plateau())})
    completed = False
    try:
        for epoch in range(start_epoch, config.epochs):
            note = (f"The last good checkpoint (epoch {epoch}) is in {checkpoints.directory}."
                    if epoch else "No checkpoint was written.")
            reporter = EpochReporter(book, epoch, config, data.train_batch_sizes, plateau.lr,
                                     progress_stream, compiling=epoch == start_epoch)
            state, result = _run_epoch(state, data, epoch, config, plateau.lr, reporter, note)
            history.record(result)
            plateau = tutorial_plateau().step(plateau, result.test_loss)
            maps = _attention_maps(state, shown)
            if book is not None:  # durable before the checkpoint that commits the epoch
                book.epoch(result, shown, maps)
            is_best, best_test_acc = result.test_acc > best_test_acc, max(best_test_acc,
                                                                            result.test_acc)
            checkpoints.save(epoch + 1, state, {
                "epoch": epoch + 1, "dataset": dataset.name, "data": dataset.description(),
                "config": dataclasses.asdict(config),
                "devices": mesh.size,  # scripts/evaluate.py repeats the test loss on as many
                "plateau": plateau._asdict(), "history": dataclasses.asdict(history),
                "best_test_acc": best_test_acc}, is_best=is_best)
            log(_epoch_line(result, config.epochs, plateau.lr))
        completed = True
    except OSError as e:  # disk full, permission denied: one error that says what is kept
        raise StorageError.of(e, _kept(checkpoints)) from e  # the cause, for CBAM_JAX_DEBUG=1
    finally:  # also after a failure or Ctrl-C: the figures of the epochs that finished
        checkpoints.close()  # orbax saves collectively: process 0 writes the replicated state
        try:
            if book is not None:
                book.close()
            if maps is not None and primary:  # the last finished epoch's maps
                plot_run(run_dir, history, shown, maps, dataset.class_names,
                         [int(x) for x in dataset.test_labels[:len(shown)]])
        except OSError as e:  # after a failure, most likely the same full disk: that one tells
            if completed:
                raise StorageError.of(e, _kept(checkpoints)) from e
    return FitResult(state, history, run_dir, len(history.test_acc))


def _kept(checkpoints) -> str:
    kept = checkpoints.committed()
    return (f"Kept in {checkpoints.directory}: {', '.join(kept)}." if kept
            else "No checkpoint was written.")


def _attention_maps(state: TrainState, images) -> list[np.ndarray]:
    # Every process computes the maps: a jitted call over the mesh is a collective.
    return [np.asarray(m) for m in attention_maps(state, images)]


def _check_resumable(config: TrainConfig, dataset_name: str, run_dir: Path, checkpoints,
                     devices: int, allow_device_change: bool, data_dir) -> None:
    """Refuse a resume that could not continue the run exactly, before anything is built. What
    a resume may change is recorded (`rundir.continued_record`), for the next one."""
    record = saved = rundir.read_record(run_dir)
    if saved is None and checkpoints.latest_epoch() is not None:
        saved = checkpoints.latest_meta()  # a run from before run.json existed
    if saved is None:
        if not distributed.is_primary_process():  # run_dir may be process 0's own disk
            return
        raise rundir.RunDirError(f"no checkpoint to resume from in {checkpoints.directory}, and "
                                 f"{run_dir} holds no run record ({RUN_RECORD}): nothing to "
                                 f"resume")
    rundir.check_resume(saved, {**dataclasses.asdict(config), "dataset": dataset_name,
                                "devices": devices, "checkpoint_dir": checkpoints.directory},
                        run_dir, allow_device_change=allow_device_change)
    if record is not None and distributed.is_primary_process():
        continued = rundir.continued_record(record, epochs=config.epochs, data_dir=data_dir)
        if continued != record:
            rundir.write_record(run_dir, continued)


def _initial_state(config: TrainConfig, dataset, mesh, log) -> TrainState:
    """The model's initial state for the data set's classes, image size and normalisation, on
    every device of the mesh; prints the parameter table."""
    from cbam_jax.naming import parameter_report

    model, tx = build(config.dtype, config.model, len(dataset.class_names), dataset.image_size)
    state = create_train_state(model, tx, jax.random.PRNGKey(config.seed), config.learning_rate,
                               dataset.image_size, dataset.normalization)
    parameter_report(state.params, log)  # before any pytree map, which would sort the names
    return distributed.put_replicated(state, mesh)


def _run_epoch(state, data, epoch, config, lr, reporter, note):
    """Train one epoch, then evaluate: (state, EpochResult). Non-finite losses stop the run."""
    state = set_learning_rate(state, lr)
    start = time.perf_counter()
    try:
        state, losses, correct = train_epoch(state, data, epoch, config, reporter)
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"{e} {note}") from None
    finally:
        reporter.close()
    epoch_time = time.perf_counter() - start
    test_loss, test_acc = evaluate(state, data)
    if not math.isfinite(test_loss):
        raise NonFiniteLossError(f"test loss is {test_loss} after epoch {epoch + 1}: stopping. "
                                 f"{note}")
    return state, EpochResult(
        epoch, float(np.mean(losses, dtype=np.float64)),
        100.0 * float(correct.sum()) / data.num_train, test_loss, test_acc, lr, epoch_time,
        data.num_train / epoch_time, losses)


def _epoch_line(r: EpochResult, epochs: int, next_lr: float) -> str:
    lr = f"{r.lr:.3g}" + (f" -> {next_lr:.3g}" if next_lr != r.lr else "")
    return (f"Epoch {r.epoch + 1}/{epochs} done | train loss {r.train_loss:.4f} acc "
            f"{r.train_acc:.2f}% | test loss {r.test_loss:.4f} acc {r.test_acc:.2f}% | lr {lr} "
            f"| {r.epoch_time:.1f} s, {r.images_per_s:,.0f} img/s")
