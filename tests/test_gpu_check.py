"""scripts/gpu_check.sh: its --tiny run (every step on CPU) proves the GPU check's paths, imports
and output format without a GPU; the pieces that decide what a GPU run does are tested alone.

Cost: one `gpu_check.sh --tiny` run (7 child processes; JAX compiles of 3 train-call variants,
the augmentation and a 2-epoch train.fit; a parity report) and one prerequisite check; the rest
takes seconds. On 2 CPU cores: about 2 min (the tiny run 106 s), and up to 6 min when other
jobs share the cores. The runs of gpu_check.sh are in the slow tier (make test-all).
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def _gpu_check(*args, timeout: float) -> subprocess.CompletedProcess:
    """The shell entry point, with this interpreter as its Python."""
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHON=sys.executable))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = _gpu_check("--tiny", "--out", str(out), timeout=1800)
    return done, out, json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
def test_tiny_run_passes_every_step(tiny):
    done, _, report = tiny
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert report["mode"] == "tiny" and report["environment"]["jax_backend"] == "cpu"
    assert list(report["steps"]) == list(gpu_check.STEP_NAMES)
    assert {name: step["status"] for name, step in report["steps"].items()} == {
        name: "ok" for name in gpu_check.STEP_NAMES}


@pytest.mark.slow
def test_outputs_are_the_three_named_files_small_and_plainly_named(tiny):
    """Exactly gpu_check.json, .md and .log, each under 16 MiB, named with letters, digits, '.',
    '_' and '-' only: easy to copy off a remote machine."""
    _, out, _ = tiny
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert files == sorted(gpu_check.OUTPUT_NAMES)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)
    assert all((out / name).stat().st_size < 16 * 2**20 for name in files)


@pytest.mark.slow
def test_report_holds_every_step_s_measurements(tiny):
    steps = tiny[2]["steps"]
    parity = steps["smoke"]["parity"]
    assert parity["passed"] == parity["total"] > 50 and parity["torch_device"] == "cpu"
    # The tiny mode's filter selects the max-pool test, once per path (reference and fused).
    assert steps["smoke"]["tests"]["passed"] == 2 and steps["smoke"]["tests"]["failed"] == []
    # XLA:CPU parses the GPU flags too, so every command-buffer setting is accepted here.
    assert {mode: v["rejected"] for mode, v in steps["jax_steps"]["command_buffers"].items()} \
        == {mode: None for mode in gpu_check.COMMAND_BUFFERS}
    groups = steps["jax_steps"]["groups"]
    assert {label: [row["name"] for row in group["rows"]] for label, group in groups.items()} == {
        "steps per call (XLA's command buffers as it sets them)":
            ["1 step per call", "fori_loop of 2"],
        "command buffers off": ["1 step per call", "1 step per call, off"]}
    profile = steps["jax_steps"]["profile"]
    assert profile["steps"] == 2 and profile["top"] and profile["busy_ms"] > 0
    torch_step = steps["torch_steps"]["groups"]["batch 8"]
    assert [row["name"] for row in torch_step["rows"]] == ["torch eager", "torch.compile"]
    assert "needs a CUDA device" in torch_step["errors"]["CUDA graph of the whole step"]
    assert [row["name"] for row in steps["augment"]["groups"]["16 images"]["rows"]] == [
        "pillow DataLoader workers=0", "pillow DataLoader workers=2", "jax augment (batch 64)"]
    recipe = steps["recipe"]["recipe"]
    assert recipe["epochs_completed"] == 2 and recipe["compile_seconds"] > 0
    assert steps["recipe"]["progress"]["epochs_done"] == 2
    assert set(steps["tutorial"]["epoch_seconds"]) == {"0", "2"}
    summary = tiny[2]["summary"]
    assert summary["speedup"] == pytest.approx(
        50 * steps["tutorial"]["epoch_seconds"]["0"] / recipe["wall_seconds"])


@pytest.mark.slow
def test_markdown_shows_targets_steps_and_every_table_and_is_printed_last(tiny):
    done, out, _ = tiny
    markdown = (out / "gpu_check.md").read_text()
    assert markdown.startswith("### cpu: scripts/gpu_check.sh, ")
    for expected in ("| full recipe (`train.fit`, eval every epoch) | 2 of 2 epochs",
                     "| speed-up over the tutorial pipeline (workers=0) |",
                     "| parity: JAX on cpu vs PyTorch on cpu, float32 | ",
                     "| step | status | seconds | time box |", "| recipe | ok |",
                     "### JAX train call: command buffers off", "### PyTorch step: batch 8",
                     "### augmentation: 16 images", "### tutorial pipeline, one epoch",
                     "### profile: the engine's call of 2 steps"):
        assert expected in markdown, expected
    assert markdown.strip() in done.stdout
    assert "===== recipe" in (out / "gpu_check.log").read_text()


@pytest.mark.slow
def test_without_a_gpu_the_full_run_stops_at_once_saying_what_is_missing(tmp_path):
    start = time.monotonic()
    done = _gpu_check("--out", str(tmp_path), timeout=600)
    assert done.returncode == 2
    assert "not a GPU" in done.stderr and "--tiny" in done.stderr
    assert "not a GPU" in json.loads((tmp_path / "gpu_check.json").read_text())["stopped"]
    assert time.monotonic() - start < 180  # importing JAX and torch once, on a busy machine


def test_a_missing_package_is_named_with_what_needs_it():
    missing = gpu_check.missing_prerequisites(
        {"json": "stdlib", "no_such_module_x": "the engine", "no_such_package_x.sub": "logs"})
    assert missing == ["no_such_module_x (the engine)", "no_such_package_x.sub (logs)"]


def test_an_unknown_xla_option_is_reported_not_fatal():
    assert gpu_check.option_rejection(gpu_check.COMMAND_BUFFERS["off"]) is None
    assert "xla_no_such_option" in gpu_check.option_rejection((("xla_no_such_option", 1),))


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def test_a_step_over_its_time_box_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "pid"
    with open(tmp_path / "log", "a") as log:
        status, _, seconds = gpu_check.run_step(
            ["bash", "-c", f"sleep 120 & echo $! > {pid_file}; sleep 120"], 2, log)
    assert status == "timeout" and seconds < 15
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def test_time_boxes_leave_each_later_step_its_reserve():
    steps, names = gpu_check.STEPS, gpu_check.STEP_NAMES
    assert sum(step.reserve for step in steps) < gpu_check.BUDGET_SECONDS < 8 * 60
    assert gpu_check.time_box(steps, 0, gpu_check.BUDGET_SECONDS) == steps[0].box
    recipe = names.index("recipe")
    later = sum(step.reserve for step in steps[recipe + 1:])
    assert gpu_check.time_box(steps, recipe, 150) == 150 - later
    assert gpu_check.time_box(steps, recipe, 150, scale=2.0) == 150 - 2 * later


def test_summary_reads_the_targets_off_the_steps():
    report = {"steps": {"recipe": {"recipe": {"wall_seconds": 12.0}},
                        "tutorial": {"epoch_seconds": {"0": 30.0, "8": 6.0}},
                        "smoke": {"parity": {"passed": 97, "total": 98}}}}
    assert gpu_check.summary(report) == {
        "recipe_seconds": 12.0, "recipe_target_met": True,
        "tutorial_50_epochs_seconds": {"0": 1500.0, "8": 300.0},
        "speedup": 125.0, "speedup_target_met": True, "parity": "97/98"}
