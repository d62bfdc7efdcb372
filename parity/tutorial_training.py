"""Trained checkpoints as the tutorial writes them, for testing the parity report on them.

The tutorial's CBAM_CNN, trained by its loop (model.train(), so dropout on; cross-entropy;
Adam, lr 1e-3; a shuffled loader that keeps the last short batch), then
`torch.save(model.state_dict(), ...)`. The data are scikit-learn's digits (bundled, offline;
cbam_jax.data.load_digits) through the tutorial's test transform. Digits are learnt within a few
hundred steps, so late snapshots hold what long training brings: large weights, many ReLU
zeros, and many max-pool windows with near-equal inputs.
"""
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from cbam_jax.data import load_digits
from parity.pillow_transforms import test_transform
from parity.reference import CBAM_CNN


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits training split as the tutorial's loader yields it: x [N, 3, 32, 32]
    normalised float32 (contiguous, as the loader's collate stacks it), labels [N] int64."""
    dataset = load_digits()
    x = np.ascontiguousarray(np.stack([test_transform(image) for image in dataset.train_images]))
    return torch.from_numpy(x), torch.from_numpy(dataset.train_labels.astype(np.int64))


def train_tutorial_model(seed: int, batch_size: int, snapshot_steps,
                         data=None) -> "dict[int, OrderedDict[str, torch.Tensor]]":
    """Train CBAM_CNN from PyTorch's init (torch.manual_seed(seed)) for max(snapshot_steps)
    steps; returns {step: state_dict} at each of those steps (copies, float32)."""
    snapshot_steps = sorted(set(snapshot_steps))
    if not snapshot_steps or snapshot_steps[0] < 1:
        raise ValueError(f"snapshot_steps must be positive step counts, got {snapshot_steps}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (train-mode BatchNorm), got {batch_size}")
    x, y = data if data is not None else digits_tensors()
    torch.manual_seed(seed)
    model = CBAM_CNN().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    shuffle = torch.Generator().manual_seed(seed)
    snapshots, step = {}, 0
    while step < snapshot_steps[-1]:
        order = torch.randperm(len(x), generator=shuffle)
        batches = [order[i:i + batch_size] for i in range(0, len(x), batch_size)]
        for batch in (b for b in batches if len(b) > 1):  # BatchNorm needs 2 samples
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            step += 1
            if step in snapshot_steps:
                snapshots[step] = OrderedDict((k, v.detach().clone())
                                              for k, v in model.state_dict().items())
            if step == snapshot_steps[-1]:
                break
    return snapshots
