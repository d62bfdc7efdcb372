"""Data parallelism with `jax.sharding`: one mesh axis, 'data', over the devices of every host.

The model is small (1.15 M parameters), so the train state and the uint8 data set are
replicated on every device and only the global batch is split, along its first axis. Under
`jit`, GSPMD turns every mean over the batch (the loss, BatchNorm's statistics) into an
all-reduce over the mesh, so N devices compute what one device computes on the whole batch:
BatchNorm is synchronised without any code of its own, and results differ from one device only
by the order of float reductions.

Multi-host runs are SPMD: every process runs the same program on the same seed, so each one
draws the same permutation of the same data set, and its devices gather only their own rows of
each global batch. Every process must make the same jitted calls (they are collectives), and
orbax saves checkpoints collectively too; only the primary process writes logs and plots.
"""
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, autodetect: bool = False) -> None:
    """Join a multi-process run through `jax.distributed.initialize`; call before any JAX work.

    With no arguments and `autodetect`, JAX finds the coordinator and ranks itself (Cloud TPU
    pod slices, SLURM, Open MPI, ...). With neither, this is a single-process run: nothing to do.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if all(v is None for v in explicit) and not autodetect:
        return
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None \
            and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}) for {num_processes} "
                         f"processes, got {process_id}")
    if coordinator_address is not None and ":" not in coordinator_address:
        raise ValueError(f"coordinator_address must be HOST:PORT (e.g. 10.0.0.1:1234), "
                         f"got {coordinator_address!r}")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def is_primary_process() -> bool:
    """True in process 0, the one that writes logs, plots and prints the run's report."""
    return jax.process_index() == 0


def make_mesh(devices_per_process: int | None = None) -> Mesh:
    """A 1-D mesh, axis 'data', over the first `devices_per_process` devices of every process
    (default: all of them).

    The axis is `Auto` so that GSPMD propagates the batch sharding through the model; an
    `Explicit` axis (`jax.make_mesh`'s default in recent JAX) would make every reshape of a
    sharded batch, e.g. in max pooling, name its output sharding.
    """
    local = jax.local_device_count()
    n = local if devices_per_process is None else devices_per_process
    if not 1 <= n <= local:
        raise ValueError(f"devices per process must be between 1 and {local} (the "
                         f"{jax.default_backend()} devices of this host), got {n}")
    if n == local:  # let JAX order the devices for the interconnect (rings on TPU)
        return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                             axis_types=(AxisType.Auto,))
    devices = [d for p in range(jax.process_count())
               for d in [d for d in jax.devices() if d.process_index == p][:n]]
    return Mesh(np.array(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array: the train state, the data set, the permutation."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (batch) axis over the 'data' axis; the other axes stay whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def rows_sharding(mesh: Mesh) -> NamedSharding:
    """For a record of per-example values, [batches, batch_size]: split each row over the
    'data' axis as its batch was split (batch_sharding), so writing one needs no transfer."""
    return NamedSharding(mesh, P(None, DATA_AXIS))


def shard_batch(x: jax.Array, sharding: NamedSharding | None) -> jax.Array:
    """Inside `jit`: lay a batch gathered from replicated data out over the mesh, so that each
    device computes only its rows. `None` (no mesh) leaves it to the compiler.

    A batch whose size the device count does not divide (an epoch's final partial batch) is
    still correct: XLA pads the uneven shards and leaves the padding out of the reductions.
    """
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def put_replicated(tree, mesh: Mesh):
    """Place host values (or single-device arrays) on every device of the mesh.

    In a multi-process run each process passes its own copy, which must be identical (same
    seed, same data); each process fills only its own devices.
    """
    sharding = replicated(mesh)

    def put(x):
        # Anything not already laid out exactly so is placed again: an uncommitted array (fresh
        # from `init`), or one on a single device, which `is_equivalent_to` calls the same on a
        # 1-device mesh. jit outputs carry this sharding, and a first call that saw another one
        # would compile everything a second time.
        if isinstance(x, jax.Array) and x.committed and x.sharding == sharding:
            return x
        # Through host memory: JAX does not copy from one process's device to another host's.
        return jax.device_put(np.asarray(x), sharding)

    return jax.tree.map(put, tree)


def check_batch_size(batch_size: int, mesh: Mesh) -> int:
    """The per-device batch; a clear error when the device count does not divide the global
    batch (every device must take the same number of images each step)."""
    n = mesh.size
    if batch_size % n == 0:
        return batch_size // n
    processes = jax.process_count()
    hosts = f" ({processes} processes x {n // processes})" if processes > 1 else ""
    below, above = batch_size // n * n, (batch_size // n + 1) * n
    multiples = " or ".join(str(b) for b in (below, above) if b > 0)
    fits = [d for d in range(1, jax.local_device_count() + 1)
            if batch_size % (d * processes) == 0]
    fewer = (f", or {' or '.join(map(str, fits))} devices per process" if fits else "")
    raise ValueError(
        f"the global batch size {batch_size} is not divisible by the {n} devices{hosts}: "
        f"every device must take the same share of each batch. Use a batch size that is a "
        f"multiple of {n} (e.g. {multiples}){fewer}.")
