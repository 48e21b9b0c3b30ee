"""peftops: fused C++/CUDA kernels for parameter-efficient fine-tuning. Public API: ../shared/SPEC.md."""
from ._extension import backends
from . import layers, ops, profiling
from .config import AdapterConfig, BitFitConfig, IA3Config, LoraConfig, PrefixConfig
from .io import load_adapter, save_adapter
from .patch import merge, patch, trainable_parameters, unpatch

__all__ = ["backends", "ops", "layers", "patch", "unpatch", "merge", "save_adapter", "load_adapter",
           "trainable_parameters", "LoraConfig", "PrefixConfig", "AdapterConfig", "BitFitConfig", "IA3Config"]
__version__ = "0.1.0"
