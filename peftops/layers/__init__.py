"""nn.Module drop-ins computed by peftops kernels."""
from .bottleneck import BottleneckAdapter
from .ia3 import Ia3Linear
from .lora import LoraLinear

__all__ = ["BottleneckAdapter", "Ia3Linear", "LoraLinear"]
