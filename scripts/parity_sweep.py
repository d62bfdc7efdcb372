"""The parity report on many trained checkpoints: every run must pass, every negative control fail.

    python scripts/parity_sweep.py --checkpoints /tmp/parity-sweep      # train, then check

Trains the tutorial's CBAM_CNN (parity.tutorial_training) for each training seed and batch size,
saving snapshots early and late in training as .pth files (kept, and reused on a second run), then
runs `python -m parity --pth FILE` in-process on every checkpoint: for each report seed at batch
16 and once at batch 64 (expect exit 0), and once with each negative control (expect exit 1).
Prints one line per run and a summary; exits 1 if any verdict was wrong. With the defaults (24
checkpoints, 288 runs) it took 12 to 23 minutes on 2 CPU cores; run it at low priority
(nice -n 10) beside other work.
"""
import argparse
import contextlib
import io
import itertools
import sys
import time
from pathlib import Path

import torch

from parity.__main__ import main as parity_main
from parity.controls import NEGATIVE_CONTROLS
from parity.tutorial_training import digits_tensors, train_tutorial_model


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def make_checkpoints(folder: Path, train_seeds, batch_sizes, steps) -> list[Path]:
    """Train (unless already there) and save one .pth per (seed, batch size, step)."""
    folder.mkdir(parents=True, exist_ok=True)
    data, paths = None, []
    for seed, batch_size in itertools.product(train_seeds, batch_sizes):
        wanted = {step: folder / f"cbam_cnn_seed{seed}_batch{batch_size}_step{step}.pth"
                  for step in steps}
        if not all(path.exists() for path in wanted.values()):
            data = data or digits_tensors()
            start = time.time()
            for step, state_dict in train_tutorial_model(seed, batch_size, steps, data).items():
                torch.save(state_dict, wanted[step])
            print(f"trained seed {seed}, batch {batch_size}: {time.time() - start:.0f} s",
                  flush=True)
        paths += wanted.values()
    return paths


def run(args: list[str]) -> tuple[int, str]:
    """`python -m parity ARGS` in this process (the compiled programs are reused): the exit code
    and a summary: the report's last line, and the row closest to (or furthest past) its bound."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = parity_main(args)
    lines = out.getvalue().strip().splitlines()
    rows = []  # (JAX err / bound, name, JAX err / PyTorch err) from the table's PASS/FAIL lines
    for line in lines:
        if line.endswith(("PASS", "FAIL")):
            *name, _, jax_error, torch_error, bound, _ = line.split()
            jax_error, torch_error, bound = float(jax_error), float(torch_error), float(bound)
            rows.append((jax_error / bound if bound else float(jax_error > 0),
                         " ".join(name), jax_error / torch_error if torch_error else 0.0))
    margin, name, ratio = max(rows)
    return code, (f"{lines[-1]}; worst: {name} at {margin:.3g} of its bound "
                  f"(JAX/PyTorch err {ratio:.3g})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, required=True, help="folder for the .pth files")
    parser.add_argument("--train-seeds", type=_ints, default=[0, 1, 2])
    parser.add_argument("--train-batch-sizes", type=_ints, default=[16, 64])
    parser.add_argument("--steps", type=_ints, default=[10, 60, 200, 400],
                        help="snapshot steps, early to late")
    parser.add_argument("--report-seeds", type=_ints, default=[0, 1, 2, 3, 4])
    parser.add_argument("--large-batch", type=int, default=64,
                        help="also run the report (seed 0) at this batch size; 0: do not")
    args = parser.parse_args(argv)

    paths = make_checkpoints(args.checkpoints, args.train_seeds, args.train_batch_sizes,
                             args.steps)
    wrong, total, start = [], 0, time.time()
    for path in paths:
        runs = [(["--seed", str(seed)], 0) for seed in args.report_seeds]  # (CLI args, exit)
        if args.large_batch:
            runs.append((["--batch-size", str(args.large_batch)], 0))
        runs += [(["--negative-control", name], 1) for name in NEGATIVE_CONTROLS]
        for extra, expected in runs:
            code, last = run(["--pth", str(path), *extra])
            total += 1
            verdict = "ok" if code == expected else "WRONG"
            if code != expected:
                wrong.append(f"{path.name} {' '.join(extra)}")
            print(f"{verdict:5} exit {code} (expected {expected})  {path.name} {' '.join(extra)}"
                  f"  | {last}  [{time.time() - start:.0f} s]", flush=True)
    print(f"{len(paths)} checkpoints, {total} runs: {total - len(wrong)} gave the expected exit "
          f"code" + (f", {len(wrong)} did not: " + "; ".join(wrong) if wrong else ""))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
