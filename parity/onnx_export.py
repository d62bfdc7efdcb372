"""ONNX export through the PyTorch twin: CBAMCNN's variables -> the tutorial's `CBAM_CNN`
(`flax_to_torch`, exact) -> `torch.onnx.export`, checked with onnxruntime against JAX.

The ONNX model is the tutorial's network, with PyTorch's conventions: float32 images after the
test transform (ToTensor + Normalize), NCHW [batch, 3, 32, 32] with any batch, to logits
[batch, 10], always in float32. Its adaptive pools are global pools at fixed shapes, so the
exporter meets only standard ONNX ops (listed in the README, "Use a trained model"). Needs the
`export` extra (onnx, onnxscript, onnxruntime) besides torch.
"""
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from parity.convert import flax_to_torch
from parity.reference import CBAM_CNN
from parity.report import Comparison, judge, nhwc_to_nchw, torch_model

INPUT_NAME, OUTPUT_NAME = "images", "logits"


def export_onnx(variables, path) -> Path:
    """Write CBAMCNN variables ({'params', 'batch_stats'}) as one self-contained ONNX file of
    `CBAM_CNN` in eval mode, with a dynamic batch axis (torch.export-based exporter)."""
    model = CBAM_CNN()
    model.load_state_dict(flax_to_torch(variables), strict=True)
    model.eval()  # dropout off, BatchNorm on its running statistics
    path = Path(path)
    torch.onnx.export(model, (torch.zeros(2, 3, 32, 32),), path, input_names=[INPUT_NAME],
                      output_names=[OUTPUT_NAME], dynamo=True, external_data=False,
                      dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    return path


def onnx_logits(path, images_nchw: np.ndarray) -> np.ndarray:
    """Run the ONNX model with onnxruntime (CPU) on normalised float32 images [B, 3, 32, 32]."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.asarray(images_nchw, np.float32)})[0]


def check_onnx(path, variables, images_nhwc: np.ndarray, jax_logits: np.ndarray
               ) -> list[Comparison]:
    """onnxruntime's and JAX's logits of normalised float32 images [B, 32, 32, 3], each judged
    as the parity report judges a row: against the tutorial's CBAM_CNN in float64 with these
    `variables`, within what PyTorch float32's own error there allows (parity.report's
    float32_bound). Three float32 implementations (XLA, ATen, ONNX Runtime) sum in different
    orders ten layers deep: they agree to rounding, not bitwise. Both rows must pass."""
    x = nhwc_to_nchw(images_nhwc)
    state_dict = flax_to_torch(variables)
    with torch.no_grad():
        torch32, torch64 = (torch_model(state_dict, dtype).eval()(torch.from_numpy(x).to(dtype))
                            for dtype in (torch.float32, torch.float64))
    return [judge("ONNX Runtime logits", onnx_logits(path, x), torch32, torch64),
            judge("JAX logits", jax_logits, torch32, torch64)]


def onnx_ops(path) -> Counter:
    """How many nodes of each op type (domain-qualified outside the standard one) the graph has."""
    import onnx

    graph = onnx.load(str(path)).graph
    return Counter(f"{node.domain}::{node.op_type}" if node.domain else node.op_type
                   for node in graph.node)
