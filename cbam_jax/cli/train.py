"""Train the tutorial's CBAM CNN: `python scripts/train.py` (CIFAR-10, 50 epochs, batch 64).

Offline demo: `python scripts/train.py --dataset digits --epochs 3`. The recipe's settings,
defaults and checks come from `cbam_jax.recipe`; this file adds where data, logs and
checkpoints live, and how the devices are used.
"""
import argparse
import io
import os
import sys
from pathlib import Path

from cbam_jax import recipe  # the standard library only: --help and bad flags answer at once
from cbam_jax.cli import TRAIN_MODULES, command, error_exit, require
from cbam_jax.recipe import DEFAULT_RUN_DIR, NON_NEGATIVE_INT, POSITIVE_INT


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train the CBAM CNN of the tutorial (CIFAR-10 recipe) in JAX, with "
                    "TensorBoard logs, plots and checkpoints in the run directory.",
        epilog=recipe.DEBUG_HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    recipe.add_config_flags(p)
    p.add_argument("--dataset", choices=recipe.DATASETS, default="auto",
                   help="'cifar10'; 'digits' (scikit-learn's 8x8 digits at 32x32, offline); "
                        "'auto': CIFAR-10 when a local copy or the network has it, else digits "
                        "(a local copy that cannot be read is an error, not a fallback)")
    p.add_argument("--data-dir", default="./data",
                   help="where CIFAR-10 is looked for and downloaded (tfds data dir, or the "
                        "torchvision folder cifar-10-batches-py / its tarball)")
    p.add_argument("--no-download", action="store_true",
                   help="never download CIFAR-10; use only local copies")
    p.add_argument("--run-dir", default=None,
                   help=f"TensorBoard logs, plots, checkpoints and the .pth export (default: "
                        f"{DEFAULT_RUN_DIR}, or _1, _2, ... when it exists)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                   help="continue a run from its latest checkpoint (default: the most recent "
                        f"{DEFAULT_RUN_DIR}[_N]); pass the same settings, e.g. a larger "
                        "--epochs")
    p.add_argument("--checkpoint-dir", default=None,
                   help="where checkpoints (latest/ and best/) go (default: RUN_DIR/checkpoints)")
    p.add_argument("--devices", type=POSITIVE_INT.parse, default=None,
                   help="train data-parallel on the first N devices of each process (default: "
                        "all local GPUs/TPU chips; on a CPU host, one device per core)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache: a second run loads the compiled "
                        "steps from here instead of compiling them again (default: "
                        "$XDG_CACHE_HOME/cbam_jax/jax or ~/.cache/cbam_jax/jax)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="compile everything afresh and keep nothing on disk")
    p.add_argument("--distributed", action="store_true",
                   help="join a multi-process run whose coordinator and ranks JAX detects "
                        "(Cloud TPU pod slices, SLURM, Open MPI); elsewhere give the three "
                        "flags below")
    p.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="multi-process: address of process 0, the same for every process")
    p.add_argument("--num-processes", type=POSITIVE_INT.parse, default=None,
                   help="multi-process: how many processes (typically one per host)")
    p.add_argument("--process-id", type=NON_NEGATIVE_INT.parse, default=None,
                   help="multi-process: this process's rank, 0 .. num-processes - 1; process 0 "
                        "writes the logs, plots and .pth export")
    args = p.parse_args(argv)
    cluster = (args.coordinator_address, args.num_processes, args.process_id)
    if any(v is not None for v in cluster) and None in cluster and not args.distributed:
        p.error("--coordinator-address, --num-processes and --process-id go together "
                "(or add --distributed to let JAX detect the missing ones)")
    if None not in cluster[1:] and args.process_id >= args.num_processes:
        p.error(f"--process-id must be below --num-processes ({args.num_processes}), "
                f"got {args.process_id}")
    if args.resume is not None and args.run_dir is not None:
        p.error("--resume RUN_DIR names the run directory; do not also pass --run-dir")
    return args


def run_dir_of(args) -> Path | None:
    """The run directory: --resume's (default the latest run), --run-dir, or the next free one."""
    from cbam_jax.logbook import latest_run_dir, next_run_dir

    if args.resume is not None:
        run_dir = Path(args.resume) if args.resume else latest_run_dir(DEFAULT_RUN_DIR)
        return run_dir if run_dir is not None and run_dir.is_dir() else None
    return Path(args.run_dir) if args.run_dir else next_run_dir(DEFAULT_RUN_DIR)


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    config = recipe.config_from_args(args)
    require(*TRAIN_MODULES)  # before any work: a missing one names the extra in one line
    # Before JAX's first computation: CPU devices (one per core) and the compilation cache.
    from cbam_jax import runtime

    cpu_devices_set = runtime.configure_cpu(
        runtime.cpu_devices_for(config.batch_size, args.devices))
    cache = None if args.no_compile_cache else runtime.enable_compile_cache(
        args.compile_cache or runtime.default_cache_dir())

    import jax

    from cbam_jax import distributed
    try:  # before any other JAX call: a multi-process run must be joined first
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                               autodetect=args.distributed)
        mesh = distributed.make_mesh(args.devices)
        distributed.check_batch_size(config.batch_size, mesh)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_count() > 1 and not (args.run_dir or args.resume):
        print("error: a multi-process run needs --run-dir (or --resume RUN_DIR), the same path "
              "for every process", file=sys.stderr)
        return 2
    if not distributed.is_primary_process():  # the others would repeat process 0's report
        sys.stdout = open(os.devnull, "w")

    run_dir = run_dir_of(args)
    if run_dir is None:
        print(f"error: --resume: no run directory {args.resume or DEFAULT_RUN_DIR}",
              file=sys.stderr)
        return 2
    print(_device_line(jax, mesh, cpu_devices_set))
    print(f"Compile cache: {cache} (--no-compile-cache to turn off)" if cache
          else "Compile cache: off")

    from cbam_jax.checkpoint import DamagedCheckpointError
    from cbam_jax.data import DatasetUnavailableError, load_dataset
    from cbam_jax.train import NonFiniteLossError, ResumeMismatchError, fit
    try:
        dataset = load_dataset(args.dataset, args.data_dir, download=not args.no_download)
    except DatasetUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Run directory: {run_dir}  (tensorboard --logdir {run_dir.parent})")
    try:
        result = fit(config, dataset, run_dir, checkpoint_dir=args.checkpoint_dir,
                     resume=args.resume is not None, mesh=mesh)
    # OSError: train.StorageError (a full disk, a permission denied), a run directory that
    # cannot be created, ...
    except (NonFiniteLossError, ResumeMismatchError, DamagedCheckpointError, OSError) as e:
        return error_exit(e)
    if not distributed.is_primary_process():
        return 0  # process 0 reports and exports the model
    print(f"Training finished! Final test accuracy: {result.final_test_acc:.2f}%")
    if config.model == "cbam_cnn":  # the tutorial's CBAM_CNN is the one PyTorch model we mirror
        try:
            export_pth(result, run_dir / f"{dataset.name}_cbam_cnn_model.pth")
        except OSError as e:
            return error_exit(e)
    return 0


def _device_line(jax, mesh, cpu_devices_set: bool) -> str:
    from cbam_jax.runtime import usable_cores

    line = f"Device: {jax.devices()[0]} ({jax.default_backend()})"
    if jax.default_backend() == "cpu" and cpu_devices_set:
        line += (f", {mesh.size} host device(s) for {usable_cores()} usable core(s): each batch "
                 f"is split over them (--devices N to choose); convolutions on XLA's Eigen "
                 f"kernels")
    elif mesh.size > 1:
        line += f", data parallel over {mesh.size} devices in {jax.process_count()} process(es)"
    return line


def export_pth(result, path: Path):
    """The final model as a state_dict for the tutorial's CBAM_CNN, when torch is installed."""
    try:
        from parity import save_pth
    except ImportError:
        print("PyTorch is not installed: skipping the .pth export")
        return
    # Serialised in memory: torch's own writer turns a full disk into an anonymous RuntimeError,
    # Python's file says what failed.
    data = io.BytesIO()
    save_pth({"params": result.state.params, "batch_stats": result.state.batch_stats}, data)
    tmp = path.with_name(path.name + ".tmp")  # whole or not at all: a kill leaves no cut-off file
    try:
        tmp.write_bytes(data.getvalue())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write the model: {e.strerror}", str(path)) from e
    os.replace(tmp, path)
    print(f"Model saved as a PyTorch state_dict: {path}")


if __name__ == "__main__":
    sys.exit(main())
