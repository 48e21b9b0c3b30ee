"""Adapter files: LoRA and IA3 in peft's format (adapter_config.json + adapter_model.safetensors), BitFit in our own
(bitfit_config.json + adapter_model.safetensors, docs/formats.md)."""
from .adapters import load_adapter, save_adapter
from .peft_format import read_weights

__all__ = ["load_adapter", "read_weights", "save_adapter"]
