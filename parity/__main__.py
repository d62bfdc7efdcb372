"""`python -m parity`: compare cbam_jax.CBAMCNN with the tutorial's CBAM_CNN, one row per tensor.

Both models start from identical weights (random, or a tutorial checkpoint via --pth); a float64
run of the tutorial's model is the referee. The report covers eval and train forward passes
layer by layer and as the fused ops training runs (logits, BatchNorm buffers), then 5 Adam steps
of the engine (gradients of every parameter, updates, BatchNorm buffers, logits). Exits 1 if any
comparison fails (or torch is not installed), 2 if the flags or the --pth cannot be used.
"""
import argparse
import sys

from cbam_jax.cli import command, require


@command
def main(argv=None) -> int:
    require("torch")  # before anything imports it: one line naming the extra, not a traceback
    import jax

    from parity.controls import NEGATIVE_CONTROLS
    from parity.convert import flax_to_torch, load_pth, save_pth
    from parity.report import format_table, random_state_dict, run_report

    parser = argparse.ArgumentParser(prog="python -m parity", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="weights (without --pth) and batches")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pth", help="start from this CBAM_CNN state_dict (the tutorial's "
                        "torch.save(model.state_dict(), ...)) instead of random weights")
    parser.add_argument("--save-pth", help="write the JAX model's variables after the Adam "
                        "steps here, as a state_dict that CBAM_CNN loads with strict=True")
    parser.add_argument("--device", default="cpu",
                        help="where the PyTorch side (float32 and its float64 referee) runs, e.g. "
                             "'cuda'; the JAX side runs on JAX's default device")
    parser.add_argument("--negative-control", choices=list(NEGATIVE_CONTROLS), metavar="NAME",
                        help="put this deliberate bug in the JAX side; the report must then "
                        "fail (exit 1). " + "; ".join(f"{name}: {why}" for name, (why, _)
                                                       in NEGATIVE_CONTROLS.items()))
    args = parser.parse_args(argv)
    if args.batch_size < 2:  # train-mode BatchNorm needs more than one value per channel
        parser.error(f"--batch-size must be >= 2, got {args.batch_size}")

    # Through the converter, so a checkpoint of another model fails with its key report.
    try:
        state_dict = (flax_to_torch(load_pth(args.pth)) if args.pth
                      else random_state_dict(args.seed))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: --pth: {e}", file=sys.stderr)
        return 2
    print(f"start: {args.pth or f'random weights, seed {args.seed}'}; batch size "
          f"{args.batch_size}; float32 (no TF32), JAX on {jax.default_backend()}, PyTorch on "
          f"{args.device}; judged against float64"
          + (f"; negative control: {NEGATIVE_CONTROLS[args.negative_control][0]}"
             if args.negative_control else ""))
    report = run_report(state_dict, seed=args.seed, batch_size=args.batch_size,
                        negative_control=args.negative_control, device=args.device)
    print(report.headline)
    print(format_table(report))
    if args.save_pth:
        save_pth(report.trained, args.save_pth)
        print(f"wrote the JAX variables after the Adam steps to {args.save_pth}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
