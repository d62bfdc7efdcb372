"""Evaluate a checkpoint on the test split of its data set: `python scripts/evaluate.py CHECKPOINT`.

Prints the test loss, top-1 accuracy, per-class accuracy and the confusion matrix, and writes
confusion_matrix.png and evaluation.json (into the run directory unless --out-dir says
otherwise). CHECKPOINT is a run directory (its checkpoints/best, or --which latest),
a checkpoints/ or best/ or latest/ directory, one orbax step directory, or a tutorial .pth
(with torch installed).

The loss and accuracy are computed as the run computed them after each epoch
(`cbam_jax.train.evaluate`, the run's batch size, as many devices as the run used), so for an
orbax checkpoint they equal, bit for bit, the test metrics the run logged for its epoch.
"""
import argparse
import json
import sys
from pathlib import Path

from cbam_jax import recipe
from cbam_jax.cli import (check_out_dir, checkpoint_modules, command, error_exit,
                          note_if_unverified, require)
from cbam_jax.recipe import DEFAULT_DATA_DIR, POSITIVE_INT


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Evaluate a trained CBAM model on the test split of its data set: loss, "
                    "accuracy, per-class accuracy, confusion matrix. A checkpoint is checked "
                    "against its SHA256SUMS first: a damaged one is refused (--which picks the "
                    "other of best/latest).",
        epilog=recipe.DEBUG_HELP)
    recipe.add_checkpoint_flags(p)
    p.add_argument("--data-dir", default=None,
                   help=f"where CIFAR-10 is looked for, as in scripts/train.py (default: the "
                        f"directory the run read it from, which its {recipe.RUN_RECORD} records; "
                        f"else {DEFAULT_DATA_DIR})")
    p.add_argument("--no-download", action="store_true",
                   help="never download CIFAR-10; use only local copies")
    p.add_argument("--devices", type=POSITIVE_INT.parse, default=None,
                   help="split each batch over N devices (default: as many as the run did, "
                        "which reproduces its test loss exactly)")
    p.add_argument("--out-dir", default=None,
                   help="where confusion_matrix.png and evaluation.json go (default: the run "
                        "directory, or the current one)")
    return p.parse_args(argv)


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.out_dir is not None:
        check_out_dir(args.out_dir, "--out-dir")
    require(*checkpoint_modules(args.checkpoint), "sklearn", "matplotlib")
    from cbam_jax import runtime
    from cbam_jax.inference import read_run_record

    # Before JAX starts: as many devices as the run used. Why the loss is then bit-equal: the
    # run's test loss is the mean of per-batch mean losses, each batch evaluated by the compiled
    # eval call in eval mode (running statistics, no randomness) with its rows split over the
    # devices, then `train.batch_metrics` sums each batch's losses: each device its own rows,
    # then the devices' sums are added. The same
    # restored weights, batch size, device count and `train.evaluate` repeat exactly those
    # float32 operations in the same order. On another device count the partial sums group
    # differently and the last bits may change (on a digits run 1 and 2 devices happened to
    # agree); the accuracy, a count, is exact on any.
    try:
        record = read_run_record(args.checkpoint) or {}
    except ValueError as e:  # a run.json that is not a run record
        print(f"error: {e}", file=sys.stderr)
        return 1
    batch_size = record.get("config", {}).get("batch_size", recipe.TrainConfig().batch_size)
    devices = args.devices or record.get("devices") or runtime.cpu_devices_for(batch_size)
    runtime.configure_cpu(devices)  # a CPU host; the same default as scripts/train.py

    import jax

    from cbam_jax import distributed
    from cbam_jax.data import DatasetUnavailableError, load_dataset
    from cbam_jax.inference import find_run_dir, predict
    from cbam_jax.loader import place_data
    from cbam_jax.logbook import plot_confusion_matrix
    from cbam_jax.train import evaluate
    try:  # parity (with torch) also reads a tutorial .pth
        from parity import load_checkpoint
    except ImportError:
        from cbam_jax.inference import load_checkpoint

    mesh = distributed.make_mesh(min(devices, jax.local_device_count()))
    try:
        trained = load_checkpoint(args.checkpoint, which=args.which, dataset=args.dataset,
                                  mesh=mesh)
        data_dir = args.data_dir or record.get("data_dir") or DEFAULT_DATA_DIR
        dataset = load_dataset(trained.dataset, data_dir, download=not args.no_download,
                               log=lambda *_: None, image_size=trained.image_size,
                               skip_unreadable=bool((trained.data or {}).get(
                                   "skip_unreadable")))  # as the run read its folder
        if dataset.class_names != trained.class_names:
            raise ValueError(f"{data_dir} now holds the classes {', '.join(dataset.class_names)}"
                             f"; the model was trained on {', '.join(trained.class_names)}")
        data = place_data(dataset, mesh, trained.config.batch_size)
    except (FileNotFoundError, ValueError, DatasetUnavailableError) as e:  # ValueError: also
        return error_exit(e)  # a damaged checkpoint (checkpoint.DamagedCheckpointError)
    note_if_unverified(trained)
    if trained.devices is not None and trained.devices != mesh.size:
        print(f"note: the run split each batch over {trained.devices} devices, this evaluation "
              f"over {mesh.size}: the loss may differ in its last digits", file=sys.stderr)

    test_loss, test_acc = evaluate(trained.state, data)
    predicted = predict(trained.state, dataset.test_images, top_k=1,
                        batch_size=trained.config.batch_size).classes[:, 0]
    report = measurements(trained, dataset, test_loss, test_acc, predicted, mesh.size)
    print_report(report)

    out_dir = Path(args.out_dir or find_run_dir(trained.source) or ".")
    which = f"epoch {trained.epoch}" if trained.epoch else trained.source.name
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "evaluation.json"
        path.write_text(json.dumps(report, indent=1) + "\n")
        path = out_dir / "confusion_matrix.png"
        plot_confusion_matrix(report["confusion_matrix"], dataset.class_names,
                              f"{trained.config.model} ({which}) on the {dataset.name} test "
                              f"split: accuracy {test_acc:.2f}%", path)
    except OSError as e:  # a full disk, a permission denied: name the file
        return error_exit(OSError(e.errno, e.strerror or str(e), str(e.filename or path)))
    print(f"Wrote {out_dir / 'evaluation.json'} and {out_dir / 'confusion_matrix.png'}")
    return 0


def measurements(trained, dataset, test_loss, test_acc, predicted, devices) -> dict:
    """Everything the evaluation measured, as JSON-ready data."""
    from sklearn.metrics import confusion_matrix

    names = dataset.class_names
    matrix = confusion_matrix(dataset.test_labels, predicted, labels=range(len(names)))
    per_class = {name: 100.0 * float(matrix[i, i]) / max(int(matrix[i].sum()), 1)
                 for i, name in enumerate(names)}
    return {
        "checkpoint": str(trained.source), "epoch": trained.epoch, "model": trained.config.model,
        "dtype": trained.config.dtype, "dataset": dataset.name, "num_test": len(predicted),
        "batch_size": trained.config.batch_size, "devices": devices,
        "test_loss": test_loss, "test_acc": test_acc, "per_class_acc": per_class,
        "class_names": list(names), "confusion_matrix": matrix.tolist(),
        "recorded": dict(trained.recorded) if trained.recorded else None}


def print_report(report: dict) -> None:
    recorded = report["recorded"]

    def versus(name):
        if not recorded:
            return ""
        same = "equal" if report[name] == recorded[name] else "differs"
        return f"  (the run logged {recorded[name]!r} for epoch {report['epoch']}: {same})"

    print(f"Checkpoint: {report['checkpoint']}" + (f" (epoch {report['epoch']})"
                                                    if report["epoch"] else ""))
    print(f"Model: {report['model']} ({report['dtype']}), {report['dataset']} test split: "
          f"{report['num_test']} images, batch {report['batch_size']} over "
          f"{report['devices']} device(s)")
    print(f"Test loss: {report['test_loss']!r}{versus('test_loss')}")
    print(f"Test accuracy: {report['test_acc']:.2f}% ({report['test_acc']!r}){versus('test_acc')}")
    print("Per-class accuracy:")
    width = max(len(n) for n in report["class_names"])
    for name, acc in report["per_class_acc"].items():
        print(f"  {name:>{width}}: {acc:6.2f}%")
    print("Confusion matrix (rows: true class, columns: predicted):")
    cell = max(len(str(v)) for row in report["confusion_matrix"] for v in row) + 1
    cell = max(cell, max(len(n) for n in report["class_names"]) + 1)
    print(" " * (width + 2) + "".join(f"{n:>{cell}}" for n in report["class_names"]))
    for name, row in zip(report["class_names"], report["confusion_matrix"]):
        print(f"  {name:>{width}}" + "".join(f"{v:>{cell}}" for v in row))


if __name__ == "__main__":
    sys.exit(main())
