"""scripts/benchmark.py in a tiny configuration: the structure of what it reports, not timings.

Cost: one small compile per JAX contender, Dynamo traces of the torch.compile rows (the "eager"
backend) and a few DataLoader passes: about 1.5 min on 2 CPU cores (the report fixture 49 s,
the train-call variants 31 s). A 1-epoch `full_recipe` (train.fit) would add about 3.5 min of
CPU, so the recipe is left to `--full-recipe` runs (and to tests/test_gpu_check.py's tiny run).
The report, the engine variants and --processes are in the slow tier (make test-all).
"""
import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest
from conftest import CONTROL_FLOW_ONLY

_spec = importlib.util.spec_from_file_location(
    "benchmark", Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py")
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)

# torch.compile with the "eager" backend: Dynamo traces the model (the rows' code path) without
# the minutes that Inductor's code generation takes on a busy CPU.
TINY = benchmark.Plan(reps=2, step_batches=(8,), step_calls=2, eval_batch=8, eval_calls=1,
                      torch_compile=True, torch_compile_backend="eager", augment_images=16,
                      augment_workers=(0,), epoch_train=64, epoch_test=32, epoch_reps=1,
                      nnx_calls=3)


@pytest.fixture(scope="module")
def report():
    return benchmark.run(benchmark.SECTIONS, TINY)


def _check_result(result, names, baseline, reps):
    assert result["baseline"] == baseline
    assert result["reps"] == reps
    assert [row["name"] for row in result["rows"]] == names
    assert result["load_average_start"] >= 0 and result["load_average_end"] >= 0
    for row in result["rows"]:
        assert len(row["samples"]) == reps
        assert all(math.isfinite(v) and v > 0 for v in row["samples"])
        assert row["ratio_min"] <= row["ratio_median"] <= row["ratio_max"]
        assert row["warmup_seconds"] > 0
        assert 0 < row["cores_busy"] < 64  # CPU seconds over wall seconds of this process
        assert row["minor_faults_per_rep"] >= 0
    base = next(row for row in result["rows"] if row["name"] == baseline)
    assert base["ratio_median"] == 1.0
    compiled = [row for row in result["rows"] if row["name"].startswith("torch.compile")]
    assert result["compiled"] == (compiled[0]["name"] if compiled else None)
    for row in result["rows"]:  # the speed targets are ratios to torch.compile
        assert ("ratio_vs_compiled" in row) == bool(compiled)
        if compiled:
            ratio = row["ratio_vs_compiled"]
            assert ratio["min"] <= ratio["median"] <= ratio["max"]
            expected = [v / c for v, c in zip(row["samples"], compiled[0]["samples"])]
            assert ratio["median"] == pytest.approx(statistics.median(expected))
    if compiled:
        assert compiled[0]["ratio_vs_compiled"]["median"] == 1.0


@pytest.mark.slow
def test_every_section_reports_each_contender_per_repetition(report):
    sections = report["sections"]
    assert list(sections) == list(benchmark.SECTIONS)
    _check_result(sections["step"]["batch 8"],
                  ["torch eager", "jax step", "jax engine step (+ augment)", "torch.compile"],
                  "torch eager", 2)
    _check_result(sections["eval"]["batch 8"], ["torch eager", "jax", "torch.compile"],
                  "torch eager", 2)
    _check_result(sections["augment"]["16 images"],
                  ["pillow DataLoader workers=0", "jax augment (batch 64)"],
                  "pillow DataLoader workers=0", 2)
    epoch = sections["epoch"]["64 train + 32 test images"]
    _check_result(epoch, ["torch tutorial loop (workers=0)", "torch.compile loop (workers=2)",
                          "jax engine"], "torch tutorial loop (workers=0)", 1)
    assert epoch["extrapolated"] is True
    assert all(row["epoch_seconds_50k"] > 0 for row in epoch["rows"])
    nnx_rows = sections["nnx"]["batch 8 of 16x16"]
    _check_result(nnx_rows, ["linen jax.jit", "nnx.jit", "nnx.cached_partial",
                             "nnx.split + jax.jit + nnx.merge"], "linen jax.jit", 2)
    assert all(row["unit"] == "us/step" for row in nnx_rows["rows"])


@pytest.mark.slow
def test_report_names_device_versions_threads_and_load_and_serialises(report):
    env = report["environment"]
    assert env["jax_backend"] == "cpu" and env["cpu_count"] >= 1
    assert env["jax_device_count"] >= 1 and env["usable_cores"] >= 1
    assert {"jax", "torch", "flax", "numpy"} <= set(env["versions"])
    assert env["threads"]["torch_intra_op"] >= 1
    assert len(env["threads"]["load_average_at_end"]) == 3
    assert env["precision"]["torch_cudnn_allow_tf32"] in (True, False)
    assert json.loads(json.dumps(report, default=str))["plan"]["reps"] == 2
    markdown = benchmark.to_markdown(report)
    assert ("| contender | median | ratio vs torch eager (median, min-max) | vs torch.compile |"
            " cores busy | warm-up |") in markdown
    assert ("| contender | median | ratio vs linen jax.jit (median, min-max) | cores busy | "
            "warm-up |") in markdown  # no torch.compile row in the nnx table
    assert "| jax step |" in markdown and "### epoch" in markdown
    assert "| torch.compile loop (workers=2) |" in markdown


@pytest.mark.slow
def test_engine_call_variants_train_the_same_steps():
    """A fori_loop of 2 steps per call, one step per call (the CPU engine's call, the step
    section's engine row), a lax.scan of 2 steps per call, and the ablation without the custom
    gradients: each runs 2 steps of the engine on the mesh and reports images/s. (XLA options
    are in tests/test_gpu_check.py.)"""
    mesh = benchmark.distributed.make_mesh()
    variants = {"fori": dict(steps_per_call=2, loop="fori"),
                "one step per call": dict(steps_per_call=1),
                "scan": dict(steps_per_call=2, loop="scan"),
                "autodiff": dict(steps_per_call=1, custom_gradients=False)}
    for name, kwargs in variants.items():
        run = benchmark.jax_engine_calls(8, 2, mesh=mesh, **kwargs)
        assert run() > 0, name
    with pytest.raises(ValueError, match="multiple of steps_per_call"):
        benchmark.jax_engine_calls(8, 3, 2, mesh=mesh)


@pytest.mark.slow
def test_ablation_traces_the_plain_functions_under_the_custom_gradients():
    state = benchmark._jax_state()
    plain = benchmark.without_custom_gradients(state.apply_fn)
    x = benchmark.jnp.zeros((2, 32, 32, 3))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    custom_vjp = benchmark.jax.make_jaxpr(
        lambda x: state.apply_fn(variables, x, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": state.rng}))(x)
    autodiff = benchmark.jax.make_jaxpr(
        lambda x: plain(variables, x, train=True, mutable=["batch_stats"],
                        rngs={"dropout": state.rng}))(x)
    assert "custom_vjp_call" in str(custom_vjp) and "custom_vjp_call" not in str(autodiff)
    assert set(benchmark.CUSTOM_GRADIENT_OPS) == {
        "cbam_tutorial", "max_pool_2x2", "batch_norm_train", "batch_norm_relu_pool_train",
        "_dense"}  # under ops.dense_dot_general
    for name in benchmark.CUSTOM_GRADIENT_OPS:  # restored afterwards
        assert isinstance(getattr(benchmark.ops, name), benchmark.jax.custom_vjp)


def test_plan_defaults_to_a_cpu_slice_of_the_epoch_and_flags_override_it():
    assert benchmark.make_plan().epoch_train == benchmark.CPU_EPOCH_TRAIN
    assert benchmark.make_plan(full_epoch=True).epoch_train == benchmark.CIFAR_TRAIN
    # A median of 3 epochs on the CPU slice; one pass of a whole epoch.
    assert benchmark.make_plan().epoch_reps == 3
    assert benchmark.make_plan(full_epoch=True).epoch_reps == 1
    assert benchmark.make_plan(epoch_images=1000).epoch_test == 200
    quick = benchmark.make_plan(quick=True, reps=7)
    assert quick.reps == 7 and not quick.torch_compile


@pytest.mark.slow
def test_processes_summary_gives_each_contenders_ratio_in_every_process(report):
    """`gather_processes` on two reports: the second's jax step twice as fast, its baseline
    unchanged, so its ratios double; each table lists the per-process ratios and the median."""
    second = json.loads(json.dumps(report))
    rows = second["sections"]["step"]["batch 8"]["rows"]
    jax_row = next(row for row in rows if row["name"] == "jax step")
    jax_row["ratio_median"] *= 2
    jax_row["ratio_vs_compiled"]["median"] *= 2
    summary = benchmark.gather_processes([report, second])
    step = summary["tables"]["step: batch 8"]
    assert (step["baseline"], step["compiled"]) == ("torch eager", "torch.compile")
    first_row = next(row for row in report["sections"]["step"]["batch 8"]["rows"]
                     if row["name"] == "jax step")
    assert step["rows"]["jax step"]["vs_baseline"] == [first_row["ratio_median"],
                                                       2 * first_row["ratio_median"]]
    assert step["rows"]["torch.compile"]["vs_compiled"] == [1.0, 1.0]
    assert "vs_compiled" not in summary["tables"]["nnx: batch 8 of 16x16"]["rows"]["nnx.jit"]
    markdown = benchmark.processes_markdown(summary)
    assert "### step: batch 8: ratio medians per process" in markdown
    assert (f"| jax step | {first_row['ratio_median']:.2f}x, "
            f"{2 * first_row['ratio_median']:.2f}x | {1.5 * first_row['ratio_median']:.2f}x |"
            in markdown)


@pytest.mark.slow
def test_processes_flag_runs_each_measurement_in_a_fresh_process(tmp_path, monkeypatch):
    # What is checked is the processes and their files, not their timings.
    for name, value in CONTROL_FLOW_ONLY.items():
        monkeypatch.setenv(name, value)  # for the processes, which inherit the environment
    summary = benchmark.main(["--sections", "nnx", "--quick", "--reps", "1", "--processes", "2",
                              "--out", str(tmp_path)])
    assert summary["processes"] == 2 and len(summary["load_average_at_start"]) == 2
    for i in range(2):
        assert (tmp_path / f"process_{i}" / "benchmark.json").is_file()
    assert set(summary["tables"]["nnx: batch 8 of 16x16"]["rows"]) == {
        "linen jax.jit", "nnx.jit", "nnx.cached_partial", "nnx.split + jax.jit + nnx.merge"}
    assert (tmp_path / "processes.md").read_text().startswith("2 processes, load average")
    with pytest.raises(SystemExit):
        benchmark.main(["--processes", "0"])


def test_interleave_counts_each_contenders_page_faults():
    """Page faults are counted per contender: one that maps and touches 64 MB of fresh memory
    per call faults at least once per 2 MB page (once per 4 kB one without huge pages); the
    control, a contender that allocates nothing, about never."""
    import mmap

    def fresh_memory():
        with mmap.mmap(-1, 64 << 20) as block:
            block[::4096] = b"x" * (len(block) // 4096)
        return 1.0

    timings = benchmark.interleave({"fresh memory": fresh_memory, "nothing": lambda: 1.0}, reps=3)
    assert timings.minor_faults["fresh memory"] >= 3 * 32
    assert timings.minor_faults["nothing"] < timings.minor_faults["fresh memory"] / 4


def test_unknown_section_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--sections", "step,warp"])
    assert "expected a subset of" in capsys.readouterr().err


def test_an_ablation_pairs_each_process_with_the_next_one_without_the_setting():
    """`--ablate NAME --processes 4`: processes 0 and 2 run with NAME, 1 and 3 without; each
    contender's gain is its median throughput with over without, pair by pair."""
    def run(step, epoch):
        return {"sections": {
            "step": {"batch 64": {"rows": [{"name": "jax step", "median": step}]}},
            "epoch": {"slice": {"rows": [{"name": "jax engine", "median": epoch}]}}}}

    ablation = benchmark.gather_ablation([run(130, 90), run(100, 100), run(120, 99),
                                          run(100, 100)], "memory_scheduler")
    assert ablation["pairs"] == 2
    assert ablation["tables"]["step: batch 64"]["jax step"]["gain"] == [1.3, 1.2]
    assert ablation["tables"]["epoch: slice"]["jax engine"]["gain"] == [0.9, 0.99]
    markdown = benchmark.ablation_markdown(ablation)
    assert "| step: batch 64 | jax step | 1.300x, 1.200x | 1.250x |" in markdown


@pytest.mark.parametrize("argv, message", [
    (["--ablate", "memory_scheduler", "--processes", "3"], "needs an even --processes"),
    (["--without", "no_such_setting"], "expected names among"),
])
def test_ablation_flags_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--sections", "none", *argv])
    assert message in capsys.readouterr().err
