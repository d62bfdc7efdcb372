"""cbam-jax: CBAM attention (Woo et al., 2018) and the tutorial's CBAM CNN in JAX/Flax."""
from cbam_jax.layers import CBAM, CBAM_PRESETS, BatchNorm, ChannelAttention, SpatialAttention
from cbam_jax.models import CBAMCNN, named_leaves, parameter_report, torch_style_name
from cbam_jax.resnet import (CBAMResNet, cbam_resnet18, cbam_resnet34, cbam_resnet50,
                             create_model)
from cbam_jax.ops import max_pool_2x2

__version__ = "0.1.0"

__all__ = [
    "CBAM", "BatchNorm", "CBAMCNN", "ChannelAttention", "SpatialAttention",
    "max_pool_2x2", "named_leaves", "parameter_report", "torch_style_name",
    "CBAM_PRESETS", "CBAMResNet", "cbam_resnet18", "cbam_resnet34", "cbam_resnet50", "create_model",
]
