"""Train the tutorial's CBAM CNN: `python scripts/train.py` (CIFAR-10, 50 epochs, batch 64).

Offline demo: `python scripts/train.py --dataset digits --epochs 3`. The recipe's settings,
defaults and checks come from `cbam_jax.recipe`; this file adds where data, logs and
checkpoints live, and how the devices are used.
"""
import argparse
import contextlib
import dataclasses
import io
import os
import sys
from pathlib import Path

# The standard library only: --help and bad flags answer at once.
from cbam_jax import recipe, rundir
from cbam_jax.cli import TRAIN_MODULES, command, error_exit, require
from cbam_jax.recipe import DEFAULT_DATA_DIR, DEFAULT_RUN_DIR, NON_NEGATIVE_INT, POSITIVE_INT
from cbam_jax.registry import DEFAULT_IMAGE_SIZE, check_image_size
from cbam_jax.rundir import RunDirError


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, and `given`: the names of those on the command line (a resume takes the
    others from its run record)."""
    p = argparse.ArgumentParser(
        description="Train the CBAM CNN of the tutorial (CIFAR-10 recipe) in JAX, with "
                    "TensorBoard logs, plots and checkpoints in the run directory.",
        epilog=recipe.DEBUG_HELP)
    recipe.add_config_flags(p)
    p.add_argument("--dataset", choices=recipe.DATASETS, default="auto",
                   help="'cifar10'; 'digits' (scikit-learn's 8x8 digits at 32x32, offline); "
                        "'folder': your own images in --data-dir, DIR/train/<class>/* and "
                        "DIR/test/<class>/* (or val/, validation/; without one, 20%% of each "
                        "class is held out); 'auto': CIFAR-10 when a local copy or the network "
                        "has it, else digits (a local copy that cannot be read is an error, not "
                        "a fallback) (default: %(default)s)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="where CIFAR-10 is looked for and downloaded (tfds data dir, or the "
                        "torchvision folder cifar-10-batches-py / its tarball); with --dataset "
                        "folder, the folder of your images (default: %(default)s)")
    p.add_argument("--image-size", type=POSITIVE_INT.parse, default=DEFAULT_IMAGE_SIZE,
                   help="with --dataset folder: the side every image is resized to, once, "
                        "and cached next to the data (default: %(default)s, the recipe's)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="with --dataset folder: leave out the files that cannot be read as "
                        "images, and count them (default: list them all in one error)")
    p.add_argument("--no-download", action="store_true",
                   help="never download CIFAR-10; use only local copies")
    p.add_argument("--run-dir", default=None,
                   help=f"TensorBoard logs, plots, checkpoints and the .pth export; a new or "
                        f"empty directory (default: a new {DEFAULT_RUN_DIR}, or _1, _2, ... "
                        f"when taken)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run in --run-dir first (the whole directory, if its "
                        f"{recipe.RUN_RECORD} shows it is a run directory)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                   help=f"continue a run from its latest checkpoint, with the settings its "
                        f"{recipe.RUN_RECORD} records (RUN_DIR default: the most recent "
                        f"{DEFAULT_RUN_DIR}[_N]); a flag that would change the result is "
                        f"refused, a larger --epochs trains it further")
    p.add_argument("--allow-device-change", action="store_true",
                   help="with --resume: continue on another number of devices than the run "
                        "recorded (the results then differ in their last bits)")
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
    if args.resume is not None and (args.run_dir is not None or args.overwrite):
        p.error("--resume RUN_DIR names the run directory and keeps its run; do not also pass "
                "--run-dir or --overwrite")
    if args.overwrite and args.run_dir is None:
        p.error("--overwrite needs --run-dir (a default run directory is always a new one)")
    if args.allow_device_change and args.resume is None:
        p.error("--allow-device-change goes with --resume")
    if (args.dataset != "folder" and args.resume is None
            and args.image_size != DEFAULT_IMAGE_SIZE):
        p.error(f"--image-size is for --dataset folder: {args.dataset} images are "
                f"{DEFAULT_IMAGE_SIZE}x{DEFAULT_IMAGE_SIZE}")
    # Parsed again into a namespace that already has every name, argparse fills in no default:
    # the names whose value changed are the flags that were given.
    unset = object()
    again = vars(p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset))))
    args.given = frozenset(name for name, value in again.items() if value is not unset)
    return args


@dataclasses.dataclass(frozen=True)
class Resumed:
    """The run a --resume continues: its directory and its run record (None: a run from
    before run.json existed, checked against its checkpoint's record instead)."""
    run_dir: Path
    record: dict | None


def take_recorded_settings(args) -> Resumed:
    """For --resume: the run directory, and every setting its record keeps that no flag gives
    (`rundir.recorded_settings`); `--dataset auto` means the recorded data set, and
    `--allow-device-change` without `--devices` this machine's default device count."""
    run_dir = Path(args.resume) if args.resume else rundir.latest(DEFAULT_RUN_DIR)
    if run_dir is None or not run_dir.is_dir():
        raise RunDirError(f"--resume: no run directory {args.resume or DEFAULT_RUN_DIR}")
    record = rundir.read_record(run_dir)
    for name, value in (rundir.recorded_settings(record) if record else {}).items():
        if name in args.given and not (name == "dataset" and args.dataset == "auto"):
            continue
        if name == "devices" and args.allow_device_change:
            continue
        setattr(args, name, value)
    return Resumed(run_dir, record)


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    require(*TRAIN_MODULES)  # before any work: a missing one names the extra in one line
    try:
        resumed = take_recorded_settings(args) if args.resume is not None else None
        config = recipe.config_from_args(args)
        check_image_size(config.model, args.image_size)  # before JAX starts or data is read
        mesh, cache, cpu_devices_set = start_jax(args, config, resumed)
        if resumed is not None and resumed.record is not None:  # before the data is loaded
            rundir.check_resume(resumed.record, {
                **dataclasses.asdict(config), "dataset": args.dataset, "devices": mesh.size,
                "checkpoint_dir": args.checkpoint_dir, "image_size": args.image_size,
                "skip_unreadable": args.skip_unreadable},
                resumed.run_dir, allow_device_change=args.allow_device_change)
        run_dir, owner = claim_run_dir(args, resumed)
    except ValueError as e:  # RunDirError, a bad recorded setting, a mesh that cannot be built
        return error_exit(e, 2)
    with owner:  # the run directory is this run's until it returns, or the process ends
        return run(args, config, run_dir, resumed is not None, mesh, cache, cpu_devices_set)


def start_jax(args, config, resumed: Resumed | None):
    """The device mesh, after the settings JAX must have before it starts: the CPU device count
    and the compilation cache; a multi-process run is joined first. Returns (mesh, the cache
    directory or None, whether the CPU device count was set here)."""
    from cbam_jax import runtime

    cpu_devices_set = runtime.configure_cpu(
        runtime.cpu_devices_for(config.batch_size, args.devices))
    cache = None if args.no_compile_cache else runtime.enable_compile_cache(
        args.compile_cache or runtime.default_cache_dir())

    import jax

    from cbam_jax import distributed
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                           autodetect=args.distributed)
    try:
        mesh = distributed.make_mesh(args.devices)
    except ValueError as e:
        if resumed is None or "devices" in args.given:
            raise
        raise ValueError(f"{e} (the run recorded --devices {args.devices}; "
                         f"--allow-device-change continues on this machine's)") from None
    distributed.check_batch_size(config.batch_size, mesh)
    if jax.process_count() > 1 and not (args.run_dir or args.resume):
        raise ValueError("a multi-process run needs --run-dir (or --resume RUN_DIR), the same "
                         "path for every process")
    if not distributed.is_primary_process():  # the others would repeat process 0's report
        sys.stdout = open(os.devnull, "w")
    return mesh, cache, cpu_devices_set


def claim_run_dir(args, resumed: Resumed | None):
    """(the run directory, what holds it). Process 0 takes it (`rundir.claim`: creates,
    replaces or locks it); the other processes of a multi-process run touch nothing there, but
    learn whether process 0 could, so that none starts training alone."""
    import jax

    from cbam_jax import distributed
    if resumed is not None:
        run_dir = resumed.run_dir
    else:  # None: a new default directory, which process 0 creates
        run_dir = Path(args.run_dir) if args.run_dir else None
    owner, refusal = contextlib.nullcontext(), None
    if distributed.is_primary_process():
        try:
            owner = rundir.claim(run_dir, resume=resumed is not None, overwrite=args.overwrite,
                                 checkpoint_dir=args.checkpoint_dir)
            run_dir = owner.run_dir
        except RunDirError as e:
            refusal = e
    if jax.process_count() > 1 and _told_by_process_0(refusal is not None):
        refusal = refusal or RunDirError(f"process 0 could not take {run_dir} (its message "
                                         f"says why)")
    if refusal is not None:
        raise refusal
    return run_dir, owner


def _told_by_process_0(flag: bool) -> bool:
    """Process 0's `flag`, on every process (a collective: every process calls it)."""
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.bool_(flag)))


def run(args, config, run_dir: Path, resume: bool, mesh, cache, cpu_devices_set) -> int:
    """Load the data set, `fit`, export the .pth: the run itself, in a directory it owns."""
    import jax

    from cbam_jax import distributed
    print(_device_line(jax, mesh, cpu_devices_set))
    print(f"Compile cache: {cache} (--no-compile-cache to turn off)" if cache
          else "Compile cache: off")

    from cbam_jax.checkpoint import DamagedCheckpointError
    from cbam_jax.data import DatasetUnavailableError, load_dataset
    from cbam_jax.train import NonFiniteLossError, fit
    try:
        dataset = load_dataset(args.dataset, args.data_dir, download=not args.no_download,
                               image_size=args.image_size,
                               skip_unreadable=args.skip_unreadable)
    except DatasetUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Run directory: {run_dir}  (tensorboard --logdir {run_dir.parent})")
    try:
        result = fit(config, dataset, run_dir, checkpoint_dir=args.checkpoint_dir,
                     resume=resume, mesh=mesh, data_dir=args.data_dir,
                     allow_device_change=args.allow_device_change)
    # OSError: train.StorageError (a full disk, a permission denied), a run directory that
    # cannot be created, ...
    except RunDirError as e:  # refused as the checks before the run are: exit status 2
        return error_exit(e, 2)
    except (NonFiniteLossError, DamagedCheckpointError, OSError, MemoryError) as e:
        return error_exit(e)
    if not distributed.is_primary_process():
        return 0  # process 0 reports and exports the model
    print(f"Training finished! Final test accuracy: {result.final_test_acc:.2f}%")
    # The only model with a PyTorch twin, the tutorial's CBAM_CNN: 10 classes, 32x32 images.
    tutorial_shaped = len(dataset.class_names) == 10 and dataset.image_size == 32
    if config.model == "cbam_cnn" and not tutorial_shaped:
        print(f"No .pth export: the tutorial's CBAM_CNN takes 10 classes at 32x32, this model "
              f"{len(dataset.class_names)} at {dataset.image_size}x{dataset.image_size}")
    elif config.model == "cbam_cnn":
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
