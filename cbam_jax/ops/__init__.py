"""The layers' arithmetic, in two layers, as pure array functions that the Linen modules
(layers.py, models.py, resnet.py) and the NNX ones (nnx.py) share:

- `reference`: what the layers compute, written plainly (CBAM's gates, BatchNorm with
  PyTorch's semantics, the conv -> BatchNorm -> ReLU -> max-pool block, max-pool, the Dense
  contraction, input checks); read it against the paper and the tutorial;
- `fused`: faster forms of those functions (hand-written gradients, BatchNorm folded into the
  conv, convolutions as matmuls, per-backend choices), each naming the reference function it
  equals and the measurement that keeps it.

A layer runs `fused` with `fused=True` (the default) and `reference` with `fused=False`.
`reference` imports nothing from `fused`.
"""
from cbam_jax.ops import fused, reference

__all__ = ["fused", "reference"]
