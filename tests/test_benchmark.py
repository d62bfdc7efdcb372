"""scripts/benchmark.py in a tiny configuration: the structure of what it reports, not timings.

Cost: one small compile per JAX contender and a few DataLoader passes. With a 1-epoch
`full_recipe` (train.fit) included it took 14.8 min wall (~3.5 min CPU) at load average ~10 on
2 cores, so the recipe is left to `--full-recipe` runs; not yet timed without it.
"""
import importlib.util
import json
import math
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "benchmark", Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py")
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)

TINY = benchmark.Plan(reps=2, step_batches=(8,), step_calls=1, eval_batch=8, eval_calls=1,
                      torch_compile=False, augment_images=16, augment_workers=(0,),
                      epoch_train=64, epoch_test=32, epoch_reps=1, nnx_calls=3)


@pytest.fixture(scope="module")
def report():
    return benchmark.run(benchmark.SECTIONS, TINY)


def _check_result(result, names, baseline, reps):
    assert result["baseline"] == baseline
    assert result["reps"] == reps
    assert [row["name"] for row in result["rows"]] == names
    for row in result["rows"]:
        assert len(row["samples"]) == reps
        assert all(math.isfinite(v) and v > 0 for v in row["samples"])
        assert row["ratio_min"] <= row["ratio_median"] <= row["ratio_max"]
    base = next(row for row in result["rows"] if row["name"] == baseline)
    assert base["ratio_median"] == 1.0


def test_every_section_reports_each_contender_per_repetition(report):
    sections = report["sections"]
    assert list(sections) == list(benchmark.SECTIONS)
    _check_result(sections["step"]["batch 8"],
                  ["torch eager", "jax step", "jax engine step (+ augment)"], "torch eager", 2)
    _check_result(sections["eval"]["batch 8"], ["torch eager", "jax"], "torch eager", 2)
    _check_result(sections["augment"]["16 images"],
                  ["pillow DataLoader workers=0", "jax augment (batch 64)"],
                  "pillow DataLoader workers=0", 2)
    epoch = sections["epoch"]["64 train + 32 test images"]
    _check_result(epoch, ["torch tutorial loop (workers=0)", "jax engine"],
                  "torch tutorial loop (workers=0)", 1)
    assert epoch["extrapolated"] is True
    assert all(row["epoch_seconds_50k"] > 0 for row in epoch["rows"])
    nnx_rows = sections["nnx"]["batch 8 of 16x16"]
    _check_result(nnx_rows, ["linen jax.jit", "nnx.jit", "nnx.cached_partial",
                             "nnx.split + jax.jit + nnx.merge"], "linen jax.jit", 2)
    assert all(row["unit"] == "us/step" for row in nnx_rows["rows"])


def test_report_names_device_versions_and_threads_and_serialises(report):
    env = report["environment"]
    assert env["jax_backend"] == "cpu" and env["cpu_count"] >= 1
    assert {"jax", "torch", "flax", "numpy"} <= set(env["versions"])
    assert env["threads"]["torch_intra_op"] >= 1
    assert json.loads(json.dumps(report, default=str))["plan"]["reps"] == 2
    markdown = benchmark.to_markdown(report)
    assert "| contender | median | ratio vs torch eager (median, min-max) |" in markdown
    assert "| jax step |" in markdown and "### epoch" in markdown


def test_plan_defaults_to_a_cpu_slice_of_the_epoch_and_flags_override_it():
    assert benchmark.make_plan().epoch_train == benchmark.CPU_EPOCH_TRAIN
    assert benchmark.make_plan(full_epoch=True).epoch_train == benchmark.CIFAR_TRAIN
    assert benchmark.make_plan(epoch_images=1000).epoch_test == 200
    quick = benchmark.make_plan(quick=True, reps=7)
    assert quick.reps == 7 and not quick.torch_compile


def test_unknown_section_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--sections", "step,warp"])
    assert "expected a subset of" in capsys.readouterr().err
