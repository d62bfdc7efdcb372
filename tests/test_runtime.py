"""cbam_jax.runtime: what a process sets before JAX starts. Each check runs in a fresh Python
process, since the settings are the process's own. Budget: a few seconds."""
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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}
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
