"""nn.Module drop-ins computed by peftops kernels."""
from .ia3 import Ia3Linear
from .lora import LoraLinear

__all__ = ["Ia3Linear", "LoraLinear"]
