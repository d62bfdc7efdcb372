"""Export a trained model for deployment: `cbam-export CHECKPOINT --format FORMAT`.

The file goes into the run directory (`<model>_<dataset>.stablehlo` or `.onnx`) unless --out
names another; a checkpoint outside any run directory writes it beside itself.

- `stablehlo` (JAX only): `jax.export` of the eval-mode model, its variables inside, serialized.
  Input: normalised float32 images [batch, S, S, 3] (NHWC, any batch; S the run's image size,
  32 in the recipe); output: float32 logits.
  Reload with JAX alone: `jax.export.deserialize(open(path, "rb").read()).call(x)`.
- `onnx` (the `export` extra: torch, onnx, onnxscript, onnxruntime): the tutorial's CBAM_CNN
  with these weights (`parity.flax_to_torch`), through `torch.onnx.export`. Input: normalised
  float32 images [batch, 3, 32, 32] (NCHW, PyTorch's layout); output: logits; float32 whatever
  the run's dtype.

"Normalised" is the tutorial's test transform: pixel / 255, minus CIFAR-10's mean, over its std
(`cbam_jax.augment.CIFAR10_MEAN`, `CIFAR10_STD`); a folder data set's own mean and std, which
its run.json records ("data"). Each artifact is checked before the script
ends: reloaded (StableHLO) or run in onnxruntime (ONNX) on 16 random images and compared with
the JAX model's logits; the exit status is 1 if they disagree.
"""
import argparse
import os
import sys
from pathlib import Path

from cbam_jax import recipe
from cbam_jax.cli import (CommandError, check_out_file, checkpoint_modules, command, error_exit,
                          note_if_unverified, require)

CHECK_IMAGES = 16  # random uint8 images, normalised, that each artifact is checked on
# StableHLO against eval_logits: the same XLA ops, but XLA folds the constant variables'
# arithmetic at compile time, so they agree to float32 rounding (measured on digits runs: 1.8e-7
# on logits up to 0.75 after 1 epoch, 1.9e-6 on logits up to 10.4 after 8), well inside this
# bound.
STABLEHLO_ATOL = STABLEHLO_RTOL = 1e-5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Export a trained CBAM model as serialized StableHLO (jax.export) or ONNX "
                    "(through the PyTorch twin), and check the artifact against JAX.")
    recipe.add_checkpoint_flags(p)
    p.add_argument("--format", choices=("stablehlo", "onnx"), default="stablehlo",
                   help="stablehlo (the default): JAX only, any model; onnx: cbam_cnn, needs torch, onnx, "
                        "onnxscript, onnxruntime (pip install \"cbam-jax[export]\")")
    p.add_argument("--out", default=None,
                   help="the file to write; none given: <model>_<dataset>.stablehlo or .onnx in "
                        "the run directory (beside a checkpoint outside one)")
    p.add_argument("--platforms", default=None,
                   help="stablehlo: comma-separated platforms to lower for, e.g. cpu,cuda,tpu; "
                        "none given: this machine's")
    return p.parse_args(argv)


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.out is not None:
        check_out_file(args.out, "--out")
    if args.format == "onnx":  # torch >= 2.9 comes with the export extra
        require("torch", "onnx", "onnxscript", "onnxruntime", extra="export")
    require(*checkpoint_modules(args.checkpoint))
    import jax
    import numpy as np

    from cbam_jax.augment import normalize
    from cbam_jax.inference import eval_logits, export_stablehlo
    try:  # parity (with torch) also reads a tutorial .pth, and makes the ONNX twin
        from parity import load_checkpoint
    except ImportError:
        from cbam_jax.inference import load_checkpoint

    try:  # the ONNX twin computes in float32, so its reference does too
        trained = load_checkpoint(args.checkpoint, which=args.which, dataset=args.dataset,
                                  dtype="float32" if args.format == "onnx" else None)
    except (FileNotFoundError, ValueError) as e:  # ValueError: also a damaged checkpoint
        return error_exit(e)
    note_if_unverified(trained)
    if args.format == "onnx" and trained.config.model != "cbam_cnn":
        print(f"error: ONNX export goes through the tutorial's PyTorch CBAM_CNN, which mirrors "
              f"cbam_cnn only, not {trained.config.model}; --format stablehlo exports any model",
              file=sys.stderr)
        return 1
    out = check_out_file(args.out or default_out(trained, args.format), "--out")

    size = trained.image_size
    classes = len(trained.class_names)
    if args.format != "stablehlo" and (size, classes) != (32, 10):
        print(f"error: --format {args.format} exports the tutorial's CBAM_CNN, 10 classes at "
              f"32x32; this model has {classes} classes at {size}x{size} (--format stablehlo "
              f"exports it)", file=sys.stderr)
        return 1
    images = np.random.default_rng(0).integers(0, 256, (CHECK_IMAGES, size, size, 3), np.uint8)
    x = np.asarray(normalize(images, trained.state.normalization))
    expected = np.asarray(eval_logits(trained.state, x))
    if args.format == "stablehlo":
        platforms = tuple(args.platforms.split(",")) if args.platforms else None
        write_whole(out, lambda path: path.write_bytes(export_stablehlo(trained.state,
                                                                         platforms, size)))
        exported = jax.export.deserialize(out.read_bytes())
        here = {"gpu": ("cuda", "rocm")}.get(jax.default_backend(), (jax.default_backend(),))
        if not set(here) & set(exported.platforms):
            print(f"Wrote {out} for {', '.join(exported.platforms)}: not checked on this "
                  f"{jax.default_backend()} machine")
            return 0
        got = np.asarray(exported.call(x))
        max_diff = float(np.abs(got - expected).max())
        bound = STABLEHLO_ATOL + STABLEHLO_RTOL * float(np.abs(expected).max())
        ok, detail = max_diff <= bound, f"max |diff| {max_diff:.2e}, tolerance {bound:.2e}"
    else:
        from parity.onnx_export import check_onnx, export_onnx

        variables = {"params": trained.state.params, "batch_stats": trained.state.batch_stats}
        write_whole(out, lambda path: export_onnx(variables, path))
        rows = check_onnx(out, variables, x, expected)
        ok = all(row.passed for row in rows)
        detail = "; ".join(f"{row.name}: {row.jax_error:.2e} from float64, bound "
                           f"{row.bound:.2e} (PyTorch float32: {row.torch_error:.2e})"
                           for row in rows)
    print(f"Wrote {out} ({out.stat().st_size:,} bytes) from {trained.source}")
    print(f"Check on {CHECK_IMAGES} random images against the JAX model: "
          f"{'ok' if ok else 'FAILED'} ({detail})")
    return 0 if ok else 1


def default_out(trained, format: str) -> Path:
    """`<model>_<dataset>.<format>` in the run directory of the checkpoint; outside one,
    beside it (a .pth's folder, or the checkpoint folder holding best/ and latest/)."""
    from cbam_jax.inference import find_run_dir

    source = trained.source.absolute()
    folder = find_run_dir(source) or (source.parent if source.is_file() else source.parents[1])
    return folder / f"{trained.config.model}_{trained.dataset}.{format}"


def write_whole(out: Path, write) -> None:
    """`write(path)` into a temporary file beside `out`, renamed to `out` once complete: a kill
    or an error leaves no cut-off artifact under its name. The temporary keeps `out`'s suffix
    (torch.onnx.export wants .onnx)."""
    tmp = out.with_name(f"{out.stem}.tmp{out.suffix}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, out)
    except OSError as e:  # no space, no permission
        raise CommandError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
