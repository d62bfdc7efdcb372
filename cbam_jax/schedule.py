"""ReduceLROnPlateau with PyTorch's semantics, as pure functions over a small host-side state.

The tutorial steps `torch.optim.lr_scheduler.ReduceLROnPlateau(mode='min', patience=3,
factor=0.5)` once per epoch on the test loss. The metric is a host float at that point, so the
schedule runs on the host in Python floats (float64, as PyTorch's does), and the training loop
writes the resulting learning rate into the optimizer state (`optax.inject_hyperparams`).

`optax.contrib.reduce_on_plateau` is not a drop-in replacement: it reduces when its plateau
count *reaches* `patience`, PyTorch when the number of bad epochs *exceeds* it (one epoch later),
and it scales updates instead of comparing old and new learning rates against `eps`.
"""
import dataclasses
import math
from typing import NamedTuple


class PlateauState(NamedTuple):
    """Everything PyTorch's scheduler carries between steps (its `state_dict` minus constants)."""

    lr: float
    best: float
    num_bad_epochs: int = 0
    cooldown_counter: int = 0


@dataclasses.dataclass(frozen=True)
class ReduceLROnPlateau:
    """PyTorch's defaults; `init(lr)` then `state = step(state, metric)` once per epoch."""

    mode: str = "min"
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: str = "rel"
    cooldown: int = 0
    min_lr: float = 0.0
    eps: float = 1e-8

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if self.threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {self.threshold_mode!r}")
        if not 0.0 <= self.factor < 1.0:
            raise ValueError(f"factor must be in [0, 1) (a reduction), got {self.factor}")
        if self.patience < 0 or self.cooldown < 0:
            raise ValueError(f"patience and cooldown must be >= 0, got {self.patience}, "
                             f"{self.cooldown}")

    def init(self, lr: float) -> PlateauState:
        worst = math.inf if self.mode == "min" else -math.inf
        return PlateauState(lr=float(lr), best=worst)

    def is_better(self, current: float, best: float) -> bool:
        if self.mode == "min" and self.threshold_mode == "rel":
            return current < best * (1.0 - self.threshold)
        if self.mode == "min":
            return current < best - self.threshold
        if self.threshold_mode == "rel":
            return current > best * (1.0 + self.threshold)
        return current > best + self.threshold

    def step(self, state: PlateauState, metric: float) -> PlateauState:
        """One epoch: the same branch order as `torch.optim.lr_scheduler.ReduceLROnPlateau.step`."""
        current = float(metric)
        lr, best, bad, cooldown = state
        if self.is_better(current, best):
            best, bad = current, 0
        else:
            bad += 1
        if cooldown > 0:  # bad epochs during cooldown do not count
            cooldown -= 1
            bad = 0
        if bad > self.patience:
            new_lr = max(lr * self.factor, self.min_lr)
            if lr - new_lr > self.eps:  # below eps the change is ignored, as in PyTorch
                lr = new_lr
            cooldown, bad = self.cooldown, 0
        return PlateauState(lr, best, bad, cooldown)


def tutorial_plateau() -> ReduceLROnPlateau:
    """The tutorial's scheduler: mode 'min', patience 3, factor 0.5, PyTorch defaults otherwise."""
    return ReduceLROnPlateau(mode="min", patience=3, factor=0.5)
