"""ReduceLROnPlateau: the lr sequence equals PyTorch's, exactly, on many metric sequences.

Both sides compute in Python floats (float64), so the comparison is exact equality, not a
tolerance. Runtime: about 5 s (hypothesis: 200 examples of at most 40 epochs).
"""
import math

import jax.numpy as jnp
import optax
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cbam_jax.schedule import PlateauState, ReduceLROnPlateau, tutorial_plateau


def torch_lrs(metrics, lr=1e-3, **kwargs):
    """The learning rate after each `scheduler.step(metric)` of PyTorch's own scheduler."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kwargs)
    lrs = []
    for m in metrics:
        scheduler.step(m)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def our_lrs(metrics, lr=1e-3, **kwargs):
    schedule = ReduceLROnPlateau(**kwargs)
    state = schedule.init(lr)
    lrs = []
    for m in metrics:
        state = schedule.step(state, m)
        lrs.append(state.lr)
    return lrs


TUTORIAL = dict(mode="min", patience=3, factor=0.5)


def test_tutorial_plateau_is_pytorch_min_patience_3_factor_half_with_defaults():
    s = tutorial_plateau()
    assert (s.mode, s.patience, s.factor, s.threshold, s.threshold_mode, s.cooldown, s.min_lr,
            s.eps) == ("min", 3, 0.5, 1e-4, "rel", 0, 0.0, 1e-8)


def test_constant_loss_halves_lr_every_fifth_epoch_after_the_first():
    # Epoch 1 sets `best`; epochs 2-5 are 4 bad epochs > patience 3: the reduction lands on epoch 5.
    lrs = our_lrs([1.0] * 14, **TUTORIAL)
    assert lrs == torch_lrs([1.0] * 14, **TUTORIAL)
    assert lrs == [1e-3] * 4 + [5e-4] * 4 + [2.5e-4] * 4 + [1.25e-4] * 2


def test_decreasing_loss_never_lowers_lr():
    metrics = [2.0 * 0.9**i for i in range(30)]
    assert our_lrs(metrics, **TUTORIAL) == torch_lrs(metrics, **TUTORIAL) == [1e-3] * 30


def test_noisy_plateau_matches_pytorch():
    metrics = [1.0, 0.8, 0.7, 0.71, 0.69, 0.72, 0.70, 0.695, 0.71, 0.68, 0.70, 0.69, 0.70, 0.71,
               0.7, 0.66, 0.67, 0.68, 0.67, 0.69, 0.70]
    lrs = our_lrs(metrics, **TUTORIAL)
    assert lrs == torch_lrs(metrics, **TUTORIAL)
    assert lrs[-1] < 1e-3  # the sequence does plateau


def test_tie_exactly_at_the_relative_threshold_is_not_an_improvement():
    best = 0.5
    at = best * (1.0 - 1e-4)  # `current < best * (1 - threshold)` is False for equality
    below = math.nextafter(at, 0.0)
    for metrics in ([best] + [at] * 6, [best] + [below] * 6, [best, at, below, at, at, at, at]):
        assert our_lrs(metrics, **TUTORIAL) == torch_lrs(metrics, **TUTORIAL)
    assert our_lrs([best] + [at] * 4, **TUTORIAL)[-1] == 5e-4
    assert our_lrs([best] + [below] * 4, **TUTORIAL)[-1] == 1e-3


def test_reductions_smaller_than_eps_are_ignored_like_pytorch():
    # From lr 1e-7 halving stops once old - new <= 1e-8.
    metrics = [1.0] * 60
    lrs = our_lrs(metrics, lr=1e-7, **TUTORIAL)
    assert lrs == torch_lrs(metrics, lr=1e-7, **TUTORIAL)
    assert min(lrs) > 1e-8 and lrs[-1] == lrs[-5]


def test_cooldown_min_lr_max_mode_and_abs_threshold_match_pytorch():
    metrics = [1.0, 1.0, 0.9, 0.95, 0.99, 1.2, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9] * 2
    for kwargs in (dict(cooldown=2, patience=1, factor=0.5),
                   dict(min_lr=3e-4, patience=0, factor=0.5),
                   dict(mode="max", patience=2, factor=0.3),
                   dict(threshold_mode="abs", threshold=0.05, patience=1),
                   dict(mode="max", threshold_mode="abs", threshold=0.01, patience=0, cooldown=1)):
        assert our_lrs(metrics, **kwargs) == torch_lrs(metrics, **kwargs), kwargs


metric_values = st.one_of(
    st.floats(min_value=0.0, max_value=3.0, allow_nan=False),
    st.sampled_from([0.5, 0.5 * (1 - 1e-4), 1.0, float("nan"), float("inf")]),  # ties, non-finite
)


@settings(max_examples=200, deadline=None)
@given(metrics=st.lists(metric_values, max_size=40),
       lr=st.floats(min_value=1e-9, max_value=1.0),
       mode=st.sampled_from(["min", "max"]),
       threshold_mode=st.sampled_from(["rel", "abs"]),
       threshold=st.sampled_from([0.0, 1e-4, 0.01, 0.1]),
       patience=st.integers(0, 5), cooldown=st.integers(0, 3),
       factor=st.sampled_from([0.1, 0.5, 0.9]),
       min_lr=st.sampled_from([0.0, 1e-6, 1e-4]))
def test_property_any_sequence_and_settings_match_pytorch(metrics, lr, **kwargs):
    assert our_lrs(metrics, lr=lr, **kwargs) == torch_lrs(metrics, lr=lr, **kwargs)


def test_state_is_a_plain_value_that_steps_purely():
    schedule = tutorial_plateau()
    state = schedule.init(1e-3)
    assert state == PlateauState(lr=1e-3, best=math.inf, num_bad_epochs=0, cooldown_counter=0)
    after = schedule.step(state, 0.7)
    assert state.best == math.inf and after == PlateauState(1e-3, 0.7, 0, 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="mean"), "mode"), (dict(threshold_mode="pct"), "threshold_mode"),
    (dict(factor=1.0), "factor"), (dict(patience=-1), "patience")])
def test_invalid_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReduceLROnPlateau(**kwargs)


def optax_contrib_lrs(metrics, lr=1e-3, patience=3, factor=0.5):
    """Effective lr of optax.contrib.reduce_on_plateau (it scales updates) after each metric."""
    tx = optax.contrib.reduce_on_plateau(factor=factor, patience=patience, rtol=1e-4, atol=0.0)
    state = tx.init(jnp.zeros(1))
    lrs = []
    for m in metrics:
        _, state = tx.update(jnp.zeros(1), state, value=jnp.asarray(m))
        lrs.append(lr * float(state.scale))
    return lrs


def test_optax_contrib_reduce_on_plateau_reduces_one_epoch_earlier_than_pytorch():
    # optax reduces when its plateau count reaches `patience` (== 3), PyTorch when bad epochs
    # exceed it (> 3): on a constant loss optax halves on epoch 4, PyTorch on epoch 5.
    metrics = [1.0] * 6
    optax_lrs = optax_contrib_lrs(metrics)
    assert torch_lrs(metrics, **TUTORIAL) == our_lrs(metrics, **TUTORIAL) == [1e-3] * 4 + [5e-4] * 2
    assert optax_lrs[3] == pytest.approx(5e-4) and optax_lrs[:3] == pytest.approx([1e-3] * 3)
    assert optax_lrs != our_lrs(metrics, **TUTORIAL)
