"""Train the tutorial's CBAM CNN: `python scripts/train.py` (CIFAR-10, 50 epochs, batch 64).

Offline demo: `python scripts/train.py --dataset digits --epochs 3`.
"""
import argparse
import math
import os
import sys
from pathlib import Path

DEFAULT_RUN_DIR = "runs/CBAM_CNN_experiment"  # = cbam_jax.logbook.DEFAULT_RUN_DIR
MODELS = ("cbam_cnn", "cbam_resnet18", "cbam_resnet34", "cbam_resnet50")  # = resnet.MODEL_NAMES


def _checked(convert, ok, expected: str):
    """An argparse type: `convert` the text, then require `ok(value)`; errors say `expected`."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train the CBAM CNN of the tutorial (CIFAR-10 recipe) in JAX, with "
                    "TensorBoard logs, plots and checkpoints in the run directory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=positive_int, default=50, help="number of training epochs")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="training and evaluation batch size: the global batch, split evenly over "
                        "all devices of all processes (which must divide it)")
    p.add_argument("--lr", type=positive_float, default=1e-3,
                   help="initial Adam learning rate (halved by ReduceLROnPlateau on the test "
                        "loss after 4 epochs without improvement)")
    p.add_argument("--dataset", choices=("auto", "cifar10", "digits"), default="auto",
                   help="'cifar10'; 'digits' (scikit-learn's 8x8 digits at 32x32, offline); "
                        "'auto': CIFAR-10 when available, else digits")
    p.add_argument("--data-dir", default="./data",
                   help="where CIFAR-10 is looked for and downloaded (tfds data dir, or the "
                        "torchvision folder cifar-10-batches-py / its tarball)")
    p.add_argument("--no-download", action="store_true",
                   help="never download CIFAR-10; use only local copies")
    p.add_argument("--run-dir", default=None,
                   help=f"TensorBoard logs, plots, checkpoints and the .pth export (default: "
                        f"{DEFAULT_RUN_DIR}, or _1, _2, ... when it exists)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the initial weights, shuffling, augmentation and dropout")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                   help="continue a run from its latest checkpoint (default: the most recent "
                        f"{DEFAULT_RUN_DIR}[_N]); pass the same settings, e.g. a larger "
                        "--epochs")
    p.add_argument("--checkpoint-dir", default=None,
                   help="where checkpoints (latest/ and best/) go (default: RUN_DIR/checkpoints)")
    p.add_argument("--model", choices=MODELS, default="cbam_cnn",
                   help="the tutorial's CBAM CNN, or a CBAM-ResNet (CIFAR stem, official CBAM)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of the model; parameters, optimizer, loss and BatchNorm "
                        "statistics stay float32")
    p.add_argument("--steps-per-call", type=positive_int, default=None,
                   help="training steps per compiled call (default: 1 on CPU, where it is "
                        "fastest; 50 on GPU/TPU, to amortise dispatch)")
    p.add_argument("--log-every", type=positive_int, default=100,
                   help="batches between Train/Batch_* scalars and progress updates")
    p.add_argument("--hist-every", type=positive_int, default=500,
                   help="batches between weight and gradient histograms")
    p.add_argument("--devices", type=positive_int, default=None,
                   help="train data-parallel on the first N devices of each process "
                        "(default: all local GPUs/TPU chips; 1 on CPU)")
    p.add_argument("--distributed", action="store_true",
                   help="join a multi-process run whose coordinator and ranks JAX detects "
                        "(Cloud TPU pod slices, SLURM, Open MPI); elsewhere give the three "
                        "flags below")
    p.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="multi-process: address of process 0, the same for every process")
    p.add_argument("--num-processes", type=positive_int, default=None,
                   help="multi-process: how many processes (typically one per host)")
    p.add_argument("--process-id", type=non_negative_int, default=None,
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


def main(argv=None) -> int:
    args = parse_args(argv)
    # Heavy imports after parsing, so that --help and bad flags answer at once.
    import jax

    from cbam_jax import distributed
    try:  # before any other JAX call: a multi-process run must be joined first
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                               autodetect=args.distributed)
        mesh = distributed.make_mesh(args.devices)
        distributed.check_batch_size(args.batch_size, mesh)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_count() > 1 and not (args.run_dir or args.resume):
        print("error: a multi-process run needs --run-dir (or --resume RUN_DIR), the same path "
              "for every process", file=sys.stderr)
        return 2
    if not distributed.is_primary_process():  # the others would repeat process 0's report
        sys.stdout = open(os.devnull, "w")

    from cbam_jax.data import DatasetUnavailableError, load_dataset
    from cbam_jax.logbook import latest_run_dir, next_run_dir
    from cbam_jax.train import NonFiniteLossError, ResumeMismatchError, TrainConfig, fit

    if args.resume is not None:
        run_dir = Path(args.resume) if args.resume else latest_run_dir(DEFAULT_RUN_DIR)
        if run_dir is None or not run_dir.is_dir():
            print(f"error: --resume: no run directory {args.resume or DEFAULT_RUN_DIR}",
                  file=sys.stderr)
            return 2
    else:
        run_dir = Path(args.run_dir) if args.run_dir else next_run_dir(DEFAULT_RUN_DIR)
    print(f"Device: {jax.devices()[0]} ({jax.default_backend()})"
          + (f", data parallel over {mesh.size} devices in {jax.process_count()} process(es)"
             if mesh.size > 1 else ""))
    try:
        dataset = load_dataset(args.dataset, args.data_dir, download=not args.no_download)
    except DatasetUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                         learning_rate=args.lr, seed=args.seed, dtype=args.dtype,
                         steps_per_call=args.steps_per_call, log_every=args.log_every,
                         hist_every=args.hist_every, model=args.model)
    print(f"Run directory: {run_dir}  (tensorboard --logdir {run_dir.parent})")
    try:
        result = fit(config, dataset, run_dir, checkpoint_dir=args.checkpoint_dir,
                     resume=args.resume is not None, report_params=True, mesh=mesh)
    except (NonFiniteLossError, ResumeMismatchError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not distributed.is_primary_process():
        return 0  # process 0 reports and exports the model
    print(f"Training finished! Final test accuracy: {result.final_test_acc:.2f}%")
    if args.model == "cbam_cnn":  # the tutorial's CBAM_CNN is the one PyTorch model we mirror
        export_pth(result, run_dir / f"{dataset.name}_cbam_cnn_model.pth")
    return 0


def export_pth(result, path: Path):
    """The final model as a state_dict for the tutorial's CBAM_CNN, when torch is installed."""
    try:
        from parity import save_pth
    except ImportError:
        print("PyTorch is not installed: skipping the .pth export")
        return
    save_pth({"params": result.state.params, "batch_stats": result.state.batch_stats}, path)
    print(f"Model saved as a PyTorch state_dict: {path}")


if __name__ == "__main__":
    sys.exit(main())
