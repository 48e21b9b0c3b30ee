"""Adapter files: LoRA in peft's format (adapter_config.json + adapter_model.safetensors)."""
from .peft_format import load_adapter, read_weights, save_adapter

__all__ = ["load_adapter", "read_weights", "save_adapter"]
