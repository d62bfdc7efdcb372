"""cbam_jax.runtime: what a process sets before JAX starts. Each check runs in a fresh Python
process, since the settings are the process's own. Budget: about a minute."""
import os
import subprocess
import sys

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


# With the flags `configure_cpu` sets (2 devices), compiles CBAMCNN's train call (train_batches)
# for each BATCHxSTEPS argument and prints the bytes of its temporaries per device.
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
    batch, steps = map(int, arg.split("x"))
    images = np.zeros((batch, 32, 32, 3), np.uint8)
    labels = np.zeros(batch, np.int32)
    data = place_data(Dataset("zeros", "zeros", images, labels, images, labels,
                              tuple("0123456789")), mesh, batch)
    record = distributed.put_replicated(
        train.new_epoch_record(state.rng, np.int32(0), batch, 1), mesh)
    call = train.train_batches.lower(state, record, data, np.int32(0), np.int32(steps),
                                     shape=train.call_shape(batch, steps, rolled=False))
    print(call.compile().memory_analysis().temp_size_in_bytes)
"""


def test_the_train_calls_temporaries_fit_a_thread_heap():
    """Past runtime.THREAD_HEAP_BYTES a call's temporaries are mapped and faulted in afresh on
    every call (see keep_freed_memory). With configure_cpu's MEMORY_SCHEDULER, the engine's
    default calls on 2 devices fit: 2 steps on 64 images per device, 1 step on 128
    (train.default_steps_per_call). The controls: 2 steps on 128 images per device do not fit
    (why the engine then takes 1), nor does 1 step under XLA's default schedule (why
    configure_cpu sets the flag; a flag the environment sets is kept). Budget: about a minute."""
    from cbam_jax.runtime import THREAD_HEAP_BYTES as heap
    small_two, large_one, large_two = map(int, _run(TEMPORARIES, "128x2", "256x1", "256x2",
                                                     XLA_FLAGS=""))
    [default_schedule] = map(int, _run(
        TEMPORARIES, "256x1",
        XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=true"))
    assert small_two < heap and large_one < heap
    assert large_two > heap and default_schedule > heap


def test_steps_per_call_follow_a_devices_share_of_the_batch():
    """On CPU (these tests' backend): 2 unrolled steps per call up to 64 images per device."""
    import jax

    from cbam_jax import train
    assert jax.default_backend() == "cpu"
    assert [train.default_steps_per_call(n) for n in (8, 32, 64, 65, 128)] == [2, 2, 2, 1, 1]
