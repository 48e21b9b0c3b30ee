"""Functional ops (also registered as torch.ops.peftops.*), and their plain-PyTorch references."""
from . import reference
from .lora import lora_linear

__all__ = ["lora_linear", "reference"]
