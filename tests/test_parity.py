"""The parity suite: cbam_jax.CBAMCNN vs the tutorial's CBAM_CNN, judged against float64.

How each row is judged is in parity/report.py (float32_bound) and parity/kinks.py. The report
must pass on random weights and on checkpoints the tutorial's own loop wrote, early and late in
training, and every negative control (parity/controls.py) must make it fail on both.
Budget: about 6.5 min on 2 CPU cores: training the
checkpoints, compiling each control's JAX programs (both paths), and one CLI run. The
tests on the trained checkpoints are in the slow tier (make test-all).
"""
import subprocess
import sys
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from cbam_jax import CBAM, CBAMCNN, ChannelAttention, SpatialAttention
from cbam_jax.ops import fused, reference as reference_ops
from cbam_jax.train import make_optimizer
from parity import controls, reference, torch_to_flax
from parity.__main__ import main
from parity.controls import NEGATIVE_CONTROLS
from parity.report import (ADAM_STEPS, EPS32, LAYERS, LEARNING_RATE, Comparison, Report,
                           adam_bias_correction_ulps, forward_comparisons, jax_programs, judge,
                           nchw_to_nhwc, nhwc_to_nchw, random_batch, random_state_dict,
                           run_report, torch_adam_update, torch_model)
from parity.tutorial_training import train_tutorial_model

SEED = 0
BATCH = 16
EARLY, LATE = 10, 120  # training steps of the two tutorial checkpoints
with torch.device("meta"):
    STATE_KEYS = list(reference.CBAM_CNN().state_dict())
BUFFERS = [k for k in STATE_KEYS if k.rsplit(".", 1)[-1].startswith(("running", "num_batches"))]
PARAM_NAMES = [k for k in STATE_KEYS if k not in BUFFERS]


@pytest.fixture(scope="module")
def programs():
    return jax_programs(LEARNING_RATE, None)


@pytest.fixture(scope="module")
def state_dict():
    """PyTorch init plus random BatchNorm affine params and running stats (so BN is exercised)."""
    return random_state_dict(SEED)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The tutorial's CBAM_CNN trained by its loop on digits (batch 16), saved as the tutorial
    saves it, early and late in training: {'early': path, 'late': path}."""
    folder = tmp_path_factory.mktemp("tutorial")
    snapshots = train_tutorial_model(seed=SEED, batch_size=BATCH, snapshot_steps=(EARLY, LATE))
    paths = {"early": folder / f"step{EARLY}.pth", "late": folder / f"step{LATE}.pth"}
    torch.save(snapshots[EARLY], paths["early"])
    torch.save(snapshots[LATE], paths["late"])
    return paths


@pytest.fixture(scope="module")
def random_report(state_dict):
    return run_report(state_dict, seed=SEED, batch_size=BATCH)


def _failures(rows: list[Comparison]) -> list[str]:
    return [f"{r.name}: JAX err {r.jax_error:.3e} > bound {r.bound:.2e} (PyTorch err "
            f"{r.torch_error:.3e})" for r in rows if not r.passed]


# (a) eval-mode forward, layer by layer, at batch sizes 1, 7 and 64.
@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_eval_forward_matches_layer_by_layer(programs, state_dict, batch_size):
    x, _ = random_batch(SEED + batch_size, batch_size)
    rows = forward_comparisons(programs, torch_to_flax(state_dict), state_dict, x,
                               train=False).rows
    # fc2 = the logits, layer by layer; then the fused path's, as training and inference run
    assert [r.name for r in rows] == [f"eval {name}" for name in LAYERS] + ["eval logits, fused"]
    assert not _failures(rows)


def _torch_to_flax_layer(module: torch.nn.Module) -> dict:
    """Params of a lone ChannelAttention / SpatialAttention / CBAM (Linear: transpose; conv:
    OIHW -> HWIO), named like the Flax layer."""
    params = {}
    for name, tensor in module.state_dict().items():
        a = tensor.numpy()
        *path, _ = name.replace("fc.", "fc_").split(".")
        a = a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T
        node = params
        for key in path:
            node = node.setdefault(key, {})
        node["kernel"] = jnp.asarray(a)
    return params


LAYER_SHAPES = [(2, 16, 8, 8), (3, 32, 5, 9), (1, 64, 4, 4), (4, 128, 7, 3), (2, 48, 1, 6)]


@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layer", ["ChannelAttention", "SpatialAttention", "CBAM"])
def test_layer_alone_matches(layer, shape):
    torch.manual_seed(sum(shape))
    channels = shape[1]
    torch_layer = {"ChannelAttention": lambda: reference.ChannelAttention(channels),
                   "SpatialAttention": lambda: reference.SpatialAttention(),
                   "CBAM": lambda: reference.CBAM(channels)}[layer]()
    jax_layer = {"ChannelAttention": ChannelAttention, "SpatialAttention": SpatialAttention,
                 "CBAM": CBAM}[layer]()
    x = torch.randn(*shape) * 2
    with torch.no_grad():
        expected32 = torch_layer(x)
        expected64 = torch_layer.double()(x.double())
    got = jax_layer.apply({"params": _torch_to_flax_layer(torch_layer.float())}, nchw_to_nhwc(x))
    row = judge(layer, nhwc_to_nchw(got), expected32, expected64)
    assert row.passed, row


def _conv_without_bias(next_fun, args, kwargs, context):
    """A CBAMCNN whose convs leave out their bias, as an engine may before a train-mode
    BatchNorm (it cancels there exactly)."""
    out = next_fun(*args, **kwargs)
    if (context.module.path in [(f"conv{i}",) for i in (1, 2, 3)]
            and context.method_name == "__call__"):  # not its `weights`
        out = out - context.module.variables["params"]["bias"]
    return out


@pytest.mark.parametrize("train", [True, False])
def test_a_conv_bias_left_out_is_invisible_in_train_mode_only(state_dict, train):
    programs = jax_programs.__wrapped__(LEARNING_RATE, None)  # traced afresh, with the change
    x, _ = random_batch(SEED, BATCH)
    with nn.intercept_methods(_conv_without_bias):
        rows = forward_comparisons(programs, torch_to_flax(state_dict), state_dict, x,
                                   train).rows
    activations = [r for r in rows if r.name.split()[1] in LAYERS]
    if train:
        assert not _failures(activations)
    else:  # eval-mode BatchNorm reads the bias: leaving it out is a bug there
        assert {"eval conv1", "eval bn1", "eval fc2"} <= {r.name for r in rows if not r.passed}


_conv_bn_relu_pool = fused.conv_bn_relu_pool  # the original: the patch below would call itself


def _block_without_conv_bias(x, kernel, conv_bias, *args, **kwargs):
    return _conv_bn_relu_pool(x, kernel, jnp.zeros_like(conv_bias), *args, **kwargs)


def test_the_fused_rows_judge_the_fused_path(state_dict):
    """A bug only in the fused block (its conv bias dropped, which eval mode reads) fails the
    fused eval logits and leaves the layer-by-layer rows passing: the fused rows can fail."""
    programs = jax_programs.__wrapped__(LEARNING_RATE, None)  # traced afresh, with the bug
    x, _ = random_batch(SEED, BATCH)
    with mock.patch("cbam_jax.ops.fused.conv_bn_relu_pool", _block_without_conv_bias):
        rows = forward_comparisons(programs, torch_to_flax(state_dict), state_dict, x,
                                   train=False).rows
    assert [r.name for r in rows if not r.passed] == ["eval logits, fused"]


def _average_pool(x):
    """A 2x2 average pool where the reference path has its max-pool: a bug of that path only."""
    b, h, w, c = x.shape
    return x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def test_the_layer_rows_judge_the_reference_path(state_dict):
    """A bug only in `ops.reference` (the blocks' max-pool) fails the layer rows after it and
    leaves the fused path's logits passing: the layer rows run the reference path, by name."""
    programs = jax_programs.__wrapped__(LEARNING_RATE, None)  # traced afresh, with the bug
    x, _ = random_batch(SEED, BATCH)
    with mock.patch("cbam_jax.ops.reference.max_pool_2x2", _average_pool):
        rows = forward_comparisons(programs, torch_to_flax(state_dict), state_dict, x,
                                   train=False).rows
    failed = {r.name for r in rows if not r.passed}
    assert {"eval cbam1.channel_attn", "eval fc2"} <= failed
    assert "eval logits, fused" not in failed and "eval bn1" not in failed


# (b) train-mode forward with dropout on, the JAX model's own mask injected into PyTorch's.
@pytest.mark.slow
def test_train_forward_with_the_same_dropout_mask_matches(state_dict):
    x, _ = random_batch(SEED, BATCH)
    captured = {}

    def grab_dropout(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dropout):
            captured["in"], captured["out"] = args[0], out
        return out

    with nn.intercept_methods(grab_dropout):
        logits, _ = CBAMCNN(dropout_rate=0.5).apply(
            torch_to_flax(state_dict), nchw_to_nhwc(x), train=True,
            rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
    keep = torch.from_numpy(np.asarray(captured["out"]) != 0)
    active = torch.from_numpy(np.asarray(captured["in"]) != 0)  # ReLU zeros say nothing
    assert 0.4 < keep[active].float().mean() < 0.6  # it did drop about half

    class SameMask(torch.nn.Module):  # inverted dropout, as nn.Dropout(0.5) scales: 1 / 0.5
        def forward(self, h):
            return h * keep.to(h.dtype) / 0.5

    expected = []
    for dtype in (torch.float32, torch.float64):
        model = torch_model(state_dict, dtype)
        model.dropout = SameMask()
        expected.append(model.train()(x.to(dtype)).detach())
    row = judge("train logits, dropout 0.5", logits, *expected)
    assert row.passed, row


# (c) the whole report: forward passes, then 5 engine Adam steps (gradients, updates, buffers).
def test_report_on_random_weights_passes_every_row(random_report):
    assert random_report.passed, _failures(random_report.rows)


def test_report_covers_every_layer_parameter_and_buffer(random_report):
    names = [r.name for r in random_report.rows]
    expected = ([f"eval {n}" for n in LAYERS] + [f"train {n}" for n in LAYERS]
                + [f"train {n}" for n in BUFFERS] + [f"grad {n}" for n in PARAM_NAMES]
                + [f"adam {n}" for n in PARAM_NAMES] + [f"adam {n}" for n in BUFFERS]
                + ["adam train logits", f"adam{ADAM_STEPS} eval logits"]
                + ["eval logits, fused", "train logits, fused"]
                + [f"train {n}, fused" for n in BUFFERS])
    assert sorted(names) == sorted(expected)


def test_batches_tie_max_pool_windows_exactly_so_the_tie_rule_is_tested(random_report):
    # Each image's flat square gives thousands of windows of 4 equal maxima per step.
    assert random_report.exact_pool_ties > 1000 * ADAM_STEPS


def test_conv_bias_gradient_is_float32_noise_around_an_exact_zero(random_report):
    rows = {r.name: r for r in random_report.rows}
    for i in (1, 2, 3):
        row = rows[f"grad conv{i}.bias"]
        assert row.scale < 1e-12  # float64: zero up to its own rounding
        assert row.torch_error > 1e6 * row.scale  # float32: noise around it


def test_an_exactly_zero_conv_bias_gradient_passes():
    """A JAX model may drop the conv bias before a train-mode BatchNorm and return an exact 0
    for its gradient (the truth); PyTorch float32's noise must not make that a failure."""
    x, y = random_batch(SEED, BATCH)
    grads = []
    for dtype in (torch.float32, torch.float64):
        model = torch_model(random_state_dict(SEED), dtype).train()
        torch.nn.functional.cross_entropy(model(x.to(dtype)), y).backward()
        grads.append(model.conv2.bias.grad)
    assert judge("grad conv2.bias", np.zeros(64), *grads).passed
    assert not judge("grad conv2.bias", 100 * grads[0], *grads).passed  # 100x the noise fails


def test_adam_update_from_identical_gradients_is_within_float32_rounding():
    """make_optimizer alone, fed the same gradients as torch.optim.Adam in float32 and float64:
    any gap is the update rule's, judged like the report's 'adam' rows."""
    g = torch.Generator().manual_seed(0)
    # Magnitudes from 1e-9 (below eps) to 1, signs changing between steps.
    scales = torch.logspace(-9, 0, 50)
    params = {"p": torch.randn(50, generator=g)}
    moments = ({"p": torch.zeros(50)}, {"p": torch.zeros(50)})
    tx = make_optimizer(LEARNING_RATE)
    value = jnp.asarray(params["p"].numpy())
    state = tx.init(value)
    for t in range(ADAM_STEPS):
        grads = {"p": torch.randn(50, generator=g) * scales}
        expected = [torch_adam_update(params, grads, *moments, t, LEARNING_RATE, dtype)["p"]
                    for dtype in (torch.float32, torch.float64)]
        updates, state = tx.update(jnp.asarray(grads["p"].numpy()), state, value)
        value = optax.apply_updates(value, updates)
        step = float((expected[1] - params["p"]).abs().max())
        row = judge(f"step {t + 1}", value, *expected,
                    floor=adam_bias_correction_ulps(t + 1) * EPS32 * step)
        assert row.passed, row
        assert step > 0.5 * LEARNING_RATE  # it moved
        # Carry the float64 reference on, from JAX's own state, as the report does.
        params = {"p": torch.from_numpy(np.array(value))}
        moments = tuple({"p": torch.from_numpy(np.array(getattr(state.inner_state[0], field)))}
                        for field in ("mu", "nu"))


# (d) trained checkpoints: what a user of the tutorial brings.
@pytest.mark.slow
@pytest.mark.parametrize("when", ["early", "late"])
def test_report_on_a_tutorial_checkpoint_exits_0(checkpoints, when, capsys):
    assert main(["--pth", str(checkpoints[when])]) == 0, capsys.readouterr().out


# Each deliberate bug fails the report, by far, in the rows that check what it breaks. One Adam
# step suffices for the bugs the steps catch; the CLI exits 1 on any failed row (below).
CAUGHT_BY = {
    "fc1-unpermuted": "eval fc1",
    "flax-running-variance": "train bn3.running_var",
    "adam-no-bias-correction": "adam fc1.weight",
    "batchnorm-momentum-0.9": "train bn1.running_mean",
    "spatial-gate-max-avg": "eval cbam1.spatial_attn",
    "max-pool-gradient-to-every-maximum": "grad bn1.weight",
}


def _control_report(state_dict, name) -> Report:
    return run_report(state_dict, seed=SEED, batch_size=BATCH, adam_steps=1,
                      negative_control=name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NEGATIVE_CONTROLS))
def test_negative_control_fails_on_random_weights(state_dict, name):
    rows = {r.name: r for r in _control_report(state_dict, name).rows}
    assert rows[CAUGHT_BY[name]].jax_error > 10 * rows[CAUGHT_BY[name]].bound


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NEGATIVE_CONTROLS))
def test_negative_control_fails_on_a_late_tutorial_checkpoint(checkpoints, name):
    state_dict = torch.load(checkpoints["late"], weights_only=True)
    rows = {r.name: r for r in _control_report(state_dict, name).rows}
    assert rows[CAUGHT_BY[name]].jax_error > 10 * rows[CAUGHT_BY[name]].bound


def test_cli_exits_1_with_a_negative_control(capsys):
    assert main(["--negative-control", "max-pool-gradient-to-every-maximum"]) == 1
    out = capsys.readouterr().out
    assert "negative control: max-pool: the gradient of a tied window sent to every maximum" in out
    assert "FAILED" in out.splitlines()[-1]


# The report CLI.
@pytest.mark.slow
def test_cli_prints_the_eval_logits_first_and_exports(checkpoints, tmp_path):
    out = tmp_path / "exported.pth"
    result = subprocess.run(
        [sys.executable, "-m", "parity", "--pth", str(checkpoints["late"]), "--save-pth",
         str(out), "--batch-size", "4", "--seed", "1"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("start: ")
    assert lines[1].startswith("eval logits on the fixed batch, JAX vs PyTorch float32: max |diff|")
    assert "argmax agrees 4/4" in lines[1]
    assert lines[2].split() == ["comparison", "max", "|f64|", "JAX", "err", "PyTorch", "err",
                                "bound", "result"]
    rows = [line for line in lines if line.endswith(("PASS", "FAIL"))]
    # eval and train: each layer and the fused path's logits; train's running statistics from
    # both paths; the Adam steps' gradients, updates and buffers; train and final eval logits.
    assert len(rows) == ((len(LAYERS) + 1) * 2 + len(BUFFERS) * 3 + len(PARAM_NAMES) * 2 + 2)
    assert all(line.endswith("PASS") for line in rows)

    exported = reference.CBAM_CNN()
    exported.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert int(exported.bn1.num_batches_tracked) == LATE + ADAM_STEPS


def test_cli_exits_1_on_any_failure(monkeypatch, capsys):
    failing = Report("eval logits ...", [Comparison("eval fc2", 1.0, 1e-7, 1.0, 4e-7)],
                     {}, 0, None)
    monkeypatch.setattr("parity.report.run_report", lambda *a, **k: failing)
    monkeypatch.setattr("parity.report.random_state_dict", lambda seed: None)
    monkeypatch.setattr("parity.report.format_table", lambda report: "FAIL")
    assert main(["--seed", "0"]) == 1


def test_cli_rejects_a_checkpoint_of_another_model_in_one_line(tmp_path, capsys):
    pth = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, pth)
    assert main(["--pth", str(pth)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --pth: {pth}: state_dict does not match")
    assert "missing keys: conv1.weight" in err and err.count("\n") == 1


def test_cli_rejects_a_batch_of_one(capsys):
    with pytest.raises(SystemExit):
        main(["--batch-size", "1"])
    assert "--batch-size must be >= 2, got 1" in capsys.readouterr().err


# (d) the JAX-side controls reach both paths of CBAMCNN's blocks. The report's layer rows and
# Adam steps run the reference path (`fused=False`: it records and intercepts module calls);
# its fused rows and training outside the report run `ops.fused.conv_bn_relu_pool`, whose
# BatchNorm, running update and max-pool must carry the same bug.

def _tied_block_inputs():
    """A conv block's arguments where the BatchNorm output has positive exact ties in whole
    2x2 windows (a flat image region: equal conv outputs inside it) and n = 2 x 8 x 8 = 128."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    x[:, 1:7, 1:7, :] = 0.75  # conv outputs at rows/columns 2..5 all equal per channel
    kernel = jnp.asarray(rng.normal(0, 0.3, (3, 3, 3, 4)), jnp.float32)
    conv_bias = jnp.asarray(rng.normal(size=4), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 4), jnp.float32)
    bias = jnp.full((4,), 2.0, jnp.float32)  # the tied windows normalise to > 0
    running = (jnp.zeros(4, jnp.float32), jnp.zeros(4, jnp.float32))
    return jnp.asarray(x), kernel, conv_bias, scale, bias, running


def _block_vjp(ops):
    """(y, running) of the block in training and d sum(y * g) / d(x, kernel), as
    `ops.conv_bn_relu_pool` computes them (`ops`: cbam_jax.ops.fused or .reference)."""
    x, kernel, conv_bias, scale, bias, running = _tied_block_inputs()
    kw = dict(train=True, momentum=0.1, epsilon=1e-5)

    def block(x, kernel):
        return ops.conv_bn_relu_pool(x, kernel, conv_bias, scale, bias, running, **kw)

    (y, updated), vjp = jax.vjp(block, x, kernel)
    g = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)
    return y, updated, vjp((g, jax.tree.map(jnp.zeros_like, updated)))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# Fused vs reference: float32 sums over n = 128 values in other orders, each within
# n * eps32 = 1.5e-5 relative of the exact sum in the worst case; 3e-5 covers a few in a row.
PATHS_TOLERANCE = 3e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flax-running-variance", "max-pool-gradient-to-every-maximum"])
def test_a_control_puts_its_bug_in_the_fused_block_and_the_reference_alike(name):
    normal = _block_vjp(fused)
    with controls.applied(name):
        fast, plain = _block_vjp(fused), _block_vjp(reference_ops)
    # Inside the control the two paths agree (values, running statistics, gradients) ...
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(plain)):
        assert _rel(a, b) < PATHS_TOLERANCE
    np.testing.assert_array_equal(fast[0], normal[0])  # the forward is not what is wrong
    if name == "flax-running-variance":
        # ... and the fused block's running variance is the biased one: (n - 1) / n of it.
        np.testing.assert_allclose(fast[1][1], normal[1][1] * (127 / 128), rtol=PATHS_TOLERANCE)
        assert _rel(fast[2][0], normal[2][0]) < PATHS_TOLERANCE
    else:
        # ... and the tied windows' gradient reaches all four elements, changing the input's.
        assert _rel(fast[2][0], normal[2][0]) > 0.1
