"""The training engine on scikit-learn's digits (offline): learning, determinism, exact resume,
TensorBoard tags and steps, plots, checkpoints, non-finite losses, the epoch plan.

Runtime budget (2 CPU cores): about 2-3 minutes, mostly XLA compiles of the train step (full
batch, final partial batch, gradient-returning variant, rolled loop) shared by all runs through
`cbam_jax.train.build`'s cache. All runs use the full digits set (same shapes, so no recompiles):
8 epochs, then 2 + 1 + 1 for determinism and resume, 2 to a NaN, 1 with the rolled loop,
1 read at every batch. Slow (make test-all): the 8-epoch and the 2 + 1 + 1-epoch runs, and
2 epochs at the recipe's cadences (about 1 min).
"""
import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cbam_jax import rundir, train
from cbam_jax.checkpoint import Checkpoints
from cbam_jax.data import load_dataset
from cbam_jax.distributed import make_mesh, put_replicated
from cbam_jax.loader import pad_to_batches, place_data
from cbam_jax.logbook import event_files, read_events
from cbam_jax.naming import named_leaves
from cbam_jax.recipe import TrainConfig
from cbam_jax.rundir import ResumeMismatchError, RunDirError
from cbam_jax.schedule import PlateauState
from cbam_jax.train import (Call, CallShape, NonFiniteLossError, build, call_shape,
                            create_train_state, epoch_plan, evaluate, fit)

# Batch 32: twice the updates of batch 64 for the same compute, which digits needs under the
# tutorial's augmentation to pass 90% within a few epochs (measured: 95.0% after 8 epochs,
# 89-94% after 5-7).
CONFIG = TrainConfig(epochs=8, batch_size=32, log_every=5, hist_every=20)
EPOCHS = CONFIG.epochs
DIGITS_BATCHES = 45  # 1437 train images = 44 * 32 + 29


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", log=quiet)


@pytest.fixture(scope="module")
def full_run(digits, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    return fit(CONFIG, digits, run_dir, log=quiet, progress_stream=open("/dev/null", "w"))


def placed_state(data):
    """A fresh state placed as `fit` places it (replicated over the data's mesh): its calls are
    the compiled ones of the runs above, where a state on one device would compile them anew."""
    model, tx = build("float32")
    return put_replicated(create_train_state(model, tx, jax.random.PRNGKey(0), 1e-3),
                          data.batch_sharding.mesh)


def summaries(run_dir):
    """{tag: {step: Summary.Value}}."""
    out = {}
    for event in (e for path in event_files(run_dir) for e in read_events(path)):
        for value in event.summary.value:
            out.setdefault(value.tag, {})[event.step] = value
    return out


@pytest.mark.slow
def test_eight_epochs_on_digits_reach_90_percent_test_accuracy(full_run):
    assert full_run.epochs_done == EPOCHS
    assert full_run.final_test_acc >= 90.0
    assert full_run.history.test_loss[-1] < full_run.history.test_loss[0]


@pytest.mark.slow
def test_event_files_hold_every_tag_at_the_tutorial_steps(full_run):
    tags = summaries(full_run.run_dir)
    history = full_run.history
    # Every log_every-th batch of each epoch, at the tutorial's global_step = epoch * len + batch.
    # Batch 44 is the final partial batch (29 images): logged too, as (44 + 1) % 5 == 0.
    batch_steps = {e * DIGITS_BATCHES + b for e in range(EPOCHS) for b in range(4, 45, 5)}
    for tag in ("Train/Batch_Loss", "Train/Batch_Accuracy", "Train/Learning_Rate"):
        assert set(tags[tag]) == batch_steps, tag
    for step in batch_steps:
        assert tags["Train/Batch_Loss"][step].simple_value == np.float32(history.iter_loss[step])
        epoch = step // DIGITS_BATCHES
        assert tags["Train/Learning_Rate"][step].simple_value == np.float32(history.lr[epoch])
    # Running accuracy of the epoch: after its first 5 batches it lies in [0, 100].
    assert 0.0 <= tags["Train/Batch_Accuracy"][4].simple_value <= 100.0

    state_names = named_leaves(full_run.state.params)
    assert len(state_names) == 25
    hist_steps = {e * DIGITS_BATCHES + b for e in range(EPOCHS) for b in (19, 39)}
    for name in state_names:
        assert set(tags[f"weights/{name}"]) == hist_steps, name
        assert set(tags[f"grads/{name}"]) == hist_steps, name
        assert tags[f"grads/{name}"][19].histo.num == state_names[name].size

    epoch_tags = {"Train/Epoch_Loss": history.train_loss, "Train/Epoch_Accuracy": history.train_acc,
                  "Test/Epoch_Loss": history.test_loss, "Test/Epoch_Accuracy": history.test_acc,
                  "Train/Epoch_Time_s": history.epoch_time,
                  "Train/Images_per_s": history.images_per_s}
    for tag, values in epoch_tags.items():
        assert {s: v.simple_value for s, v in tags[tag].items()} == {
            e: np.float32(values[e]) for e in range(EPOCHS)}, tag
    for tag in ("Attention/inputs", "Attention/cbam1", "Attention/cbam2", "Attention/cbam3"):
        assert set(tags[tag]) == set(range(EPOCHS)), tag
        assert tags[tag][0].image.encoded_image_string.startswith(b"\x89PNG")
    image = tags["Attention/cbam1"][0].image  # 8 gates of 16 x 16 in one row
    assert (image.height, image.width) == (16, 8 * 16)
    assert "batch_size" in tags["Hyperparameters/text_summary"][0].tensor.string_val[0].decode()


@pytest.mark.slow
def test_every_epoch_logs_batch_scalars_and_histograms_when_it_is_shorter_than_the_cadences(
        digits, tmp_path):
    """The recipe's cadences (100 and 500 batches) on digits' 45 batches of 32: each epoch
    logs its last batch, at the tutorial's global step."""
    run = fit(dataclasses.replace(TrainConfig(), epochs=2, batch_size=32), digits,
              tmp_path / "run", log=quiet, progress_stream=open("/dev/null", "w"))
    tags = summaries(run.run_dir)
    steps = {44, DIGITS_BATCHES + 44}
    for tag in ("Train/Batch_Loss", "Train/Batch_Accuracy", "Train/Learning_Rate",
                "weights/conv1.weight", "grads/conv1.weight", "weights/fc2.bias"):
        assert set(tags[tag]) == steps, tag
    assert tags["Train/Batch_Loss"][44].simple_value == np.float32(run.history.iter_loss[44])
    assert tags["grads/fc1.weight"][44].histo.num == 512 * 2048


@pytest.mark.slow
def test_plots_are_valid_png_images(full_run):
    sizes = {"iteration_loss.png": (1000, 400), "epoch_metrics.png": (1200, 400),
             "attention_maps.png": (800, 1600)}
    for name, size in sizes.items():
        with Image.open(full_run.run_dir / name) as image:
            assert image.format == "PNG" and image.size == size, name
            image.verify()


@pytest.mark.slow
def test_checkpoints_hold_latest_and_best_epoch(full_run):
    history = full_run.history
    checkpoints = Checkpoints(full_run.run_dir / "checkpoints")
    model, tx = build("float32")
    target = create_train_state(model, tx, jax.random.PRNGKey(1), 1e-3)
    state, meta = checkpoints.restore_latest(target)
    assert checkpoints.latest_epoch() == meta["epoch"] == EPOCHS
    assert int(state.step) == EPOCHS * DIGITS_BATCHES
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(full_run.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, best = checkpoints.restore_best(target)
    assert best["epoch"] == 1 + int(np.argmax(history.test_acc))
    assert best["best_test_acc"] == max(history.test_acc)
    checkpoints.close()


SHORT = dataclasses.replace(CONFIG, epochs=2)


@pytest.fixture(scope="module")
def short_runs(digits, tmp_path_factory):
    """Two epochs uninterrupted, and a run stopped after its first epoch (its checkpoint
    written; `epochs` is no resume key) then resumed to two. Same data shapes as `full_run`, so
    the compiled steps are reused."""
    devnull = open("/dev/null", "w")
    root = tmp_path_factory.mktemp("short")
    whole = fit(SHORT, digits, root / "whole", log=quiet, progress_stream=devnull)
    first = fit(dataclasses.replace(SHORT, epochs=1), digits, root / "killed", log=quiet,
                progress_stream=devnull)
    resumed = fit(SHORT, digits, root / "killed", resume=True, log=quiet, progress_stream=devnull)
    return whole, first, resumed


@pytest.mark.slow
def test_run_json_records_the_settings_and_a_resume_its_larger_epoch_count(short_runs, digits):
    whole, first, resumed = short_runs
    record = rundir.read_record(whole.run_dir)
    assert record == {"config": dataclasses.asdict(SHORT), "dataset": "digits",
                      "data": digits.description(), "data_dir": None, "checkpoint_dir": None,
                      "devices": jax.device_count(), "processes": 1}
    assert rundir.read_record(resumed.run_dir) == record  # recorded 1 epoch, resumed to 2


@pytest.mark.slow  # it reads short_runs' directory: 4 epochs of training
def test_a_new_run_in_a_used_directory_is_refused_before_anything_is_built(digits,
                                                                           short_runs):
    run_dir = short_runs[0].run_dir
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(RunDirError, match="already holds a run: continue it with --resume"):
        fit(SHORT, digits, run_dir, log=pytest.fail)  # the parameter table is never logged
    assert sorted(p.name for p in run_dir.iterdir()) == before


@pytest.mark.slow
def test_same_seed_gives_identical_metrics(full_run, short_runs):
    whole, first, _ = short_runs
    assert first.epochs_done == 1
    n = 2 * DIGITS_BATCHES
    assert whole.history.iter_loss == full_run.history.iter_loss[:n]
    for field in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
        assert getattr(whole.history, field) == getattr(full_run.history, field)[:2], field


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted_run_bitwise(short_runs):
    whole, _, resumed = short_runs
    assert resumed.epochs_done == whole.epochs_done == 2
    assert int(resumed.state.step) == int(whole.state.step) == 2 * DIGITS_BATCHES
    leaves, ref = jax.tree.leaves(resumed.state), jax.tree.leaves(whole.state)
    assert len(leaves) == len(ref)
    for a, b in zip(leaves, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for field in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "iter_loss"):
        assert getattr(resumed.history, field) == getattr(whole.history, field), field


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(digits, short_runs):
    with pytest.raises(ResumeMismatchError, match=r"--seed 7 \(recorded: 0\)"):
        fit(dataclasses.replace(SHORT, seed=7), digits, short_runs[2].run_dir, resume=True,
            log=quiet)


def test_resume_without_checkpoint_names_the_directory(digits, tmp_path):
    with pytest.raises(RunDirError, match="no checkpoint to resume from in"):
        fit(CONFIG, digits, tmp_path / "empty", resume=True, log=quiet)


class _ExplodingPlateau:
    """A schedule that sets a learning rate of 1e30 after the first epoch: epoch 2 diverges."""

    def init(self, lr):
        return PlateauState(lr, float("inf"))

    def step(self, state, metric):
        return PlateauState(1e30, metric)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        digits, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "tutorial_plateau", _ExplodingPlateau)
    with pytest.raises(NonFiniteLossError) as error:
        fit(CONFIG, digits, tmp_path / "run", log=quiet, progress_stream=open("/dev/null", "w"))
    message = str(error.value)
    found = re.search(r"training loss is (nan|inf|-inf) at step (\d+) \(epoch 2, batch (\d+) "
                      r"of 45\)", message)
    assert found, message
    assert int(found.group(2)) == DIGITS_BATCHES + int(found.group(3)) - 1
    assert "last good checkpoint (epoch 1)" in message
    checkpoints = Checkpoints(tmp_path / "run" / "checkpoints")
    assert checkpoints.latest_epoch() == 1
    model, tx = build("float32")
    state, meta = checkpoints.restore_latest(
        create_train_state(model, tx, jax.random.PRNGKey(0), 1e-3))
    assert int(state.step) == DIGITS_BATCHES and meta["plateau"]["lr"] == 1e30
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    checkpoints.close()


@pytest.mark.slow
def test_rolled_loop_over_steps_matches_one_call_per_step(digits):
    """steps_per_call > 1 (the GPU/TPU default) trains the same model: same batches, same keys.

    Not bitwise: XLA fuses the step differently inside the loop, and the float32 rounding
    differences grow with each update (measured in a full epoch: the first 3 losses equal,
    1e-4 relative by step 7), so 8 steps agree to 1e-3 relative. Only 8 steps: on XLA:CPU the
    rolled loop runs about 10x slower per step than one call per step.
    """
    data = place_data(digits, make_mesh(), batch_size=32)

    def first_losses(looped):
        state = placed_state(data)
        record = train.new_epoch_record(state.rng, np.int32(0), data.num_train, DIGITS_BATCHES)
        shape = CallShape(size=32, looped=looped, with_grads=False)
        for first, count in ([(0, 8)] if looped else [(b, 1) for b in range(8)]):
            state, record, _ = train.train_batches(state, record, data, np.int32(first),
                                                   np.int32(count), shape=shape)
        return np.asarray(record.loss[:8]), int(state.step)

    (looped, steps), (per_call, _) = first_losses(True), first_losses(False)
    assert steps == 8
    np.testing.assert_allclose(looped, per_call, rtol=1e-3)
    assert np.all(per_call > 0)


def test_a_call_of_one_step_runs_no_loop(digits):
    """The CPU engine's call (one step) is the step alone, with no loop around it (a rolled loop
    is slow on XLA:CPU); a call of several steps is one rolled loop more (the control). (The
    step has loops of its own: the PRNG's rounds.)"""
    model, tx = build("float32")
    data = place_data(digits, make_mesh(), batch_size=32)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), 1e-3)
    record = train.new_epoch_record(state.rng, np.int32(0), data.num_train, DIGITS_BATCHES)

    def lowered(count):
        return train.train_batches.lower(state, record, data, np.int32(0), np.int32(count),
                                         shape=call_shape(32, count)).as_text()

    assert call_shape(32, 1) == CallShape(32, False, False)
    step_loops = lowered(1).count("stablehlo.while")
    # One rolled loop around one traced step (2 steps written out would double the step's own).
    assert step_loops > 1 and lowered(2).count("stablehlo.while") == step_loops + 1


class _AlwaysDue(train.EpochObserver):
    """Asks for a read at every call; records how many batches each read saw."""

    def __init__(self):
        self.reads = []

    def read_due(self) -> bool:
        return True

    def batches(self, epoch, done, losses, correct):
        self.reads.append(done)


@pytest.mark.slow
def test_the_epoch_loop_reads_whenever_its_observer_asks(digits):
    """Between log_every reads too: how the progress line keeps a log from staying silent
    (logbook.EpochReporter asks every 30 s off a terminal)."""
    observer = _AlwaysDue()
    config = dataclasses.replace(CONFIG, log_every=1000)
    data = place_data(digits, make_mesh(), batch_size=32)
    train.train_epoch(placed_state(data), data, 0, config, observer)
    # After every call: on CPU each call trains one batch.
    plan = epoch_plan(len(digits.train_labels), 32, config.hist_every)
    assert observer.reads == [call.first + call.count for call in plan]
    assert observer.reads == list(range(1, DIGITS_BATCHES + 1))


@pytest.mark.slow
def test_evaluation_covers_every_test_image_exactly_once(digits, full_run):
    """360 test images = 11 batches of 32 + one of 8 padded to 32: the padding is masked out."""
    model, _ = build("float32")
    state = full_run.state
    images, labels = digits.test_images, digits.test_labels
    _, _, mask = pad_to_batches(images, labels, 32)
    assert len(mask) == 384 and int(mask.sum()) == 360
    loss, acc = evaluate(state, place_data(digits, make_mesh(), batch_size=32))

    from cbam_jax.augment import normalize
    logits = jax.jit(model.apply)({"params": state.params, "batch_stats": state.batch_stats},
                                  normalize(jnp.asarray(images)))
    per_image = np.asarray(train.optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.asarray(labels)), np.float64)
    # The tutorial's test loss: the mean of per-batch means (11 batches of 32, then one of 8).
    expected_loss = np.mean([per_image[i:i + 32].mean() for i in range(0, 360, 32)])
    expected_acc = 100.0 * np.mean(np.asarray(logits).argmax(-1) == labels)
    # float32 sums in another order: 1e-5 relative.
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert acc == pytest.approx(expected_acc, abs=1e-9)


@pytest.mark.slow
def test_training_compiles_the_train_step_once_per_call_shape(digits, tmp_path):
    """Two epochs through `fit`: each distinct CallShape of the epoch plan compiles once (a
    state placed on one device, or anything else that changes between calls, would make the
    second epoch compile again). JAX's in-memory caches are emptied first, so that the count
    starts at 0; the pytest run's persistent cache still serves the programs (a hit counts as a
    compile here), so the steps of the 8-epoch run are loaded, not compiled again."""
    # hist_every=20 takes gradients at batches 19 and 39 of 45. On CPU (one step per call): the
    # full batches' call, their call with gradients, the last batch's call (29 images).
    config = dataclasses.replace(CONFIG, epochs=2, log_every=1000)
    compiled = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name"))

    jax.clear_caches()
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        fit(config, digits, tmp_path / "run", log=quiet, progress_stream=open("/dev/null", "w"))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    shapes = {call.shape for call in epoch_plan(len(digits.train_labels), 32, config.hist_every)}
    assert shapes == {CallShape(32, False, True), CallShape(32, False, False),
                      CallShape(29, False, False)}
    assert compiled.count("jit(train_batches)") == len(shapes), compiled
    assert compiled.count("jit(eval_batches)") == 1, compiled


def test_tutorial_epoch_plan_keeps_the_final_batch_of_16():
    plan = epoch_plan(50_000, 64, hist_every=500, steps_per_call=1)
    assert len(plan) == 782  # 781 full batches + the DataLoader's final batch of 16
    assert sum(call.count * call.shape.size for call in plan) == 50_000
    assert plan[-1] == Call(781, 1, CallShape(size=16, looped=False, with_grads=False))
    assert [call.first for call in plan if call.shape.with_grads] == [499]
    # One compiled shape per kind of call: full batch, histogram batch, final batch.
    assert {call.shape for call in plan} == {CallShape(64, False, False),
                                             CallShape(64, False, True), CallShape(16, False, False)}


def test_cpu_epoch_plan_is_one_call_per_batch():
    """The CPU plan of the tutorial's epoch (the default steps per call): each batch its own
    call, none looped; the histogram batch with gradients; the 16 last."""
    plan = epoch_plan(50_000, 64, hist_every=500)
    assert [call.first for call in plan] == list(range(782))
    assert all(call.count == 1 and not call.shape.looped for call in plan)
    assert Call(499, 1, CallShape(64, False, True)) in plan
    assert plan[-1] == Call(781, 1, CallShape(size=16, looped=False, with_grads=False))


def test_epoch_plan_with_steps_per_call_runs_histogram_batches_alone():
    plan = epoch_plan(50_000, 64, hist_every=500, steps_per_call=50)
    batches = [b for call in plan for b in range(call.first, call.first + call.count)]
    assert batches == list(range(782))
    assert Call(499, 1, CallShape(64, False, True)) in plan
    assert max(call.count for call in plan) == 50
    assert len(plan) == 10 + 1 + 6 + 1  # 0-498 (9x50 + 49), 499 alone, 500-780, then the 16


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters_and_statistics(digits):
    model, tx = build("bfloat16")
    state = create_train_state(model, tx, jax.random.PRNGKey(0), 1e-3)
    step = jax.jit(train.train_step)
    state, metrics = step(state, jnp.asarray(digits.train_images[:16]),
                          jnp.asarray(digits.train_labels[:16]))
    assert np.isfinite(float(metrics["loss"]))
    dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.batch_stats["bn1"]["mean"],
                                                state.opt_state.inner_state))
              if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), "epochs"), (dict(batch_size=0), "batch_size"),
    (dict(learning_rate=float("nan")), "learning_rate"), (dict(dtype="float16"), "dtype"),
    (dict(steps_per_call=0), "steps_per_call"), (dict(model="vgg16"), "model")])
def test_invalid_config_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)
