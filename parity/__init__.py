"""The PyTorch side of cbam-jax: the tutorial's modules, exact weight conversion, parity checks."""
from parity.convert import flax_to_torch, load_checkpoint, load_pth, save_pth, torch_to_flax

__all__ = ["flax_to_torch", "load_checkpoint", "load_pth", "save_pth", "torch_to_flax"]
