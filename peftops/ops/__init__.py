"""Functional ops (also registered as torch.ops.peftops.*), and their plain-PyTorch references."""
from . import reference
from .bottleneck import adapter_bottleneck
from .bitfit import bias_dropout_add, bias_linear
from .dora import dora_linear
from .ia3 import ia3_glu_linear, ia3_linear
from .lora import lora_linear
from .multi_lora import multi_lora_linear
from .prefix import prefix_attention

__all__ = ["lora_linear", "dora_linear", "multi_lora_linear", "bias_linear", "bias_dropout_add", "ia3_linear",
           "ia3_glu_linear", "adapter_bottleneck", "prefix_attention", "reference"]
