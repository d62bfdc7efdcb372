"""Speed of the JAX engine against the tutorial's PyTorch pipeline, side by side in one process.

Each section runs its contenders in interleaved repetitions (A B A B ...) and reports the median
throughput (the nnx section: time per step) of each and the median of the per-pair ratios, so
that load on the machine moves both sides of a ratio alike. Synthetic uint8 CIFAR-shaped data:
content does not change speed. The JAX rows run as `scripts/train.py` does: on a CPU host one
JAX device per core, each batch split over them (`cbam_jax.runtime`, `distributed.make_mesh`,
data through `place_data`). Per contender the JSON also has the warm-up's seconds and "cores
busy" (this process's CPU seconds over wall seconds while it ran; DataLoader worker processes
not counted).

    python scripts/benchmark.py                      # all sections, CPU-sized (a few minutes)
    python scripts/benchmark.py --quick              # smaller, for a smoke run
    python scripts/benchmark.py --sections step,eval --reps 9
    python scripts/benchmark.py --sections epoch --full-epoch   # 50,000 + 10,000 images
    python scripts/benchmark.py --full-recipe        # the 50-epoch JAX recipe (a GPU job)
    python scripts/benchmark.py --sections nnx --reps 15    # flax.nnx's per-step overhead
    python scripts/benchmark.py --sections step,eval --processes 3   # 3 fresh processes

Writes a markdown table to stdout and `<out>/benchmark.md` and `<out>/benchmark.json`; each table
gives every contender's ratio to its baseline and, where it ran, to `torch.compile`. With
`--processes N`, each process's report goes to `<out>/process_<i>/`, and `<out>/processes.md`
(and `.json`) gives each contender's ratio medians per process and their median.
`scripts/gpu_check.py` runs these contenders on a GPU, with more variants of the train call.
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cbam_jax import distributed, runtime, train
from cbam_jax import nnx as cbam_nnx
from cbam_jax.augment import augment, normalize
from cbam_jax.data import IMAGE_SHAPE, Dataset
from cbam_jax.layers import CBAM
from cbam_jax.loader import place_data
from cbam_jax.ops import fused as ops

SECTIONS = ("step", "eval", "augment", "epoch", "nnx")
# What --without / --ablate can leave out: runtime.configure_cpu's settings, one device per core
# (then one device).
ABLATIONS = (*runtime.CPU_TUNINGS, "devices_per_core")
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
# CPU default for the epoch section: a slice of the epoch, scaled to images/s (see --full-epoch).
CPU_EPOCH_TRAIN, CPU_EPOCH_TEST = 2_048, 512


# --- data and environment --------------------------------------------------------------------

def synthetic_images(n: int, seed: int = 0):
    """uint8 [n, 32, 32, 3] images and int32 [n] labels."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int32))


def synthetic_dataset(n_train: int, n_test: int, seed: int = 0) -> Dataset:
    train_images, train_labels = synthetic_images(n_train, seed)
    test_images, test_labels = synthetic_images(n_test, seed + 1)
    return Dataset("synthetic", "scripts/benchmark.py", train_images, train_labels, test_images,
                   test_labels, tuple(str(i) for i in range(10)))


def torch_device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def environment() -> dict:
    """Device, versions and thread settings that the figures depend on."""
    import flax
    import jaxlib
    import PIL
    import torch
    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    tdev = torch_device()
    return {
        "jax_backend": jax.default_backend(), "jax_device": dev.device_kind,
        "jax_device_count": jax.device_count(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "usable_cores": runtime.usable_cores(),
        "torch_device": str(tdev) if tdev.type == "cpu" else torch.cuda.get_device_name(tdev),
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": jaxlib.__version__,
                     "flax": flax.__version__, "optax": optax.__version__,
                     "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version() if tdev.type == "cuda" else None,
                     "numpy": np.__version__, "pillow": PIL.__version__},
        "threads": {"torch_intra_op": torch.get_num_threads(),
                    "torch_inter_op": torch.get_num_interop_threads(),
                    "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", ""),
                    "load_average_at_start": os.getloadavg()},
        # Float32 matmuls and convolutions may run in TF32 on a GPU: each framework's setting.
        "precision": {"jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
                      "torch_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                      "torch_cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                      "torch_cudnn_benchmark": torch.backends.cudnn.benchmark},
    }


# --- interleaved timing ----------------------------------------------------------------------

@dataclasses.dataclass
class Timings:
    """What `interleave` measured, per contender name."""

    samples: dict = dataclasses.field(default_factory=dict)         # images/s, one per rep
    warmup_seconds: dict = dataclasses.field(default_factory=dict)  # compile, worker start-up
    cpu_seconds: dict = dataclasses.field(default_factory=dict)     # this process, timed reps
    wall_seconds: dict = dataclasses.field(default_factory=dict)    # the same reps, wall clock
    # This process's minor page faults in the timed reps: a process whose allocator maps its
    # buffers anew each call shows it here (runtime.keep_freed_memory; docs/benchmarks.md).
    minor_faults: dict = dataclasses.field(default_factory=dict)
    load_average: tuple = ()  # the 1-minute load average before and after
    errors: dict = dataclasses.field(default_factory=dict)  # contenders whose warm-up failed


def interleave(contenders: dict, reps: int, warmup: int = 1,
               keep_going: bool = False) -> Timings:
    """Run `{name: fn}` in the order A B C A B C ... `reps` times; fn() -> images/s.

    Each contender runs `warmup` untimed rounds first (compilation, caches, worker start-up).
    `keep_going`: a contender whose warm-up raises is left out, its error kept in `errors`.
    """
    timings, load_start = Timings(), os.getloadavg()[0]
    for name, fn in contenders.items():
        start = time.perf_counter()
        try:
            for _ in range(warmup):
                fn()
        except Exception as e:  # kept in `errors`: one failing variant must not stop the rest
            if not keep_going:
                raise
            timings.errors[name] = f"{type(e).__name__}: {e}"
            continue
        timings.warmup_seconds[name] = time.perf_counter() - start
        timings.samples[name], timings.cpu_seconds[name], timings.wall_seconds[name] = [], 0., 0.
        timings.minor_faults[name] = 0
    contenders = {name: fn for name, fn in contenders.items() if name in timings.samples}
    for _ in range(reps):
        for name, fn in contenders.items():
            wall, cpu = time.perf_counter(), time.process_time()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            timings.samples[name].append(float(fn()))
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            timings.minor_faults[name] += faults
            timings.cpu_seconds[name] += time.process_time() - cpu
            timings.wall_seconds[name] += time.perf_counter() - wall
    timings.load_average = (load_start, os.getloadavg()[0])
    return timings


def _pair_ratios(values, reference) -> dict:
    """Median, min and max of value / reference, repetition by repetition."""
    ratios = [v / r for v, r in zip(values, reference)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def summarize(timings: Timings, baseline: str, unit: str = "img/s") -> dict:
    """Medians and per-pair ratios (contender / baseline, repetition by repetition), and the
    same ratios to the strongest PyTorch contender where one ran (`torch.compile...`)."""
    if baseline not in timings.samples:
        raise ValueError(f"the baseline {baseline!r} did not run: "
                         f"{timings.errors.get(baseline, 'not among the contenders')}")
    compiled = next((name for name in timings.samples if name.startswith("torch.compile")), None)
    rows = []
    for name, values in timings.samples.items():
        ratio = _pair_ratios(values, timings.samples[baseline])
        wall = timings.wall_seconds[name]
        rows.append({"name": name, "unit": unit, "median": statistics.median(values),
                     "samples": values, "ratio_vs": baseline,
                     "ratio_median": ratio["median"],
                     "ratio_min": ratio["min"], "ratio_max": ratio["max"],
                     "warmup_seconds": timings.warmup_seconds[name],
                     "cores_busy": timings.cpu_seconds[name] / wall if wall > 0 else None,
                     "minor_faults_per_rep": timings.minor_faults[name] / len(values)})
        if compiled is not None:
            rows[-1]["ratio_vs_compiled"] = _pair_ratios(values, timings.samples[compiled])
    result = {"baseline": baseline, "reps": len(timings.samples[baseline]), "rows": rows,
              "compiled": compiled, "load_average_start": timings.load_average[0],
              "load_average_end": timings.load_average[1]}
    if timings.errors:
        result["errors"] = timings.errors
    return result


def _throughput(step, images_per_call: int, calls: int, sync):
    def run():
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            out = step()
        sync(out)
        return images_per_call * calls / (time.perf_counter() - start)
    return run


# --- contenders: JAX ------------------------------------------------------------------------

def _jax_state(dtype: str = "float32", seed: int = 0):
    model, tx = train.build(dtype)
    return train.create_train_state(model, tx, jax.random.PRNGKey(seed), 1e-3)


def jax_train_step(batch: int, calls: int, mesh):
    """The engine's model step (forward, backward, Adam) on a normalised float batch, split over
    the mesh."""
    state = distributed.put_replicated(_jax_state(), mesh)
    images, labels = synthetic_images(batch)
    x, y = jax.device_put((normalize(jnp.asarray(images)), labels),
                          distributed.batch_sharding(mesh))

    def step(state, x, y):
        dropout_key = jax.random.fold_in(state.rng, state.step)
        return train.adam_step(state, x, y, dropout_key)[:2]

    step = jax.jit(step, donate_argnums=0)
    holder = [state]

    def call():
        holder[0], loss = step(holder[0], x, y)
        return loss
    return _throughput(call, batch, calls, jax.block_until_ready)


@functools.partial(jax.jit, donate_argnames=("state", "record"), static_argnames=("size", "count"))
def scan_batches(state, record, data, first_batch, *, size: int, count: int):
    """`train.train_batches` as a `lax.scan` over a fixed number of batches (`count`, compiled
    in) instead of a `fori_loop` over a traced one: a variant that the GPU check times."""
    def one(carry, batch):
        state, record = carry
        images, labels = data.train_batch(record.perm, batch, size)
        new_state, metrics = train.train_step(state, images, labels)
        return (new_state, record.record(batch, state.step, metrics)), None

    (state, record), _ = jax.lax.scan(one, (state, record), first_batch + jnp.arange(count))
    return state, record, None


@functools.lru_cache(maxsize=None)
def train_call(loop: str, compiler_options: tuple = ()):
    """The engine's train call, `train.train_batches` ("fori"; its `CallShape` says whether it
    loops) or `scan_batches` ("scan"), jitted with XLA `compiler_options` ((name,
    value) pairs) for its compiles only. One jitted function per combination, so contenders that
    differ only in the batch count share a compile; without options it is the engine's own
    function."""
    jitted = {"fori": train.train_batches, "scan": scan_batches}[loop]
    if not compiler_options:
        return jitted
    static = ("size", "count") if loop == "scan" else ("shape",)
    return jax.jit(jitted.__wrapped__, static_argnames=static,
                   donate_argnames=("state", "record"), compiler_options=dict(compiler_options))


# cbam_jax.ops's kernels with hand-written gradients (jax.custom_vjp), by name.
CUSTOM_GRADIENT_OPS = tuple(name for name, value in vars(ops).items()
                            if isinstance(value, jax.custom_vjp))


def without_custom_gradients(apply_fn):
    """`apply_fn` with each op of CUSTOM_GRADIENT_OPS traced as the plain function under its
    custom VJP (same values), so autodiff derives the gradients: the ablation of those kernels.
    A new function object, so that no jit cache hands back a trace with the custom gradients."""
    def apply(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for name in CUSTOM_GRADIENT_OPS:
                stack.enter_context(mock.patch.object(ops, name, getattr(ops, name).fun))
            return apply_fn(*args, **kwargs)
    return apply


def jax_engine_calls(batch: int, steps: int, steps_per_call: int | None = None, *, mesh,
                     loop: str = "fori", dtype: str = "float32",
                     compiler_options: tuple = (), custom_gradients: bool = True):
    """Images/s of `steps` steps of the engine's train call (gather the batch from the data set on
    the device, augment, Adam step, record), `steps_per_call` per call (default: the engine's,
    `train.default_steps_per_call`), more than one in a rolled loop: "fori" (the engine's) or
    "scan". Compiles on its first run."""
    data = place_data(synthetic_dataset(batch * steps, batch), mesh, batch)
    steps_per_call = steps_per_call or train.default_steps_per_call()
    if steps % steps_per_call:
        raise ValueError(f"steps ({steps}) must be a multiple of steps_per_call "
                         f"({steps_per_call})")
    state = _jax_state(dtype)
    if not custom_gradients:
        state = state.replace(apply_fn=without_custom_gradients(state.apply_fn))
    state = distributed.put_replicated(state, mesh)
    record = distributed.put_replicated(train.new_epoch_record(
        state.rng, np.int32(0), data.num_train, data.num_train_batches), mesh)
    call = train_call(loop, compiler_options)
    if loop == "scan":
        static = dict(size=batch, count=steps_per_call)
    else:
        static = dict(shape=train.call_shape(batch, steps_per_call))
    count = () if loop == "scan" else (np.int32(steps_per_call),)
    holder = [state, record]

    def run():
        start = time.perf_counter()
        for first in range(0, steps, steps_per_call):
            holder[0], holder[1], _ = call(holder[0], holder[1], data, np.int32(first), *count,
                                           **static)
        jax.block_until_ready(holder)
        return batch * steps / (time.perf_counter() - start)
    return run


def jax_eval(batch: int, calls: int, mesh):
    """The engine's evaluation (`train.evaluate`) of `calls` batches placed on the mesh."""
    data = place_data(synthetic_dataset(batch, batch * calls), mesh, batch)
    state = distributed.put_replicated(_jax_state(), mesh)

    def run():
        start = time.perf_counter()
        train.evaluate(state, data)  # reads the metrics back: synchronised
        return batch * calls / (time.perf_counter() - start)
    return run


def jax_augment(n_images: int, batch: int, mesh):
    """Images/s of `augment` (uint8 batch on the device -> normalised floats), one call per batch."""
    images, _ = synthetic_images(batch)
    images = jax.device_put(images, distributed.batch_sharding(mesh))
    base = jax.random.PRNGKey(0)
    fn = jax.jit(lambda i, images: augment(jax.random.fold_in(base, i), images))
    calls = max(1, n_images // batch)
    counter = [0]  # a fresh key for every call, as the engine folds in the step

    def run():
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            counter[0] += 1
            out = fn(np.int32(counter[0]), images)
        jax.block_until_ready(out)
        return batch * calls / (time.perf_counter() - start)
    return run


def jax_epoch(n_train: int, n_test: int, mesh, batch: int = 64):
    """One epoch of the engine (train_epoch, then evaluate), images/s over train + test images."""
    data = place_data(synthetic_dataset(n_train, n_test), mesh, batch)
    config = train.TrainConfig(epochs=1, batch_size=batch)
    holder, epoch = [distributed.put_replicated(_jax_state(), mesh)], iter(range(1 << 30))

    def run():
        start = time.perf_counter()
        holder[0], _, _ = train.train_epoch(holder[0], data, next(epoch), config)
        train.evaluate(holder[0], data)
        return (n_train + n_test) / (time.perf_counter() - start)
    return run


# --- contenders: PyTorch ---------------------------------------------------------------------

def _torch_model_and_batch(batch: int, compile_backend: str | None):
    """The tutorial's model on the torch device, `torch.compile`d with `compile_backend` (None:
    eager), and one batch as the tutorial's transforms leave it."""
    import torch
    from parity.reference import CBAM_CNN
    from parity.pillow_transforms import to_tensor_normalize
    dev = torch_device()
    torch.manual_seed(0)
    model = CBAM_CNN().to(dev)
    images, labels = synthetic_images(batch)
    # ToTensor's tensors are contiguous; to_tensor_normalize keeps numpy's HWC strides.
    x = torch.from_numpy(np.ascontiguousarray(np.stack([to_tensor_normalize(im) for im in images])))
    x = x.to(dev)
    y = torch.from_numpy(labels.astype(np.int64)).to(dev)
    forward = model if compile_backend is None else torch.compile(model, backend=compile_backend)
    return model, forward, x, y


def _torch_sync(_):
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_train_step(batch: int, calls: int, compile_backend: str | None = None):
    """The tutorial's step: zero_grad, forward, CrossEntropyLoss, backward, Adam."""
    import torch
    model, forward, x, y = _torch_model_and_batch(batch, compile_backend)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def call():
        opt.zero_grad()
        loss = loss_fn(forward(x), y)
        loss.backward()
        opt.step()
        return loss
    return _throughput(call, batch, calls, _torch_sync)


def torch_graph_step(batch: int, calls: int, warmup_steps: int = 3):
    """The tutorial's step captured whole as one CUDA graph and replayed (PyTorch's recipe:
    warm-up on a side stream, `capturable` Adam, static input tensors). CUDA only."""
    import torch
    if not torch.cuda.is_available():
        raise ValueError("a CUDA graph needs a CUDA device; torch sees none")
    model, _, x, y = _torch_model_and_batch(batch, None)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the allocator and cuDNN settle before capture
        for _ in range(warmup_steps):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    def call():
        graph.replay()
        return loss
    return _throughput(call, batch, calls, _torch_sync)


def torch_eval(batch: int, calls: int, compile_backend: str | None = None):
    import torch
    model, forward, x, _ = _torch_model_and_batch(batch, compile_backend)
    model.eval()

    def call():
        with torch.no_grad():
            return forward(x)
    return _throughput(call, batch, calls, _torch_sync)


class PillowTrainSet:
    """A map-style dataset running the tutorial's per-image Pillow train transform."""

    def __init__(self, images, labels, seed: int = 0):
        self.images, self.labels, self.seed = images, labels, seed
        self._rng, self._pid = None, None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        import torch
        from parity.pillow_transforms import train_transform
        if self._pid != os.getpid():  # one generator per DataLoader worker process
            self._rng, self._pid = np.random.default_rng((self.seed, os.getpid())), os.getpid()
        image = np.ascontiguousarray(train_transform(self.images[i], self._rng))  # as ToTensor's
        return torch.from_numpy(image), int(self.labels[i])


class PillowTestSet(PillowTrainSet):
    def __getitem__(self, i):
        import torch
        from parity.pillow_transforms import test_transform
        return torch.from_numpy(np.ascontiguousarray(test_transform(self.images[i]))), int(self.labels[i])


def _loader(dataset, batch: int, workers: int, shuffle: bool, persistent: bool = False):
    import torch
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=shuffle,
                                       num_workers=workers,
                                       persistent_workers=persistent and workers > 0)


def pillow_pipeline(n_images: int, batch: int, workers: int):
    """Images/s of one pass of a DataLoader over the Pillow chain (workers stay up between passes)."""
    images, labels = synthetic_images(n_images)
    loader = _loader(PillowTrainSet(images, labels), batch, workers, shuffle=True,
                     persistent=True)

    def run():
        start = time.perf_counter()
        seen = sum(len(y) for _, y in loader)
        return seen / (time.perf_counter() - start)
    return run


def torch_epoch(n_train: int, n_test: int, batch: int = 64, workers: int = 0,
                compile_backend: str | None = None):
    """The tutorial's epoch: Pillow DataLoader + train loop, then the test loop; the model eager
    as in the tutorial, or `torch.compile`d with `compile_backend`."""
    import torch
    data = synthetic_dataset(n_train, n_test)
    dev = torch_device()
    model, forward, _, _ = _torch_model_and_batch(1, compile_backend)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    train_loader = _loader(PillowTrainSet(data.train_images, data.train_labels), batch, workers,
                           shuffle=True)
    test_loader = _loader(PillowTestSet(data.test_images, data.test_labels), batch, workers,
                          shuffle=False)

    def run():
        start = time.perf_counter()
        model.train()
        correct = 0
        for x, y in train_loader:
            x, y = x.to(dev), y.to(dev)
            opt.zero_grad()
            out = forward(x)
            loss = loss_fn(out, y)
            loss.backward()
            opt.step()
            correct += (out.argmax(1) == y).sum().item()  # the tutorial's running accuracy
        model.eval()
        with torch.no_grad():
            for x, y in test_loader:
                x, y = x.to(dev), y.to(dev)
                out = forward(x)
                loss_fn(out, y).item()
                correct += (out.argmax(1) == y).sum().item()
        return (n_train + n_test) / (time.perf_counter() - start)
    return run


# --- flax.nnx: what a step costs in Python -----------------------------------------------------

# A model small enough that dispatch, not arithmetic, sets the pace: conv 3 -> 16, the official
# CBAM (its BatchNorm makes each step update state as well as parameters), a linear head; the
# same layers in Linen and in NNX.
NNX_IMAGE = (16, 16, 3)


class _LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = CBAM.preset("official")(nn.relu(nn.Conv(16, (3, 3))(x)), train)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


class _NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 16, (3, 3), rngs=rngs)
        self.cbam = cbam_nnx.CBAM.preset("official", 16, rngs=rngs)
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(self.cbam(nnx.relu(self.conv(x))).mean(axis=(1, 2)))


def _nnx_batch(batch: int):
    return (jax.random.normal(jax.random.key(0), (batch, *NNX_IMAGE)),
            jnp.asarray(synthetic_images(batch)[1]))


def _microseconds_per_step(call, calls: int):
    steps_per_second = _throughput(call, 1, calls, jax.block_until_ready)
    return lambda: 1e6 / steps_per_second()


def linen_jit_step(batch: int, calls: int):
    """The Linen way: parameters, statistics and Adam's state in, new ones out, jax.jit."""
    x, y = _nnx_batch(batch)
    model, tx = _LinenNet(), optax.adam(1e-3)
    variables = model.init(jax.random.key(0), x, train=False)
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, x, y):
        params, batch_stats, opt_state = state

        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                          train=True, mutable=["batch_stats"])
            return train.cross_entropy(logits, y), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    holder = [state]

    def call():
        holder[0], loss = step(holder[0], x, y)
        return loss
    return _microseconds_per_step(call, calls)


def nnx_train_step(model, optimizer, x, y):
    """Flax's NNX step: the model and the optimizer are updated in place."""
    def loss_fn(model):
        return train.cross_entropy(model(x), y)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


nnx_jit_step = nnx.jit(nnx_train_step)  # one compiled program for 'nnx.jit' and 'cached'


def nnx_step(batch: int, calls: int, mode: str):
    """`nnx_train_step` under nnx.jit ('nnx.jit'), through nnx.cached_partial ('cached'), or
    staged out by hand with nnx.split, jax.jit and nnx.merge ('split')."""
    x, y = _nnx_batch(batch)
    model = _NNXNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    if mode == "nnx.jit":
        return _microseconds_per_step(lambda: nnx_jit_step(model, optimizer, x, y), calls)
    if mode == "cached":
        step = nnx.cached_partial(nnx_jit_step, model, optimizer)
        return _microseconds_per_step(lambda: step(x, y), calls)

    graphdef, state = nnx.split((model, optimizer))

    @functools.partial(jax.jit, donate_argnums=1)
    def split_step(graphdef, state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss = nnx_train_step(model, optimizer, x, y)
        return loss, nnx.state((model, optimizer))

    holder = [state]

    def call():
        loss, holder[0] = split_step(graphdef, holder[0], x, y)
        return loss
    return _microseconds_per_step(call, calls)


# --- sections --------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """Sizes of one benchmark run (see `make_plan`)."""
    reps: int = 5
    step_batches: tuple = (64, 256)
    step_calls: int = 10
    eval_batch: int = 256
    eval_calls: int = 10
    torch_compile: bool = True
    torch_compile_backend: str = "inductor"
    augment_images: int = 1024
    augment_workers: tuple = (0, 2)
    epoch_train: int = CPU_EPOCH_TRAIN
    epoch_test: int = CPU_EPOCH_TEST
    epoch_reps: int = 3  # a median of 3 epochs per contender, not a single sample
    epoch_compiled_workers: int = 2  # the torch.compile tutorial loop's DataLoader workers
    nnx_batch: int = 8
    nnx_calls: int = 300


def make_plan(quick: bool = False, reps: int | None = None, full_epoch: bool = False,
              epoch_images: int | None = None, torch_compile: bool = True) -> Plan:
    on_cpu = jax.default_backend() == "cpu"
    plan = Plan(torch_compile=torch_compile)
    if quick:
        plan = dataclasses.replace(plan, reps=3, step_calls=4, eval_calls=4, augment_images=256,
                                   epoch_train=512, epoch_test=256, torch_compile=False,
                                   nnx_calls=100)
    if not on_cpu or full_epoch:
        plan = dataclasses.replace(plan, epoch_train=CIFAR_TRAIN, epoch_test=CIFAR_TEST,
                                   epoch_reps=1)  # a whole epoch: one sample per contender
    if epoch_images is not None:
        plan = dataclasses.replace(plan, epoch_train=epoch_images,
                                   epoch_test=max(1, epoch_images // 5))
    if reps is not None:
        plan = dataclasses.replace(plan, reps=reps)
    return plan


def section_step(plan: Plan, mesh) -> dict:
    out = {}
    # One step per call in both JAX rows, as the engine trains on CPU (gpu_check times the
    # rolled loops of GPU/TPU): "jax step" is the bare step on normalised images, the engine's
    # row its own call (the batch gathered from the data set on the device and augmented).
    for batch in plan.step_batches:
        contenders = {"torch eager": torch_train_step(batch, plan.step_calls),
                      "jax step": jax_train_step(batch, plan.step_calls, mesh),
                      "jax engine step (+ augment)": jax_engine_calls(
                          batch, plan.step_calls, 1, mesh=mesh)}
        if plan.torch_compile:
            contenders["torch.compile"] = torch_train_step(batch, plan.step_calls,
                                                           plan.torch_compile_backend)
        out[f"batch {batch}"] = summarize(interleave(contenders, plan.reps), "torch eager")
    return out


def section_eval(plan: Plan, mesh) -> dict:
    contenders = {"torch eager": torch_eval(plan.eval_batch, plan.eval_calls),
                  "jax": jax_eval(plan.eval_batch, plan.eval_calls, mesh)}
    if plan.torch_compile:
        contenders["torch.compile"] = torch_eval(plan.eval_batch, plan.eval_calls,
                                                 plan.torch_compile_backend)
    return {f"batch {plan.eval_batch}": summarize(interleave(contenders, plan.reps),
                                                  "torch eager")}


def section_augment(plan: Plan, mesh) -> dict:
    contenders = {f"pillow DataLoader workers={w}": pillow_pipeline(plan.augment_images, 64, w)
                  for w in plan.augment_workers}
    contenders["jax augment (batch 64)"] = jax_augment(plan.augment_images, 64, mesh)
    baseline = f"pillow DataLoader workers={plan.augment_workers[0]}"
    return {f"{plan.augment_images} images": summarize(interleave(contenders, plan.reps),
                                                       baseline)}


TUTORIAL_LOOP = "torch tutorial loop (workers=0)"


def section_epoch(plan: Plan, mesh) -> dict:
    contenders = {TUTORIAL_LOOP: torch_epoch(plan.epoch_train, plan.epoch_test)}
    if plan.torch_compile:
        workers = plan.epoch_compiled_workers
        contenders[f"torch.compile loop (workers={workers})"] = torch_epoch(
            plan.epoch_train, plan.epoch_test, workers=workers,
            compile_backend=plan.torch_compile_backend)
    contenders["jax engine"] = jax_epoch(plan.epoch_train, plan.epoch_test, mesh)
    result = summarize(interleave(contenders, plan.epoch_reps), TUTORIAL_LOOP)
    scale = (CIFAR_TRAIN + CIFAR_TEST) / (plan.epoch_train + plan.epoch_test)
    for row in result["rows"]:
        row["epoch_seconds_50k"] = (CIFAR_TRAIN + CIFAR_TEST) / row["median"]
    result["extrapolated"] = scale != 1
    return {f"{plan.epoch_train} train + {plan.epoch_test} test images": result}


def full_recipe(epochs: int = 50, n_train: int = CIFAR_TRAIN, n_test: int = CIFAR_TEST,
                on_epoch=None) -> dict:
    """The whole recipe via `train.fit` (eval every epoch); compile time from JAX's own events.
    `on_epoch(epochs_done, seconds_since_start)` is called as each epoch is committed."""
    compile_seconds, epoch_ends = [], []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compile_seconds.append(duration)

    def log(line: str):  # fit logs the parameter table, then one "Epoch n/N done ..." per epoch
        if line.startswith("Epoch "):
            epoch_ends.append(time.perf_counter() - start)
            if on_epoch is not None:
                on_epoch(len(epoch_ends), epoch_ends[-1])

    data = synthetic_dataset(n_train, n_test)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with tempfile.TemporaryDirectory() as run_dir, open(os.devnull, "w") as quiet:
            start = time.perf_counter()
            result = train.fit(train.TrainConfig(epochs=epochs), data, run_dir, log=log,
                               progress_stream=quiet)
            wall = time.perf_counter() - start
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    # No event at all means this JAX no longer reports it, not that nothing compiled.
    compile_total = float(sum(compile_seconds)) if compile_seconds else None
    steady = [b - a for a, b in zip(epoch_ends, epoch_ends[1:])]
    return {"epochs": epochs, "train_images": n_train, "test_images": n_test,
            "wall_seconds": wall, "compile_seconds": compile_total,
            "compile_events": len(compile_seconds),
            "wall_minus_compile_seconds": None if compile_total is None else wall - compile_total,
            "epoch_end_seconds": epoch_ends,
            "steady_epoch_seconds": statistics.median(steady) if steady else None,
            "train_seconds_per_epoch": result.history.epoch_time,
            "epochs_completed": result.epochs_done}


def section_nnx(plan: Plan, mesh=None) -> dict:
    """Microseconds per Adam step of one small model, from a Python loop (what dispatch costs
    when the arithmetic is cheap): Linen under jax.jit against the three NNX ways. One device:
    `mesh` is unused, the model is too small to split."""
    contenders = {"linen jax.jit": linen_jit_step(plan.nnx_batch, plan.nnx_calls)}
    for label, mode in (("nnx.jit", "nnx.jit"), ("nnx.cached_partial", "cached"),
                        ("nnx.split + jax.jit + nnx.merge", "split")):
        contenders[label] = nnx_step(plan.nnx_batch, plan.nnx_calls, mode)
    size = "x".join(map(str, NNX_IMAGE[:2]))
    return {f"batch {plan.nnx_batch} of {size}": summarize(interleave(contenders, plan.reps),
                                                            "linen jax.jit", unit="us/step")}


RUNNERS = {"step": section_step, "eval": section_eval, "augment": section_augment,
           "epoch": section_epoch, "nnx": section_nnx}


# --- output ----------------------------------------------------------------------------------

def environment_line(env: dict) -> str:
    return (f"JAX {env['versions']['jax']} on {env['jax_device']} ({env['jax_backend']}, "
            f"{env['jax_device_count']} device(s)), PyTorch {env['versions']['torch']} on "
            f"{env['torch_device']}; CPU {env['cpu']}, {env['cpu_count']} cores, torch threads "
            f"{env['threads']['torch_intra_op']}, load average at start "
            f"{env['threads']['load_average_at_start'][0]:.2f}.")


def _ratio_text(ratio: dict) -> str:
    return f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"


def sections_markdown(sections: dict) -> str:
    """One table per measured group: median, ratio to the group's baseline (and to
    `torch.compile` where it ran), cores busy, and the untimed warm-up (compilation)."""
    lines = []
    for section, parts in sections.items():
        for label, result in parts.items():
            compiled = result.get("compiled")
            vs_compiled = f" vs {compiled} |" if compiled else ""
            lines += [f"### {section}: {label} ({result['reps']} interleaved repetitions, load "
                      f"{result['load_average_start']:.1f} -> {result['load_average_end']:.1f})",
                      "", f"| contender | median | ratio vs {result['baseline']} (median, "
                      f"min-max) |{vs_compiled} cores busy | warm-up |",
                      "|---|---:|---:|" + ("---:|" if compiled else "") + "---:|---:|"]
            for row in result["rows"]:
                busy = "" if row["cores_busy"] is None else f"{row['cores_busy']:.1f}"
                ratio = {"median": row["ratio_median"], "min": row["ratio_min"],
                         "max": row["ratio_max"]}
                to_compiled = f" {_ratio_text(row['ratio_vs_compiled'])} |" if compiled else ""
                lines.append(f"| {row['name']} | {row['median']:,.0f} {row['unit']} | "
                             f"{_ratio_text(ratio)} |{to_compiled} {busy} | "
                             f"{row['warmup_seconds']:.1f} s |")
            for name, error in result.get("errors", {}).items():
                lines.append(f"| {name} | failed: {error.splitlines()[0][:120]} | |"
                             + (" |" if compiled else "") + " | |")
            if result.get("extrapolated"):
                lines.append("")
                lines.append("Epoch seconds extrapolated to 50,000 + 10,000 images: " + ", ".join(
                    f"{row['name']} {row['epoch_seconds_50k']:,.0f} s" for row in result["rows"]))
            lines.append("")
    return "\n".join(lines)


def recipe_line(r: dict) -> str:
    compiling = ("compile time not reported by this JAX" if r["compile_seconds"] is None else
                 f"of which {r['compile_seconds']:,.1f} s compiling "
                 f"({r['wall_minus_compile_seconds']:,.1f} s without)")
    return (f"{r['epochs_completed']} of {r['epochs']} epochs of {r['train_images']:,} + "
            f"{r['test_images']:,} images: {r['wall_seconds']:,.1f} s wall, {compiling}.")


def to_markdown(report: dict) -> str:
    lines = [environment_line(report["environment"]), "", sections_markdown(report["sections"])]
    if "full_recipe" in report:
        lines += ["### full recipe", "", recipe_line(report["full_recipe"]), ""]
    return "\n".join(lines)


def across_processes(argv: list, processes: int, out: Path, ablate: str | None = None) -> dict:
    """Run this script with `argv` `processes` times, each in a fresh process writing its own
    report to `<out>/process_<i>/`, and gather every table's ratios per process. With `ablate`,
    every second process runs `--without ablate` (the first with it, the second without, ...).

    Why: on a 2-core CPU `torch.compile`'s eval moved by up to 1.6x from one process to the
    next, with the same code and input (docs/benchmarks.md), so the ratios of one run are one
    draw from that spread; their median over processes is a steadier figure.
    """
    runs = []
    for i in range(processes):
        run_dir = out / f"process_{i}"
        without = ["--without", ablate] if ablate and i % 2 else []
        subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, *without,
                        "--processes", "1", "--ablate", "", "--out", str(run_dir)], check=True)
        runs.append(json.loads((run_dir / "benchmark.json").read_text()))
    summary = gather_processes(runs)
    if ablate:
        summary["ablation"] = gather_ablation(runs, ablate)
    return summary


def gather_processes(runs: list) -> dict:
    """`across_processes`'s summary of the runs' reports (benchmark.json, in order)."""
    tables = {}
    for section, parts in runs[0]["sections"].items():
        for label, first in parts.items():
            rows = {}
            for row in first["rows"]:
                per_run = [next((r for r in run["sections"][section][label]["rows"]
                                 if r["name"] == row["name"]), None) for run in runs]
                if None in per_run:  # failed in some process: its error is in that report
                    continue
                rows[row["name"]] = {"vs_baseline": [r["ratio_median"] for r in per_run]}
                if first.get("compiled"):
                    rows[row["name"]]["vs_compiled"] = [r["ratio_vs_compiled"]["median"]
                                                        for r in per_run]
            tables[f"{section}: {label}"] = {"baseline": first["baseline"],
                                             "compiled": first.get("compiled"), "rows": rows}
    return {"processes": len(runs), "tables": tables,
            "load_average_at_start": [run["environment"]["threads"]["load_average_at_start"][0]
                                      for run in runs]}


def gather_ablation(runs: list, name: str) -> dict:
    """Each contender's gain from `name`: the median throughput of a process with it over that
    of the next process, without it (pairs of `across_processes`' runs: 0/1, 2/3, ...)."""
    tables = {}
    for section, parts in runs[0]["sections"].items():
        for label in parts:
            rows = {}
            for row in parts[label]["rows"]:
                medians = [next((r["median"] for r in run["sections"][section][label]["rows"]
                                 if r["name"] == row["name"]), None) for run in runs]
                pairs = list(zip(medians[0::2], medians[1::2]))
                gains = [a / b for a, b in pairs if a is not None and b is not None]
                if gains:
                    rows[row["name"]] = {"with": medians[0::2], "without": medians[1::2],
                                         "gain": gains}
            tables[f"{section}: {label}"] = rows
    return {"name": name, "pairs": len(runs) // 2, "tables": tables}


def ablation_markdown(ablation: dict) -> str:
    """Per table: each contender's throughput with and without the setting, pair by pair."""
    lines = [f"### --ablate {ablation['name']}: {ablation['pairs']} pairs of processes "
             f"(with, then without)", "",
             "| table | contender | gain per pair (with / without) | median |",
             "|---|---|---:|---:|"]
    for title, rows in ablation["tables"].items():
        for name, row in rows.items():
            gains = ", ".join(f"{g:.3f}x" for g in row["gain"])
            lines.append(f"| {title} | {name} | {gains} | "
                         f"{statistics.median(row['gain']):.3f}x |")
    return "\n".join(lines + [""])


def processes_markdown(summary: dict) -> str:
    """Per table: each contender's ratio median in each process, and their median."""
    loads = ", ".join(f"{load:.2f}" for load in summary["load_average_at_start"])
    lines = [f"{summary['processes']} processes, load average at their starts: {loads}.", ""]
    for title, table in summary["tables"].items():
        columns = [("vs_baseline", table["baseline"])]
        if table["compiled"]:
            columns.append(("vs_compiled", table["compiled"]))
        lines += [f"### {title}: ratio medians per process", "",
                  "| contender | " + " | ".join(f"vs {name}, per process | median"
                                                for _, name in columns) + " |",
                  "|---|" + "---:|---:|" * len(columns)]
        for name, row in table["rows"].items():
            cells = [f"{', '.join(f'{r:.2f}x' for r in row[key])} | "
                     f"{statistics.median(row[key]):.2f}x" for key, _ in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if "ablation" in summary:
        lines.append(ablation_markdown(summary["ablation"]))
    return "\n".join(lines)


def run(sections, plan: Plan, full: bool = False, recipe_epochs: int = 50) -> dict:
    report = {"environment": environment(), "plan": dataclasses.asdict(plan), "sections": {}}
    mesh = distributed.make_mesh()
    for name in sections:
        report["sections"][name] = RUNNERS[name](plan, mesh)
    if full:
        report["full_recipe"] = full_recipe(recipe_epochs)
    report["environment"]["threads"]["load_average_at_end"] = os.getloadavg()
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (or 'none')")
    parser.add_argument("--quick", action="store_true", help="small sizes, no torch.compile")
    parser.add_argument("--reps", type=int, help="interleaved repetitions per section")
    parser.add_argument("--full-epoch", action="store_true",
                        help="epoch section on 50,000 + 10,000 images (default on GPU)")
    parser.add_argument("--epoch-images", type=int, help="train images in the epoch section")
    parser.add_argument("--no-torch-compile", action="store_true")
    parser.add_argument("--full-recipe", action="store_true",
                        help="also run the 50-epoch JAX recipe (compile time reported apart)")
    parser.add_argument("--recipe-epochs", type=int, default=50)
    parser.add_argument("--out", default="benchmark_results", help="directory for .md and .json")
    parser.add_argument("--processes", type=int, default=1,
                        help="run the whole measurement this many times, each in a fresh "
                             "process, and report each table's ratios per process and their "
                             "median (processes.md)")
    parser.add_argument("--without", default="", metavar="NAME[,NAME]",
                        help=f"leave these out in this process: {', '.join(ABLATIONS)}")
    parser.add_argument("--ablate", default="", choices=("", *ABLATIONS), metavar="NAME",
                        help="with --processes N (even): every second process runs --without "
                             "NAME; processes.md gives each contender's gain from NAME, pair by "
                             f"pair. One of {', '.join(ABLATIONS)}")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")
    if args.ablate and (args.processes < 2 or args.processes % 2):
        parser.error(f"--ablate needs an even --processes, got {args.processes}")
    without = tuple(filter(None, args.without.split(",")))
    if set(without) - set(ABLATIONS):
        parser.error(f"--without: expected names among {', '.join(ABLATIONS)}, got "
                     f"{args.without!r}")
    sections = [] if args.sections == "none" else args.sections.split(",")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}: expected a subset of {list(SECTIONS)}")
    out = Path(args.out)
    if args.processes > 1:
        summary = across_processes(argv, args.processes, out, args.ablate or None)
        markdown = processes_markdown(summary)
        (out / "processes.md").write_text(markdown + "\n")
        (out / "processes.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(markdown)
        return summary
    # As scripts/train.py: before JAX starts, one CPU device per core (a no-op on GPU hosts).
    devices = 1 if "devices_per_core" in without else runtime.cpu_devices_for(64)
    runtime.configure_cpu(devices, without=tuple(n for n in without if n in runtime.CPU_TUNINGS))
    plan = make_plan(args.quick, args.reps, args.full_epoch, args.epoch_images,
                     not args.no_torch_compile)
    report_without = list(without)
    report = run(sections, plan, args.full_recipe, args.recipe_epochs)
    report["without"] = report_without
    markdown = to_markdown(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(markdown + "\n")
    (out / "benchmark.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(markdown)
    return report


if __name__ == "__main__":
    main()
