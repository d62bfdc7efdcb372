"""Everything a GPU run must show, measured and checked by one command in under 8 minutes.

    bash scripts/gpu_check.sh --out "$OUT"                # on a GPU machine (7.5 min at most)
    bash scripts/gpu_check.sh --tiny --out /tmp/gc        # every step on CPU, a few images each
    bash scripts/gpu_check.sh --steps recipe,tutorial --out "$OUT"  # some steps again

Run from the repository root; `scripts/gpu_check.sh` puts the source tree on PYTHONPATH (no
`pip install -e`, which needs the network) and first installs any wheels found in `.whl/`.
The steps, in this order, each in its own process under a time box (`--budget`, 450 s by
default, is shared so that the whole run ends in time; a step that overruns is killed and the
run goes on):

    prereq       the packages, JAX on the GPU, PyTorch on CUDA; versions, precision settings,
                 nvidia-smi. Stops the run within seconds, saying what is missing.
    smoke        the layer, model and ops tests on the GPU, and the parity report
                 (`parity.report.run_report`): JAX on the GPU against PyTorch on CUDA, float32
                 with TF32 off on both sides
    jax_steps    the engine's train call at batch 64 (augment + Adam step, data on the device):
                 one step per call, a fori_loop of 10 and 50 steps per call, a lax.scan of 50;
                 XLA's command buffers (CUDA graphs) as XLA sets them, off, and with loops;
                 bfloat16; without the custom gradients of cbam_jax.ops; then a
                 jax.profiler trace of the fori_loop of 50: the top device costs
    torch_steps  the tutorial's step in PyTorch on the same card: eager, torch.compile, and
                 captured whole as one CUDA graph
    augment      the on-device augmentation alone, against the Pillow DataLoader
    recipe       the full recipe through `train.fit`: 50 epochs of 50,000 + 10,000 synthetic
                 CIFAR-shaped images, eval every epoch; wall and compile time (target: 15 s)
    tutorial     one epoch of the tutorial's own pipeline (Pillow DataLoader with
                 num_workers=0, as the tutorial has it, and 8; eager step), times 50: the
                 baseline of the 50x target

Outputs, rewritten after every step (a run cut short keeps what it measured), at most 3 files:
`gpu_check.json` (every figure, the environment, each step's status), `gpu_check.md` (the
tables, also printed last) and `gpu_check.log` (every step's own output).

On a machine without network, put the wheels of any package it lacks into `.whl/` beforehand;
docs/gpu.md says how, and where the tables go (docs/benchmarks.md, section "GPU", under the
card's name that is gpu_check.md's first line).
"""
import argparse
import dataclasses
import datetime
import gzip
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
OUTPUT_NAMES = ("gpu_check.json", "gpu_check.md", "gpu_check.log")
RECIPE_TARGET_SECONDS = 15.0
SPEEDUP_TARGET = 50.0
# What the steps import beyond the standard library, and why a missing one matters.
PREREQUISITES = {
    "jax": "the engine", "jaxlib": "the engine", "flax": "the models", "optax": "Adam",
    "numpy": "arrays", "orbax.checkpoint": "train.fit's checkpoints",
    "tensorboardX": "train.fit's TensorBoard logs (offline: put its wheel in .whl/, see "
                    "docs/gpu.md)",
    "matplotlib": "train.fit's figures", "tqdm": "train.fit's progress line",
    "torch": "the tutorial's side", "PIL": "the tutorial's transforms", "pytest": "the tests",
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each step does; FULL on a GPU, TINY on CPU for the test suite."""

    expect_gpu: bool
    batch: int                # the train call's batch (the tutorial's 64)
    steps: int                # train steps per timed repetition of a train-call variant
    steps_per_call: tuple     # the looped variants; the largest is also the scan's length
    reps: int                 # interleaved repetitions per group
    torch_calls: int          # PyTorch steps per timed repetition
    augment_images: int
    workers: tuple            # DataLoader workers: the tutorial's 0, and more
    recipe_epochs: int
    train_images: int
    test_images: int
    parity_batch: int
    tests: tuple              # pytest paths, and a -k filter ("" = all)
    test_filter: str
    compile_backend: str      # torch.compile's backend
    # The train-call contenders to build (None: all of train_call_groups'); a group left with
    # nothing that an earlier group did not already time is dropped.
    train_calls: tuple | None
    time_scale: float         # the steps' time boxes and the default budget, times this


FULL = Sizes(expect_gpu=True, batch=64, steps=100, steps_per_call=(10, 50), reps=5,
             torch_calls=50, augment_images=4096, workers=(0, 8), recipe_epochs=50,
             train_images=50_000, test_images=10_000, parity_batch=16,
             tests=("tests/test_layers.py", "tests/test_models.py", "tests/test_ops.py"),
             test_filter="", compile_backend="inductor", train_calls=None, time_scale=1.0)
# Each JAX compile takes 5-20 s on a busy 2-core CPU, so TINY builds one train call per kind
# of path (the keywords themselves are tested in tests/test_benchmark.py). Inductor's code
# generation takes minutes there: the "eager" backend still runs torch.compile's tracing.
TINY = Sizes(expect_gpu=False, batch=8, steps=2, steps_per_call=(2,), reps=2, torch_calls=2,
             augment_images=16, workers=(0, 2), recipe_epochs=2, train_images=128,
             test_images=64, parity_batch=2, tests=("tests/test_ops.py",),
             test_filter="test_max_pool_gradient_goes_to_the_first_maximum",
             compile_backend="eager",
             train_calls=("1 step per call", "fori_loop of 2", "1 step per call, off"),
             time_scale=4.0)

# XLA's command buffers (CUDA graphs), per compile. "default" is whatever this jaxlib's XLA
# records; "with loops" names the usual kinds plus while loops and conditionals, so that a whole
# fori_loop can become one graph (a per-compile option takes a full list, not "+WHILE").
COMMAND_BUFFERS = {
    "default": (),
    "off": (("xla_gpu_enable_command_buffer", ""),),
    "with loops": (("xla_gpu_enable_command_buffer",
                    "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"),),
}


class StepResult:
    """A step's results as one JSON file, rewritten after every change: a step cut off by its
    time box keeps what it had measured."""

    def __init__(self, path: Path):
        self.path, self.data = Path(path), {}

    def __setitem__(self, key, value):
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def __getitem__(self, key):
        return self.data[key]


# --- the steps (each runs in its own process: `--run-step NAME`) ----------------------------

def step_prereq(sizes: Sizes, result: StepResult, benchmark):
    import torch
    env = benchmark.environment()
    result["environment"] = env
    result["nvidia_smi"] = nvidia_smi()
    problems = []
    if sizes.expect_gpu and env["jax_backend"] != "gpu":
        problems.append(f"JAX runs on '{env['jax_backend']}', not a GPU: install JAX's CUDA "
                        f"plugin (pip install 'jax[cuda13]'), or pass --tiny to run every "
                        f"step on CPU")
    if sizes.expect_gpu and not torch.cuda.is_available():
        problems.append("PyTorch sees no CUDA device: install a CUDA build of torch, or pass "
                        "--tiny")
    result["problems"] = problems


def nvidia_smi() -> str | None:
    """The card's state as nvidia-smi reads it (a query only: nothing is changed)."""
    if shutil.which("nvidia-smi") is None:
        return None
    fields = ("name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,"
              "temperature.gpu,power.draw,utilization.gpu")
    done = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv"],
                          capture_output=True, text=True, timeout=30)
    return done.stdout.strip() or done.stderr.strip()


def step_smoke(sizes: Sizes, result: StepResult, benchmark):
    import jax
    import pytest
    import torch

    from parity.report import format_table, random_state_dict, run_report

    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = run_report(random_state_dict(0), seed=0, batch_size=sizes.parity_batch,
                        device=device)
    print(report.headline)
    print(format_table(report))
    rows = report.rows
    margin = sorted(rows, key=lambda r: -r.margin)
    result["parity"] = {
        "jax_backend": jax.default_backend(), "torch_device": device,
        "batch_size": sizes.parity_batch, "passed": sum(r.passed for r in rows),
        "total": len(rows),
        "failed": [dataclasses.asdict(r) for r in rows if not r.passed],
        "closest_to_tolerance": [dataclasses.asdict(r) for r in margin[:5]]}
    # The tests second: should they overrun the time box, the parity report is kept, and so
    # is every test outcome so far (the recorder writes each one).
    outcomes = OutcomeRecorder(result, {"paths": list(sizes.tests), "filter": sizes.test_filter})
    args = [*sizes.tests, "-q", "-p", "no:cacheprovider", "--durations=5"]
    exit_code = pytest.main(args + (["-k", sizes.test_filter] if sizes.test_filter else []),
                            plugins=[outcomes])
    result["tests"] = {**result["tests"], "exit_code": int(exit_code)}


class OutcomeRecorder:
    """A pytest plugin that writes the outcomes so far into result["tests"] after each test."""

    def __init__(self, result: StepResult, about: dict):
        self.result, self.about, self.passed, self.failed = result, about, 0, []
        result["tests"] = {**about, "passed": 0, "failed": []}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed:
            self.passed += 1
        elif report.failed:
            self.failed.append({"test": report.nodeid, "phase": report.when,
                                "error": str(report.longrepr)[-2000:]})
        else:
            return
        self.result["tests"] = {**self.about, "passed": self.passed, "failed": self.failed}


def option_rejection(options: tuple) -> str | None:
    """None when this JAX compiles and runs a small loop with these XLA compiler options, else
    the error: a flag that this jaxlib does not know is recorded, not fatal."""
    import jax
    import jax.numpy as jnp

    def loop(x):
        return jax.lax.fori_loop(0, 3, lambda i, c: c * 2.0 + 1.0, x)

    try:
        jax.block_until_ready(jax.jit(loop, compiler_options=dict(options))(jnp.ones(4)))
    except Exception as e:  # XLA says INVALID_ARGUMENT for an unknown flag or value
        return f"{type(e).__name__}: {e}"
    return None


def train_call_groups(sizes: Sizes) -> dict:
    """{group: {contender: jax_engine_calls keywords, with `buffers` naming a COMMAND_BUFFERS
    entry}}. Every group starts with the same baseline (one step per call, XLA's defaults,
    float32), so each ratio reads against it."""
    k = sizes.steps_per_call[-1]
    base = {"1 step per call": dict(steps_per_call=1)}
    fori = {f"fori_loop of {k}": dict(steps_per_call=k, loop="fori")}
    return {
        "steps per call (XLA's command buffers as it sets them)": {
            **base, **{f"fori_loop of {n}": dict(steps_per_call=n, loop="fori")
                       for n in sizes.steps_per_call},
            f"lax.scan of {k}": dict(steps_per_call=k, loop="scan")},
        "command buffers off": {
            **base, "1 step per call, off": dict(steps_per_call=1, buffers="off"),
            f"fori_loop of {k}, off": dict(steps_per_call=k, loop="fori", buffers="off"),
            f"lax.scan of {k}, off": dict(steps_per_call=k, loop="scan", buffers="off")},
        "command buffers with loops (WHILE, CONDITIONAL)": {
            **base, **fori,
            f"fori_loop of {k}, with loops": dict(steps_per_call=k, loop="fori",
                                                 buffers="with loops"),
            f"lax.scan of {k}, with loops": dict(steps_per_call=k, loop="scan",
                                                 buffers="with loops")},
        "bfloat16": {
            **base, **fori, "1 step per call, bfloat16": dict(steps_per_call=1, dtype="bfloat16"),
            f"fori_loop of {k}, bfloat16": dict(steps_per_call=k, loop="fori",
                                               dtype="bfloat16")},
        "custom gradients (cbam_jax.ops's fused ops), or autodiff's": {
            **base, **fori,
            f"fori_loop of {k}, autodiff": dict(steps_per_call=k, loop="fori",
                                               custom_gradients=False)},
    }


def step_jax_steps(sizes: Sizes, result: StepResult, benchmark):
    from cbam_jax import distributed
    mesh = distributed.make_mesh()
    rejected = {mode: option_rejection(options) for mode, options in COMMAND_BUFFERS.items()}
    result["command_buffers"] = {mode: {"options": dict(COMMAND_BUFFERS[mode]),
                                        "rejected": why} for mode, why in rejected.items()}
    built, groups = {}, {}  # one contender object per name: compiled once, shared by groups
    for group, specs in train_call_groups(sizes).items():
        specs = {name: spec for name, spec in specs.items()
                 if sizes.train_calls is None or name in sizes.train_calls}
        if all(name in built for name in specs):
            continue
        contenders, unusable = {}, {}
        for name, spec in specs.items():
            buffers = spec.get("buffers", "default")
            if rejected[buffers]:
                unusable[name] = f"compiler options rejected: {rejected[buffers]}"
                continue
            if name not in built:
                built[name] = benchmark.jax_engine_calls(
                    sizes.batch, sizes.steps, mesh=mesh, compiler_options=COMMAND_BUFFERS[buffers],
                    **{key: value for key, value in spec.items() if key != "buffers"})
            contenders[name] = built[name]
        groups[group] = summarize_group(benchmark, contenders, "1 step per call", sizes.reps,
                                        unusable)
        result["groups"] = groups
    k = sizes.steps_per_call[-1]
    if f"fori_loop of {k}" in built:  # compiled and warm: the engine's GPU default
        try:
            result["profile"] = profile(built[f"fori_loop of {k}"], k, sizes.steps)
        except Exception as e:  # the timings above stand without it
            traceback.print_exc()
            result["profile"] = {"error": f"{type(e).__name__}: {e}"}


def profile(run, steps_per_call: int, steps: int) -> dict:
    """One timed run of a train-call contender under `jax.profiler.trace`, and its top costs."""
    import jax
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            images_per_s = run()
            wall = time.perf_counter() - start
        costs = top_costs(next(Path(trace_dir).rglob("perfetto_trace.json.gz")))
    return {"steps_per_call": steps_per_call, "steps": steps, "images_per_s": images_per_s,
            "wall_ms_per_step": 1e3 * wall / steps, **costs}


def summarize_group(benchmark, contenders: dict, baseline: str, reps: int, errors=None) -> dict:
    """Interleaved timings of a group, or the error that stopped it; failures of single
    contenders are kept beside the rows."""
    try:
        timings = benchmark.interleave(contenders, reps, keep_going=True)
        timings.errors.update(errors or {})
        return benchmark.summarize(timings, baseline)
    except Exception as e:  # the group's baseline failed: the other groups still run
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}


def step_torch_steps(sizes: Sizes, result: StepResult, benchmark):
    factories = {
        "torch eager": lambda: benchmark.torch_train_step(sizes.batch, sizes.torch_calls),
        "torch.compile": lambda: benchmark.torch_train_step(sizes.batch, sizes.torch_calls,
                                                            sizes.compile_backend),
        "CUDA graph of the whole step": lambda: benchmark.torch_graph_step(sizes.batch,
                                                                           sizes.torch_calls)}
    contenders, errors = {}, {}
    for name, make in factories.items():
        try:
            contenders[name] = make()
        except Exception as e:  # e.g. no CUDA graph without CUDA: recorded as such
            errors[name] = f"{type(e).__name__}: {e}"
    result["groups"] = {f"batch {sizes.batch}": summarize_group(
        benchmark, contenders, "torch eager", sizes.reps, errors)}


def step_augment(sizes: Sizes, result: StepResult, benchmark):
    from cbam_jax import distributed
    plan = benchmark.Plan(reps=sizes.reps, augment_images=sizes.augment_images,
                          augment_workers=sizes.workers)
    result["groups"] = benchmark.section_augment(plan, distributed.make_mesh())


def step_recipe(sizes: Sizes, result: StepResult, benchmark):
    epoch_ends = []

    def on_epoch(done, seconds):  # kept as it goes: a time box that cuts the run keeps these
        epoch_ends.append(seconds)
        result["progress"] = {"epochs_done": done, "epoch_end_seconds": epoch_ends}

    result["recipe"] = benchmark.full_recipe(sizes.recipe_epochs, sizes.train_images,
                                             sizes.test_images, on_epoch=on_epoch)


def step_tutorial(sizes: Sizes, result: StepResult, benchmark):
    benchmark.torch_epoch(64, 64)()  # CUDA context, cuDNN handles: not part of an epoch
    groups, epoch_seconds = {}, {}
    for workers in sizes.workers:  # one group each: a time box keeps the finished ones
        name = f"tutorial loop (workers={workers})"
        run = benchmark.torch_epoch(sizes.train_images, sizes.test_images, workers=workers)
        groups[name] = benchmark.summarize(benchmark.interleave({name: run}, 1, warmup=0), name)
        # Seconds per epoch of the real data set's size (exact on FULL, scaled on TINY).
        epoch_seconds[str(workers)] = ((benchmark.CIFAR_TRAIN + benchmark.CIFAR_TEST)
                                       / groups[name]["rows"][0]["median"])
        result["groups"] = groups
        result["epoch_seconds"] = epoch_seconds


def top_costs(path: Path, top: int = 15) -> dict:
    """The costliest events of a Perfetto trace (`jax.profiler.trace(create_perfetto_trace=
    True)`): GPU kernels on the device's streams when the trace has them (else the XLA ops on
    the host's threads), summed by name, and the time the device was busy at all."""
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {}  # (pid, tid) -> thread name; pid -> process name
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            names[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            names[(e["pid"], e["tid"])] = e["args"]["name"]
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device = [e for e in spans if str(names.get(e["pid"], "")).startswith("/device:")]
    streams = [e for e in device if names.get((e["pid"], e["tid"]), "").startswith("Stream")]
    if streams or device:
        source, chosen = ("device streams", streams) if streams else ("device", device)
    else:  # a CPU run, or a profiler without device tracing: the XLA work on host threads
        source = "host threads"
        chosen = [e for e in spans if names.get((e["pid"], e["tid"])) != "python"
                  and not e["name"].startswith("$")]
    totals = {}
    for e in chosen:
        count, micros = totals.get(e["name"], (0, 0.0))
        totals[e["name"]] = (count + 1, micros + e["dur"])
    busy = _union_length([(e["ts"], e["ts"] + e["dur"]) for e in chosen])
    first = min((e["ts"] for e in chosen), default=0.0)
    last = max((e["ts"] + e["dur"] for e in chosen), default=0.0)
    ranked = sorted(totals.items(), key=lambda item: -item[1][1])[:top]
    return {"source": source, "busy_ms": busy / 1e3, "span_ms": (last - first) / 1e3,
            "top": [{"name": name, "calls": count, "ms": micros / 1e3}
                    for name, (count, micros) in ranked]}


def _union_length(intervals) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    run: Callable
    box: int      # seconds it may take at most
    reserve: int  # seconds kept free for it while the steps before it run
    env: tuple = ()  # extra environment variables


# Time boxes in seconds (FULL; TINY scales them). No GPU run has sized them yet: they are about
# twice what each step should need on a data-centre GPU, judged from the CPU runs and typical
# GPU compile times.
STEPS = (
    Step("prereq", step_prereq, 60, 10),
    # The tests compare with float64/numpy references: JAX's TF32 default would fail them.
    Step("smoke", step_smoke, 100, 30, (("JAX_DEFAULT_MATMUL_PRECISION", "highest"),)),
    Step("jax_steps", step_jax_steps, 170, 70),
    Step("torch_steps", step_torch_steps, 100, 30),
    Step("augment", step_augment, 45, 15),
    Step("recipe", step_recipe, 200, 100),
    Step("tutorial", step_tutorial, 100, 40),
)
BUDGET_SECONDS = 450  # the whole run, FULL: under 8 minutes with the wrapper's start
STEP_NAMES = tuple(step.name for step in STEPS)


def time_box(steps, index: int, seconds_left: float, scale: float = 1.0) -> float:
    """Seconds step `index` may take: its own box, less what the steps after it keep."""
    kept = scale * sum(step.reserve for step in steps[index + 1:])
    return min(scale * steps[index].box, seconds_left - kept)


def run_in_step_process(step_name: str, tiny: bool, result_path: Path) -> int:
    """Child side: run one step, its results into `result_path`."""
    sizes = TINY if tiny else FULL
    from cbam_jax import runtime
    # As scripts/train.py, before JAX starts: one CPU device per core (nothing on a GPU).
    runtime.configure_cpu(runtime.cpu_devices_for(sizes.batch))
    import benchmark  # scripts/benchmark.py, beside this file: the contenders and their tables
    result = StepResult(result_path)
    step = next(s for s in STEPS if s.name == step_name)
    try:
        step.run(sizes, result, benchmark)
    except Exception as e:
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"
        return 1
    return 0


def run_step(argv: list, timeout: float, log, env: dict | None = None) -> tuple[str, int, float]:
    """Run a child process (its own process group) with its output appended to `log`; kill the
    group when it overruns. Returns (status: ok/failed/timeout, return code, seconds)."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                             start_new_session=True)
    try:
        code = child.wait(timeout=max(timeout, 1))
        status = "ok" if code == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGTERM)  # its DataLoader workers too
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        code, status = child.returncode, "timeout"
    return status, code, time.perf_counter() - start


def missing_prerequisites(modules: dict = PREREQUISITES) -> list[str]:
    """The modules that cannot be imported here, each with what needs it (no import made)."""
    missing = []
    for name, why in modules.items():
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # its parent package is missing
            found = False
        if not found:
            missing.append(f"{name} ({why})")
    return missing


# --- the driver ------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the module docstring for the steps.")
    parser.add_argument("--out", default="gpu_check_results", help="where the 3 files go")
    parser.add_argument("--tiny", action="store_true",
                        help="every step on CPU with a few images and steps (the test suite's)")
    parser.add_argument("--steps", default=",".join(STEP_NAMES[1:]),
                        help="comma-separated steps to run after prereq (default: all)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for the whole run (default {BUDGET_SECONDS}; --tiny: "
                             f"{TINY.time_scale:g} times that); each step's time box is cut "
                             f"to fit")
    parser.add_argument("--run-step", choices=STEP_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_step:
        return run_in_step_process(args.run_step, args.tiny, Path(args.result))
    wanted = args.steps.split(",") if args.steps else []
    unknown = [s for s in wanted if s not in STEP_NAMES[1:]]
    if unknown:
        parser.error(f"unknown steps {unknown}: expected some of {', '.join(STEP_NAMES[1:])}")

    scale = (TINY if args.tiny else FULL).time_scale
    budget = args.budget if args.budget is not None else scale * BUDGET_SECONDS
    started = time.monotonic()
    deadline = started + budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"mode": "tiny" if args.tiny else "full", "budget_seconds": budget,
              "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "load_average_at_start": os.getloadavg(), "steps": {}}
    missing = missing_prerequisites()
    if missing:
        return stop(out, report, "missing Python packages: " + "; ".join(missing))
    steps = [s for s in STEPS if s.name == "prereq" or s.name in wanted]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log_path = out / "gpu_check.log"
    log_path.write_text("")
    # Appending (O_APPEND): the children's output and the driver's headers land in order.
    with tempfile.TemporaryDirectory() as work, open(log_path, "a", buffering=1) as log:
        for index, step in enumerate(steps):
            timeout = time_box(steps, index, deadline - time.monotonic(), scale)
            if timeout < scale * step.reserve / 2:
                report["steps"][step.name] = {"status": "skipped", "seconds": 0.0,
                                              "why": f"{timeout:.0f} s left of the budget"}
                write_outputs(out, report)
                continue
            result_path = Path(work) / f"{step.name}.json"
            print(f"{step.name}: running (time box {timeout:.0f} s)", flush=True)
            log.write(f"\n===== {step.name} (time box {timeout:.0f} s) =====\n")
            log.flush()
            start_of_log = log_path.stat().st_size
            status, code, seconds = run_step(
                [sys.executable, str(Path(__file__).resolve()), "--run-step", step.name,
                 "--result", str(result_path)] + (["--tiny"] if args.tiny else []),
                timeout, log, dict(env, **dict(step.env)))
            result = json.loads(result_path.read_text()) if result_path.exists() else {}
            report["steps"][step.name] = {"status": status, "returncode": code,
                                          "seconds": seconds, "time_box": timeout, **result}
            print(f"{step.name}: {status} in {seconds:.1f} s", flush=True)
            if status != "ok":
                print(log_tail(log_path, start_of_log), flush=True)
            if step.name == "prereq":
                report["environment"] = result.get("environment")
                problems = result.get("problems", ["the prerequisite check did not finish"]
                                      if status != "ok" else [])
                if problems:
                    return stop(out, report, "; ".join(problems))
            write_outputs(out, report)
    report["wall_seconds"] = time.monotonic() - started
    report["load_average_at_end"] = os.getloadavg()
    markdown = write_outputs(out, report)
    print(markdown)
    return 0 if all(s["status"] == "ok" for s in report["steps"].values()) else 1


def stop(out: Path, report: dict, why: str) -> int:
    """End the run before any measurement, saying why (JSON and markdown both)."""
    report["stopped"] = why
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(f"gpu_check stopped: {why}\n")
    print(f"gpu_check: cannot run: {why}", file=sys.stderr)
    return 2


def log_tail(path: Path, start: int, lines: int = 25) -> str:
    with open(path, "rb") as f:
        f.seek(start)
        return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])


def write_outputs(out: Path, report: dict) -> str:
    report["summary"] = summary(report)
    markdown = to_markdown(report)
    for name, text in (("gpu_check.json", json.dumps(report, indent=1, default=str)),
                       ("gpu_check.md", markdown)):
        tmp = out / (name + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, out / name)
    return markdown


def summary(report: dict) -> dict:
    """The two targets and the checks, from whatever steps have finished."""
    steps = report["steps"]
    recipe = steps.get("recipe", {}).get("recipe")
    tutorial = steps.get("tutorial", {}).get("epoch_seconds", {})
    smoke = steps.get("smoke", {})
    out = {}
    if recipe:
        out["recipe_seconds"] = recipe["wall_seconds"]
        out["recipe_target_met"] = recipe["wall_seconds"] <= RECIPE_TARGET_SECONDS
    if tutorial:
        baseline = tutorial.get("0")  # the tutorial's own num_workers=0
        out["tutorial_50_epochs_seconds"] = {str(w): 50 * s for w, s in tutorial.items()}
        if recipe and baseline:
            out["speedup"] = 50 * baseline / recipe["wall_seconds"]
            out["speedup_target_met"] = out["speedup"] >= SPEEDUP_TARGET
    if "parity" in smoke:
        out["parity"] = f"{smoke['parity']['passed']}/{smoke['parity']['total']}"
    if "tests" in smoke:
        out["tests"] = {"passed": smoke["tests"]["passed"],
                        "failed": len(smoke["tests"]["failed"])}
    return out


def to_markdown(report: dict) -> str:
    import benchmark  # scripts/ is on sys.path when this file runs as a script
    env = report.get("environment") or {}
    card = env.get("torch_device") if env.get("torch_device", "cpu") != "cpu" else (
        env.get("jax_device", "unknown device"))
    tiny = " --tiny (CPU, tiny sizes: paths and formats, not figures)" if (
        report["mode"] == "tiny") else ""
    lines = [f"### {card}: scripts/gpu_check.sh, {report['started'][:10]}{tiny}", ""]
    if env:
        lines += [benchmark.environment_line(env), ""]
    s, steps = report["summary"], report["steps"]
    targets = []
    recipe = steps.get("recipe", {}).get("recipe")
    if recipe:
        targets.append(f"| full recipe (`train.fit`, eval every epoch) | "
                       f"{benchmark.recipe_line(recipe)} | {RECIPE_TARGET_SECONDS:.0f} s |")
    elif "progress" in steps.get("recipe", {}):
        p = steps["recipe"]["progress"]
        targets.append(f"| full recipe: cut off after {p['epochs_done']} epochs | "
                       f"{p['epoch_end_seconds'][-1]:,.1f} s | {RECIPE_TARGET_SECONDS:.0f} s |")
    for workers, seconds in s.get("tutorial_50_epochs_seconds", {}).items():
        targets.append(f"| tutorial pipeline, 50 epochs (1 epoch x 50), workers={workers} | "
                       f"{seconds:,.0f} s | |")
    if "speedup" in s:
        targets.append(f"| speed-up over the tutorial pipeline (workers=0) | "
                       f"{s['speedup']:.1f}x | {SPEEDUP_TARGET:.0f}x |")
    if "tests" in s:
        targets.append(f"| layer, model and ops tests | {s['tests']['passed']} passed, "
                       f"{s['tests']['failed']} failed | all pass |")
    if "parity" in s:
        parity = steps["smoke"]["parity"]
        targets.append(f"| parity: JAX on {parity['jax_backend']} vs PyTorch on "
                       f"{parity['torch_device']}, float32 | {s['parity']} | all pass |")
    if targets:
        lines += ["| target or check | measured | target |", "|---|---:|---:|", *targets, ""]
    lines += ["| step | status | seconds | time box |", "|---|---|---:|---:|"]
    for name, step in steps.items():
        status = step["status"] + (f" ({step['error']})" if "error" in step else "")
        lines.append(f"| {name} | {status} | {step['seconds']:.1f} | "
                     f"{step.get('time_box', 0):.0f} |")
    lines.append("")
    cb = steps.get("jax_steps", {}).get("command_buffers")
    if cb:
        lines.append("XLA command buffers: " + "; ".join(
            f"{mode} {v['options'] or '(no option)'}: "
            + ("accepted" if v["rejected"] is None else "rejected: " + v["rejected"][:100])
            for mode, v in cb.items()))
        lines.append("")
    titles = {"jax_steps": "JAX train call", "torch_steps": "PyTorch step",
              "augment": "augmentation", "tutorial": "tutorial pipeline, one epoch"}
    for name, title in titles.items():
        groups = steps.get(name, {}).get("groups", {})
        ok = {label: g for label, g in groups.items() if "rows" in g}
        if ok:
            lines.append(benchmark.sections_markdown({title: ok}))
        lines += [f"{title}, {label}: {g['error']}" for label, g in groups.items()
                  if "error" in g]
    profile = steps.get("jax_steps", {}).get("profile")
    if profile and "error" in profile:
        lines += [f"profile: {profile['error']}", ""]
    elif profile:
        lines += [f"### profile: the engine's call of {profile['steps_per_call']} steps "
                  f"({profile['source']})", "",
                  f"{profile['wall_ms_per_step']:.3f} ms per step wall; busy "
                  f"{profile['busy_ms'] / profile['steps']:.3f} ms per step over a span of "
                  f"{profile['span_ms'] / profile['steps']:.3f} ms per step.", "",
                  "| event | calls | ms | ms per step |", "|---|---:|---:|---:|"]
        lines += [f"| `{t['name'][:80]}` | {t['calls']} | {t['ms']:.2f} | "
                  f"{t['ms'] / profile['steps']:.3f} |" for t in profile["top"]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
