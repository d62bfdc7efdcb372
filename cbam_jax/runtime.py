"""Settings a process makes before JAX's first computation: how many devices a CPU host
shows, how XLA:CPU compiles and how the C allocator treats freed memory (`configure_cpu`),
and the persistent compilation cache (`enable_compile_cache`). The scripts call them first
thing; in a notebook, call them before anything else touches JAX (`import jax` alone is fine).
"""
import ctypes
import os
from pathlib import Path

import jax


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset or a scheduler)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_devices_for(batch_size: int, requested: int | None = None) -> int:
    """How many CPU devices to split a batch over: `requested`, else one per usable core,
    lowered to the largest count that divides `batch_size` (each device takes an equal share)."""
    if requested is not None:
        return requested
    return max(n for n in range(1, usable_cores() + 1) if batch_size % n == 0)


def cpu_devices_chosen_by_user() -> bool:
    """True when the environment already fixes the CPU device count (JAX_NUM_CPU_DEVICES, or
    XLA_FLAGS=--xla_force_host_platform_device_count=N): that choice is kept."""
    return ("JAX_NUM_CPU_DEVICES" in os.environ
            or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""))


# The XLA:CPU and allocator settings `configure_cpu` makes, by name. Each earned its place in a
# benchmark of this recipe (docs/benchmarks.md, "Design decisions");
# `scripts/benchmark.py --ablate NAME` measures one against its absence in alternating processes.
CPU_TUNINGS = ("eigen_convolutions", "memory_scheduler", "keep_freed_memory")


def configure_cpu(n: int, *, without: tuple[str, ...] = ()) -> bool:
    """Make a CPU host show `n` devices, and make the settings of CPU_TUNINGS but those named in
    `without` (below). Must run before JAX initialises its backends; returns False, changing no
    device count, if it is too late or if the environment already chose one
    (cpu_devices_chosen_by_user).

    Several devices split each batch; each runs its shard on its own threads, which keeps more
    cores busy than one device when an op runs single-threaded (docs/benchmarks.md).
    """
    unknown = set(without) - set(CPU_TUNINGS)
    if unknown:
        raise ValueError(f"without: expected names among {', '.join(CPU_TUNINGS)}, got "
                         f"{', '.join(sorted(unknown))}")
    if "keep_freed_memory" not in without:
        keep_freed_memory()
    if "eigen_convolutions" not in without:
        _add_xla_flag(EIGEN_CONVOLUTIONS)
    if "memory_scheduler" not in without:
        _add_xla_flag(MEMORY_SCHEDULER)
    if cpu_devices_chosen_by_user():
        return False
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already initialised (e.g. called twice in one process)
        return False
    if n > 1:
        _add_xla_flag(PATIENT_COLLECTIVES)
    return True


# XLA:CPU's default hands convolutions to YNNPACK, whose kernels run this model's convolutions
# on one thread (its kernel gradients 3x slower than XLA's own multi-threaded Eigen kernels);
# the '-' form removes only convolutions from the default list of YNNPACK fusions, keeping its
# dots and reductions, which are faster. The train step at batch 256 ran 1.21x as fast with it
# (docs/benchmarks.md, "Design decisions").
EIGEN_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# XLA:CPU's default schedule (breadth-first, "concurrency optimized") keeps more temporaries
# alive at once so that independent ops may overlap; the depth-first one needs less. With one
# device per core the overlap buys little, and the memory costs time: an execution's
# temporaries are one malloc, and one larger than glibc's thread heap (THREAD_HEAP_BYTES) is
# mapped and faulted in afresh on every call (keep_freed_memory cannot keep it). The train step
# at batch 256 (128 images per device) needs 80 MB breadth-first, 65 MB depth-first
# (tests/test_runtime.py), and ran 1.30x as fast (docs/benchmarks.md, "Design decisions").
MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
# XLA:CPU aborts the process when one device reaches an all-reduce more than 40 s before the
# others. On an overloaded host (two devices on two cores shared with other work) a device can
# lag that long without anything being wrong, and the run dies mid-epoch; wait up to 10 minutes
# instead (XLA still warns after 20 s that a device may be stuck).
PATIENT_COLLECTIVES = "--xla_cpu_collective_call_terminate_timeout_seconds=600"


def _add_xla_flag(flag: str) -> None:
    """Append `flag` to XLA_FLAGS (read when the CPU backend starts) unless the user set it."""
    flags = os.environ.get("XLA_FLAGS", "")
    if flag.split("=")[0] not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


# glibc's largest heap for a thread other than the main one (HEAP_MAX_SIZE on 64-bit): a block
# that does not fit gets an mmap of its own, unmapped again when freed.
THREAD_HEAP_BYTES = 64 << 20
# glibc's mallopt parameters (malloc.h) and the values keep_freed_memory sets (C ints).
M_TOP_PAD, M_MMAP_THRESHOLD = -2, -3
KEPT_MEMORY = {
    # Blocks below 1 GiB come from a heap, not a fresh mmap (this also stops glibc adapting
    # its thresholds to the sizes freed so far).
    M_MMAP_THRESHOLD: 1 << 30,
    # Trimming a heap keeps 64 MiB of free memory at its top, and a thread's heap that empties
    # is kept rather than unmapped.
    M_TOP_PAD: 1 << 26,
}
MALLOC_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                      "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation instead of returning it to
    the kernel (`KEPT_MEMORY`); returns whether it did. The process then keeps the memory of
    its peak allocation until it exits.

    Why: XLA:CPU allocates each execution's temporaries as one block on a thread of its own
    (for a train step on each of 2 devices, with XLA's default schedule: 22 MB at batch 64 and
    80 MB at batch 256; with `MEMORY_SCHEDULER`, 65 MB at 256) and frees it at the end. By default
    glibc serves a block of 32 MB or more, and one that overflows the thread's 64 MB heap, with
    a fresh mmap each time, and unmaps a thread heap that empties: then every execution maps
    its temporaries again and the kernel zeroes them page by page. The train step at batch 256
    ran 1.26x as fast with this setting (docs/benchmarks.md, "Design decisions"). A block
    larger than a thread heap (THREAD_HEAP_BYTES) still gets an mmap of its own:
    `MEMORY_SCHEDULER` keeps the train step's temporaries below it up to 128 images per device
    (tests/test_runtime.py). A process whose environment sets any of MALLOC_ENVIRONMENT keeps
    its own choice; elsewhere than glibc this does nothing.
    """
    if any(name in os.environ for name in MALLOC_ENVIRONMENT):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without the soname)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)  # a value out of range raises, not wraps
    return all([mallopt(param, value) == 1 for param, value in KEPT_MEMORY.items()])


def default_cache_dir() -> Path:
    """Per user: $XDG_CACHE_HOME/cbam_jax/jax, else ~/.cache/cbam_jax/jax."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cbam_jax" / "jax"


def enable_compile_cache(directory) -> Path:
    """Keep every compiled executable in `directory` (JAX's persistent compilation cache), so a
    second run of the same command loads its train step instead of compiling it again."""
    directory = Path(directory).expanduser().absolute()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # By default JAX skips executables that compile in under a second or are small: cache them
    # all, since the small ones (init's op-by-op compiles, evaluation) add up at start-up too.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return directory
