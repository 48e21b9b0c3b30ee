"""nn.Module drop-ins computed by peftops kernels."""
from .lora import LoraLinear

__all__ = ["LoraLinear"]
