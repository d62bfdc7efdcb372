"""cbam_jax.runtime: what a process sets before JAX starts. Each check runs in a fresh Python
process, since the settings are the process's own. Budget: about a minute."""
import os
import subprocess
import sys

import pytest

# On a thread of its own, as XLA:CPU allocates an execution's temporaries (malloc), allocates,
# writes and frees a 40 MB block 20 times after 2 warm-up rounds, and prints the page faults of
# those 20 (ru_minflt), after `keep_freed_memory()` or not.
FAULTS = """
import ctypes, resource, sys, threading
from cbam_jax import runtime
kept = runtime.keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def allocate(size=40 << 20):
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
faults = []
def work():
    allocate(); allocate()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        allocate()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start(); thread.join()
print(kept, faults[0])
"""


def _run(script, *args, **environment):
    """Runs `script` in a fresh process, without the malloc settings or the CPU device count of
    this process's environment, plus `environment`; returns its output's words."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MALLOC_", "GLIBC_")) and k != "JAX_NUM_CPU_DEVICES"}
    env.update(environment)
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return out


def test_freed_memory_is_reused_instead_of_faulted_in_again():
    """By default glibc serves a block of 32 MB or more with a fresh mmap each time (10k page
    faults per 40 MB allocation, the control); after keep_freed_memory the thread's heap keeps
    the block for the next allocation. (The project runs on Linux with glibc; elsewhere
    keep_freed_memory returns False and this fails.)"""
    kept, kept_faults = _run(FAULTS, "keep")
    _, default_faults = _run(FAULTS, "default")
    assert kept == "True"
    assert int(default_faults) > 20 * 9_000  # the control: every allocation faults its pages
    assert int(kept_faults) < 1_000


def test_the_environments_own_malloc_settings_are_kept():
    kept, _ = _run(FAULTS, "keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert kept == "False"


# With the flags `configure_cpu` sets (2 devices), compiles CBAMCNN's one-step train call
# (train_batches) for each BATCH argument and prints the bytes of its temporaries per device.
TEMPORARIES = """
import sys
import jax, numpy as np
from cbam_jax import runtime
runtime.configure_cpu(2)
from cbam_jax import distributed, train
from cbam_jax.data import Dataset
from cbam_jax.loader import place_data
mesh = distributed.make_mesh()
assert mesh.size == 2, mesh
model, tx = train.build("float32")
state = train.create_train_state(model, tx, jax.random.PRNGKey(0), 1e-3)
state = distributed.put_replicated(state, mesh)
for arg in sys.argv[1:]:
    batch = int(arg)
    images = np.zeros((batch, 32, 32, 3), np.uint8)
    labels = np.zeros(batch, np.int32)
    data = place_data(Dataset("zeros", "zeros", images, labels, images, labels,
                              tuple("0123456789")), mesh, batch)
    record = distributed.put_replicated(
        train.new_epoch_record(state.rng, np.int32(0), batch, 1), mesh)
    call = train.train_batches.lower(state, record, data, np.int32(0), np.int32(1),
                                     shape=train.call_shape(batch, 1))
    print(call.compile().memory_analysis().temp_size_in_bytes)
"""


@pytest.mark.slow
def test_the_train_calls_temporaries_fit_a_thread_heap():
    """Past runtime.THREAD_HEAP_BYTES a call's temporaries are mapped and faulted in afresh on
    every call (see keep_freed_memory). With configure_cpu's MEMORY_SCHEDULER, the engine's
    one-step call on 2 devices fits at 64 and at 128 images per device (batch 128 and 256). The
    control: 128 images per device under XLA's default schedule do not fit (why configure_cpu
    sets the flag; a flag the environment sets is kept). Budget: about a minute."""
    from cbam_jax.runtime import THREAD_HEAP_BYTES as heap
    small, large = map(int, _run(TEMPORARIES, "128", "256", XLA_FLAGS=""))
    [default_schedule] = map(int, _run(
        TEMPORARIES, "256", XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=true"))
    assert small < large < heap
    assert default_schedule > heap


def test_the_cpu_engine_takes_one_step_per_call():
    """On CPU (these tests' backend) a train call is one step, with no loop: a rolled loop is
    slow on XLA:CPU and 2 steps unrolled in one call measured no faster."""
    import jax

    from cbam_jax import train
    assert jax.default_backend() == "cpu" and train.default_steps_per_call() == 1
    plan = train.epoch_plan(50_000, 64, hist_every=500)
    assert len(plan) == 782 and not any(call.shape.looped for call in plan)


WITHOUT = """
import os, sys
from cbam_jax import runtime
without = tuple(filter(None, sys.argv[1].split(",")))
try:
    runtime.configure_cpu(1, without=without)
except ValueError as e:
    print("refused", e)
else:
    print(os.environ.get("XLA_FLAGS", ""))
"""


def test_each_cpu_setting_can_be_left_out_by_name():
    """How scripts/benchmark.py --ablate measures a setting against its absence; an unknown
    name is refused rather than ignored."""
    flags = " ".join(_run(WITHOUT, "", XLA_FLAGS=""))
    assert "ynn_fusion_type" in flags and "concurrency_optimized_scheduler" in flags
    flags = " ".join(_run(WITHOUT, "eigen_convolutions,memory_scheduler", XLA_FLAGS=""))
    assert "ynn_fusion_type" not in flags and "concurrency_optimized_scheduler" not in flags
    assert _run(WITHOUT, "fast_math", XLA_FLAGS="")[0] == "refused"
