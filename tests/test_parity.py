"""The parity suite: cbam_jax.CBAMCNN vs the tutorial's CBAM_CNN in float32 on CPU.

Each comparison's tolerance, and why it holds, is in parity/report.py (FORWARD, GRADIENT,
ADAM_UPDATE, ...). Budget: about 60 s on 2 CPU cores, most of it the CLI run and the Adam steps.
"""
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from cbam_jax import CBAM, CBAMCNN, ChannelAttention, SpatialAttention
from cbam_jax.train import make_optimizer
from parity import reference, torch_to_flax
from parity.__main__ import main
from parity.report import (FORWARD, LAYERS, Comparison, adam_comparisons, compare,
                           forward_comparisons, gradient_comparisons, nchw_to_nhwc,
                           nhwc_to_nchw, random_batch, random_state_dict, torch_model)

SEED = 0
BATCH = 16  # for train mode, gradients and Adam; eval uses the sizes the issue names
ADAM_STEPS = 5
with torch.device("meta"):
    STATE_KEYS = list(reference.CBAM_CNN().state_dict())
PARAM_NAMES = [k for k in STATE_KEYS if not k.rsplit(".", 1)[-1].startswith(("running",
                                                                               "num_batches"))]


@pytest.fixture(scope="module")
def state_dict():
    """PyTorch init plus random BatchNorm affine params and running stats (so BN is exercised).

    Max-pool gradients are discontinuous where a window's top two values tie within float32
    rounding; this seed has no such window at BATCH (smallest top-two gap ~1e-6 relative is
    what a bad seed looks like; see the report's docstring)."""
    return random_state_dict(SEED)


def _failures(rows: list[Comparison]) -> list[str]:
    return [f"{r.name}: max abs {r.max_abs:.3e} > tol {r.tol:.2e} ({r.why})"
            for r in rows if not r.passed]


# (a) eval-mode forward, layer by layer, at the batch sizes the issue names.
@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_eval_forward_matches_layer_by_layer(state_dict, batch_size):
    x, _ = random_batch(SEED + batch_size, batch_size)
    rows = forward_comparisons(state_dict, x, train=False)
    assert [r.name for r in rows] == [f"eval {name}" for name in LAYERS]  # fc2 = the logits
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
        expected = torch_layer(x)
    got = jax_layer.apply({"params": _torch_to_flax_layer(torch_layer)}, nchw_to_nhwc(x))
    row = compare(layer, nhwc_to_nchw(got), expected, FORWARD)
    assert row.passed, row


# (b) train-mode forward: batch statistics, updated running stats, dropout off...
def test_train_forward_and_running_stats_match(state_dict):
    x, _ = random_batch(SEED, BATCH)
    rows = forward_comparisons(state_dict, x, train=True)
    names = [r.name for r in rows]
    assert "train bn3.running_var" in names and "train bn1.num_batches_tracked" in names
    assert not _failures(rows)


# ...and dropout on, with the JAX model's own mask injected into the PyTorch model.
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
            return h * keep / 0.5

    tm = torch_model(state_dict)
    tm.dropout = SameMask()
    row = compare("train logits, dropout 0.5", logits, tm.train()(x).detach(), FORWARD)
    assert row.passed, row


# (c) gradients of the mean cross-entropy w.r.t. every parameter.
@pytest.fixture(scope="module")
def gradient_rows(state_dict):
    x, y = random_batch(SEED, BATCH)
    return {r.name.removeprefix("grad "): r for r in gradient_comparisons(state_dict, x, y)}


@pytest.mark.parametrize("name", PARAM_NAMES)
def test_gradient_matches(gradient_rows, name):
    row = gradient_rows[name]
    assert row.passed, row


# (d) 5 Adam steps (lr 1e-3) on identical batches.
@pytest.fixture(scope="module")
def adam_rows(state_dict):
    batches = [random_batch(SEED + 1 + i, BATCH) for i in range(ADAM_STEPS)]
    rows, _ = adam_comparisons(state_dict, batches, random_batch(SEED, BATCH)[0])
    return rows


@pytest.mark.parametrize("name", STATE_KEYS + ["train logits", "eval logits"])
def test_after_adam_steps_matches(adam_rows, name):
    (row,) = [r for r in adam_rows if r.name.startswith(f"adam{ADAM_STEPS} {name}")]
    assert row.passed, row


def test_adam_update_rule_matches_torch_on_identical_gradients():
    """make_optimizer alone, fed PyTorch's gradients: any gap is the update rule's, not the
    model's, so the bound is float32 rounding of lr-sized steps."""
    g = torch.Generator().manual_seed(0)
    # Magnitudes from 1e-9 (below eps) to 1, signs changing between steps.
    scales = torch.logspace(-9, 0, 50)
    start = torch.randn(50, generator=g)
    grads = [torch.randn(50, generator=g) * scales for _ in range(ADAM_STEPS)]

    p = start.clone().requires_grad_()
    opt = torch.optim.Adam([p], lr=1e-3)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()

    tx = make_optimizer(1e-3)
    params = jnp.asarray(start.numpy())
    state = tx.init(params)
    for grad in grads:
        updates, state = tx.update(jnp.asarray(grad.numpy()), state, params)
        params = optax.apply_updates(params, updates)
    # A few float32 ulps of the parameter (observed: 1 ulp); a wrong rule is off by >= 1e-5.
    np.testing.assert_allclose(np.asarray(params), p.detach().numpy(), rtol=5e-7, atol=1e-9)
    assert not np.allclose(np.asarray(params), start.numpy(), rtol=0, atol=1e-4)  # it moved


# The suite catches the places where the frameworks differ.
def test_fc1_without_the_flatten_permutation_fails_the_logits_check(state_dict):
    x, _ = random_batch(SEED, 7)
    variables = torch_to_flax(state_dict)
    naive = state_dict["fc1.weight"].numpy().T  # [(C, H, W), 512]: rows in the wrong order
    broken = {**variables, "params": {**variables["params"],
                                      "fc1": {**variables["params"]["fc1"],
                                              "kernel": jnp.asarray(naive)}}}
    with torch.no_grad():
        expected = torch_model(state_dict).eval()(x)
    good = compare("logits", CBAMCNN().apply(variables, nchw_to_nhwc(x)), expected, FORWARD)
    bad = compare("logits", CBAMCNN().apply(broken, nchw_to_nhwc(x)), expected, FORWARD)
    assert good.passed
    assert not bad.passed and bad.max_abs > 100 * bad.tol


# The report CLI.
def test_cli_from_a_tutorial_checkpoint_passes_and_exports(tmp_path):
    torch.manual_seed(3)
    tutorial = reference.CBAM_CNN()
    tutorial.train()(torch.randn(8, 3, 32, 32))  # non-default running stats, counter 1
    pth, out = tmp_path / "tutorial.pth", tmp_path / "exported.pth"
    torch.save(tutorial.state_dict(), pth)
    result = subprocess.run(
        [sys.executable, "-m", "parity", "--pth", str(pth), "--save-pth", str(out),
         "--batch-size", "4", "--seed", "1"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("comparison") and "max abs diff" in line for line in lines)
    rows = [line for line in lines if line.endswith(("PASS", "FAIL"))]
    assert any(line.startswith("eval fc2 ") for line in rows)
    assert any(line.startswith("grad fc1.weight ") for line in rows)
    assert any(line.startswith("adam5 bn3.running_var ") for line in rows)
    assert rows and all(line.endswith("PASS") for line in rows)

    exported = reference.CBAM_CNN()
    exported.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert int(exported.bn1.num_batches_tracked) == 1 + ADAM_STEPS


def test_cli_exits_nonzero_on_any_failure(monkeypatch, capsys):
    failing = [Comparison("eval fc2", 1.0, 1.0, 1e-5)]
    monkeypatch.setattr("parity.__main__.run_report", lambda *a, **k: (failing, None))
    monkeypatch.setattr("parity.__main__.random_state_dict", lambda seed: None)
    assert main(["--seed", "0"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_cli_rejects_a_checkpoint_of_another_model(tmp_path):
    pth = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, pth)
    with pytest.raises(ValueError, match="missing keys: conv1.weight"):
        main(["--pth", str(pth)])
