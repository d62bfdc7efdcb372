"""One JAX compilation cache for the whole pytest run and every process it starts.

A temporary directory, made when pytest loads this file (before any test module imports JAX),
is set in the environment as JAX's persistent cache with no minimum compile time or entry size.
JAX reads these variables when it is imported, so this process and every subprocess that
inherits the environment (the scripts' runs, the GPU check's tiny mode) load what an earlier one
compiled instead of compiling it again. A command given its own `--compile-cache DIR` still
uses DIR. With pytest-xdist (`make test` runs the fast tier on 2 workers), the workers inherit
the directory the controlling process made and share it. The directory is removed when the
process that made it finishes.
"""
import os
import shutil
import sys
import tempfile

# Set by the process that made the directory, so that xdist's workers reuse it.
OWN_CACHE = "CBAM_JAX_TEST_COMPILATION_CACHE"
INHERITED = os.environ.get(OWN_CACHE) if "PYTEST_XDIST_WORKER" in os.environ else None
COMPILATION_CACHE = {
    "JAX_COMPILATION_CACHE_DIR": INHERITED or tempfile.mkdtemp(prefix="cbam_jax_test_cache_"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}
os.environ.update(COMPILATION_CACHE)
os.environ[OWN_CACHE] = COMPILATION_CACHE["JAX_COMPILATION_CACHE_DIR"]
if "jax" in sys.modules:  # a plugin imported JAX first: it read the variables without these
    import jax

    jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
    if INHERITED:
        return  # the controlling process made it and removes it
    shutil.rmtree(COMPILATION_CACHE["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

# For a subprocess run whose test checks control flow (what a command reads, prints, writes,
# refuses or compiles), not numbers: XLA skips most optimisations, so a cold compile is shorter.
# Numeric tests keep full optimisation.
CONTROL_FLOW_ONLY = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}

# The flags of the digits runs of scripts/train.py that tests/test_checkpoint.py and
# tests/test_inference.py read (with --epochs): one set of compiled steps for all of them.
DIGITS_RUN = ["--dataset", "digits", "--batch-size", "64", "--devices", "1", "--log-every",
              "1000", "--hist-every", "1000"]


# The two longest fixtures: a chain of 13 processes killed in turn, and the GPU check's steps
# each in its own process. They go out first, one to each worker, so that neither ends the run.
LONGEST_FIRST = ("test_kill.py", "test_gpu_check.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the other files with slow tests, then the rest: a run on
    several xdist workers (`--dist loadfile --no-loadscope-reorder` hands out whole files in
    collection order; without the second flag, the files with the most tests go first) starts
    the long files early and ends on short ones. Within a file the order is unchanged."""
    has_slow = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item):
        if item.path.name in LONGEST_FIRST:
            return LONGEST_FIRST.index(item.path.name)
        return len(LONGEST_FIRST) + (item.path not in has_slow)
    items.sort(key=rank)
