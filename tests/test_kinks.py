"""parity.kinks: which kinks float32 cannot decide, and stopping the gradient there alike in both
frameworks. Budget: about 10 s."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cbam_jax import CBAMCNN
from cbam_jax.train import cross_entropy
from parity import kinks, torch_to_flax
from parity.report import (judge, nchw_to_nhwc, random_batch, random_state_dict,
                           torch_forward, torch_model)

TAU = 1e-6


def _window(values) -> np.ndarray:
    """One 2x2 window [1, 1, 2, 2] with values in row-major order."""
    return np.asarray(values, np.float64).reshape(1, 1, 2, 2)


@pytest.mark.parametrize("values, ambiguous", [
    ([1.0, 1.0 + 1e-7, 0.3, -2.0], True),  # runner-up within tau: float32 may pick either
    ([1.0, 1.0, 0.3, -2.0], False),  # exact tie: identical inputs, left to the first-max rule
    ([1.0, 1.1, 0.3, -2.0], False),  # a clear maximum
    ([-1e-7, -0.5, -0.3, -2.0], True),  # max within tau of 0: ReLU may pass it or not
    ([2e-7, 0.0, -0.3, -2.0], True),  # likewise from above
    ([-0.1, -0.5, -0.3, -2.0], False),  # all clearly negative: no gradient either way
])
def test_pool_window_is_ambiguous_only_within_tau(values, ambiguous):
    mask = kinks.pool_windows(_window(values), TAU)
    assert mask.all() if ambiguous else not mask.any()


def test_odd_trailing_rows_and_columns_belong_to_no_window():
    x = np.zeros((1, 1, 3, 3))  # every window's max is 0: within tau of 0
    mask = kinks.pool_windows(x, TAU)
    assert mask[0, 0, :2, :2].all() and not mask[0, 0, 2, :].any() and not mask[0, 0, :, 2].any()


@pytest.mark.parametrize("values, ambiguous", [
    ([2.0, 2.0 - 1e-7, 1.0], True),  # runner-up within tau
    ([2.0, 2.0, 1.0], True),  # exact tie: JAX shares the gradient, PyTorch gives it to the first
    ([2.0, 1.9, 1.0], False),
    ([5e-7, 0.0, 0.0], True),  # float32 may round the max to 0, and pass nothing
    ([0.0, 0.0, 0.0], False),  # all zero: no gradient past the ReLU either way
])
def test_gate_maximum_is_ambiguous_within_tau_or_when_tied(values, ambiguous):
    mask = kinks.gate_maxima(np.asarray(values).reshape(1, 1, 3), (2,), TAU)
    assert bool(mask.item()) == ambiguous


def test_relu_inputs_within_tau_are_kinks_but_exact_zeros_are_not():
    mask = kinks.relu_inputs(np.asarray([0.0, 5e-7, -5e-7, 1e-3, -1e-3]), TAU)
    np.testing.assert_array_equal(mask, [False, True, True, False, False])


def test_exact_pool_ties_counts_windows_with_a_shared_positive_max():
    x = np.concatenate([_window([2.0, 2.0, 1.0, 0.0]),  # tied
                        _window([0.0, 0.0, 0.0, -1.0]),  # tied at 0: no gradient, not counted
                        _window([2.0, 1.0, 1.0, 0.0])], axis=3)  # the tie is not the max
    assert kinks.exact_pool_ties({"bn1": x, "bn2": x[:, :, :0], "bn3": x[:, :, :0]}) == 1


@pytest.fixture(scope="module")
def setup():
    state_dict = random_state_dict(0)
    x, y = random_batch(0, 4)
    run = torch_forward(torch_model(state_dict, torch.float64), x, train=True)
    return state_dict, x, y, run


def _only(run, name) -> dict[str, np.ndarray]:
    """Masks from `find` with nothing masked except every element at `name`."""
    masks = kinks.find(run.kink_values, {k: 0.0 for k in run.kink_values})
    masks = {k: np.zeros_like(m) for k, m in masks.items()}
    masks[name] = np.ones_like(masks[name])
    return masks


def _torch_grads(state_dict, x, y, masks, dtype=torch.float64) -> dict[str, np.ndarray]:
    model = torch_model(state_dict, dtype)
    run = torch_forward(model, x, train=True)
    kinks.stop_torch_gradients(run.kink_tensors, masks)
    F.cross_entropy(run.logits, y).backward()
    return {name: p.grad.numpy() for name, p in model.named_parameters()}


@jax.jit
def _jax_loss_grad(params, batch_stats, x, labels, flax_masks):
    def loss(params):
        with nn.intercept_methods(kinks.stop_flax_gradients(flax_masks)):
            logits, _ = CBAMCNN(dropout_rate=0.0, fused=False).apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True,
                mutable=["batch_stats"])
        return cross_entropy(logits, labels)

    return jax.grad(loss)(params)


def _jax_grads(state_dict, x, y, masks):
    variables = torch_to_flax(state_dict)
    return _jax_loss_grad(variables["params"], variables["batch_stats"], nchw_to_nhwc(x),
                          jnp.asarray(y.numpy()),
                          jax.tree.map(jnp.asarray, kinks.flax_masks(masks)))


def test_stopping_every_bn1_output_leaves_no_gradient_below_it_in_either_framework(setup):
    state_dict, x, y, run = setup
    masks = _only(run, "bn1")
    torch_grads = _torch_grads(state_dict, x, y, masks)
    jax_grads = _jax_grads(state_dict, x, y, masks)
    for name in ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"):
        assert not torch_grads[name].any(), name
    for leaf in ("conv1", "bn1"):
        assert not any(np.asarray(g).any() for g in jax.tree.leaves(jax_grads[leaf])), leaf
    assert np.abs(torch_grads["cbam1.spatial_attn.conv.weight"]).max() > 1e-4  # above it flows
    assert np.abs(jax_grads["cbam1"]["spatial_attn"]["conv"]["kernel"]).max() > 1e-4


@pytest.mark.parametrize("site", ["cbam3.channel_attn.max_pool", "cbam3.channel_attn.fc.0",
                                  "cbam3.spatial_attn.conv", "fc1"])
def test_a_stopped_site_changes_both_frameworks_gradients_alike(setup, site):
    """Stopping the gradient at one site moves the gradient of conv3 (below it) in PyTorch and in
    JAX by the same amount, judged as the report judges (float64 referee, float32 PyTorch
    yardstick)."""
    state_dict, x, y, run = setup
    none = {k: np.zeros_like(m) for k, m in _only(run, "fc1").items()}
    masks = _only(run, site)
    name = "conv3.weight"
    torch_changes = [_torch_grads(state_dict, x, y, masks, dtype)[name]
                     - _torch_grads(state_dict, x, y, none, dtype)[name]
                     for dtype in (torch.float32, torch.float64)]
    kernel = lambda g: np.asarray(g["conv3"]["kernel"]).transpose(3, 2, 0, 1)  # HWIO -> OIHW
    jax_change = kernel(_jax_grads(state_dict, x, y, masks)) - \
        kernel(_jax_grads(state_dict, x, y, none))
    row = judge(site, jax_change, *torch_changes)
    assert row.scale > 1e-5  # the site mattered
    assert row.passed, row
