"""Classify your own images, see where CBAM looks: `cbam-predict CHECKPOINT IMAGE...`

IMAGE is a PNG, JPEG, BMP, WebP or TIFF file, or a folder of them. Each image is turned upright
by its EXIF orientation, converted to 8-bit RGB (16-bit grey scaled to 8 bits, transparent
pixels laid over white: `cbam_jax.inference.load_image`) and resized to the model's image size
(32x32 in the recipe) with Pillow's bilinear filter (antialiased when shrinking), ignoring its
aspect ratio; then normalised as the run's test transform (ToTensor + Normalize with CIFAR-10's
mean and std, or a folder data set's own). The script prints each image's top-k classes, by the
run's class names, with their probabilities, and writes one figure per image into --out-dir:
the input, and each CBAM block's spatial attention gate upsampled bilinearly and laid over it.
`--explain gradcam` adds a Grad-CAM figure per image (`cbam_jax.inference.gradcam`): where the
evidence for the predicted class (or --class) lies, at the last CBAM block (or --layer).

Images go through one jit-compiled eval-mode step, --batch-size at a time. A file that cannot
be read, or a folder without images, is reported and the others still run; the exit status is
1 if any input failed, else 0.
"""
import argparse
import sys
from pathlib import Path

from cbam_jax import recipe
from cbam_jax.cli import (CommandError, check_out_dir, checkpoint_modules, command, error_exit,
                          note_if_unverified, require)
from cbam_jax.recipe import POSITIVE_INT

RESIZE_NOTE = ("each image is resized to the model's image size (32x32 in the recipe) with "
               "Pillow's bilinear filter (antialiased when shrinking, aspect ratio not kept), "
               "then normalised as the run's test transform")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Top-k classes and CBAM spatial attention maps (and Grad-CAM) of images, "
                    f"from a trained checkpoint; {RESIZE_NOTE}.")
    recipe.add_checkpoint_flags(p)
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="PNG, JPEG, BMP, WebP or TIFF files, or folders of them")
    p.add_argument("--top-k", type=POSITIVE_INT.parse, default=3,
                   help="how many classes to print per image, most probable first (default: %(default)s)")
    p.add_argument("--batch-size", type=POSITIVE_INT.parse, default=64,
                   help="images per compiled step (changes the speed, not the answers; default: "
                        "%(default)s)")
    p.add_argument("--out-dir", default="predictions",
                   help="the folder the figures go into, made when the first is written (default: "
                        "%(default)s)")
    p.add_argument("--no-figures", action="store_true",
                   help="print the classes only: the figures (matplotlib) are the slow part")
    p.add_argument("--explain", choices=("gradcam",), default=None,
                   help="also write <image>_gradcam.png: Grad-CAM of the predicted class (or "
                        "--class) at the last CBAM block (or --layer)")
    p.add_argument("--class", dest="target", default=None, metavar="CLASS",
                   help="with --explain: the class to explain, by name or index (default: each "
                        "image's predicted class)")
    p.add_argument("--layer", default=None,
                   help="with --explain: the module path of the layer explained, e.g. cbam2 or "
                        "layer3_1/cbam (default: the last CBAM block)")
    args = p.parse_args(argv)
    if args.explain and args.no_figures:
        p.error("--explain writes figures: do not also pass --no-figures")
    if (args.target is not None or args.layer is not None) and not args.explain:
        p.error("--class and --layer go with --explain gradcam")
    return args


def class_index(target: str, names) -> int:
    """The index of class `target`, given by name or index; ValueError lists the classes."""
    if target in names:
        return list(names).index(target)
    if target.isdigit() and int(target) < len(names):
        return int(target)
    raise ValueError(f"--class {target}: expected one of {', '.join(names)} (or 0 to "
                     f"{len(names) - 1})")


def image_files(arguments) -> tuple[list[Path], list[str]]:
    """(files to read, errors): each folder's images in name order, each file as given."""
    from cbam_jax.inference import IMAGE_SUFFIXES

    files, errors = [], []
    for argument in map(Path, arguments):
        if argument.is_dir():
            found = sorted(p for p in argument.iterdir()
                           if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                errors.append(f"{argument}: a folder with no {', '.join(IMAGE_SUFFIXES)} files")
            files.extend(found)
        elif argument.exists():
            files.append(argument)
        else:
            errors.append(f"{argument}: no such file or folder")
    return files, errors


def figure_names(files: list[Path]) -> list[str]:
    """One figure name per image, `<name>_attention.png`, numbered where names repeat."""
    names, seen = [], {}
    for path in files:
        stem = f"{path.stem}{path.suffix.replace('.', '_')}_attention"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}_{seen[stem]}.png")
    return names


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = None if args.no_figures else check_out_dir(args.out_dir, "--out-dir")
    require("PIL", *checkpoint_modules(args.checkpoint),
            *(() if args.no_figures else ("matplotlib",)))
    from cbam_jax import runtime

    runtime.configure_cpu(1)  # before JAX starts: XLA:CPU's fast convolutions, one device
    import numpy as np

    from cbam_jax.inference import cbam_layers, gradcam, load_image, predict
    from cbam_jax.logbook import plot_gradcam, plot_prediction
    try:  # parity (with torch) also reads a tutorial .pth
        from parity import load_checkpoint
    except ImportError:
        from cbam_jax.inference import load_checkpoint

    try:
        trained = load_checkpoint(args.checkpoint, which=args.which, dataset=args.dataset)
    except (FileNotFoundError, ValueError) as e:  # ValueError: also a damaged checkpoint
        return error_exit(e)
    note_if_unverified(trained)
    names = trained.class_names
    if args.top_k > len(names):
        print(f"error: --top-k: expected at most {len(names)} (the classes of "
              f"{trained.dataset}), got {args.top_k}", file=sys.stderr)
        return 1
    layer = target = None
    if args.explain:
        layers = cbam_layers(trained.state, trained.image_size)
        layer = args.layer or layers[-1]
        try:
            target = None if args.target is None else class_index(args.target, names)
            if layer not in layers:
                raise ValueError(f"--layer {layer}: expected one of {', '.join(layers)}")
        except ValueError as e:
            return error_exit(e)

    files, errors = image_files(args.images)
    images, readable = [], []
    for file in files:
        try:
            images.append(load_image(file, trained.image_size))
            readable.append(file)
        except ValueError as e:
            errors.append(str(e))
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if not readable:
        print("error: no image could be read", file=sys.stderr)
        return 1

    images = np.stack(images)
    result = predict(trained.state, images, top_k=args.top_k, batch_size=args.batch_size,
                     attention=not args.no_figures)
    cams = gradcam(trained.state, images, target=target, layer=layer) if args.explain else None
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # e.g. no permission
            raise CommandError(f"--out-dir {out_dir}: {e.strerror or e}") from None
    for i, (file, figure) in enumerate(zip(readable, figure_names(readable))):
        top = [(names[c], float(p)) for c, p in zip(result.classes[i], result.probabilities[i])]
        print(f"{file}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
        if out_dir is not None:
            caption = "\n".join(f"{name}: {p:.1%}" for name, p in top[:3])
            plot_prediction(images[i], [gate[i] for gate in result.attention], caption,
                            out_dir / figure)
            if cams is not None:
                maps, explained = cams
                plot_gradcam(images[i], maps[i], f"Grad-CAM: {names[explained[i]]}\n({layer})",
                             out_dir / "_gradcam".join(figure.rsplit("_attention", 1)))
    if out_dir is not None:
        per_image = 2 if cams is not None else 1
        print(f"{per_image * len(readable)} figure(s) in {out_dir}")
    if errors:
        print(f"{len(errors)} input(s) failed, {len(readable)} image(s) predicted",
              file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
