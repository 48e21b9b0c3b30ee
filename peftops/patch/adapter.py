"""Adapter mode: peftops layers inserted in place of the targeted modules of a plain model."""
from dataclasses import dataclass

from torch import nn

from ..config import LoraConfig
from ..layers.lora import LoraLinear
from .targets import default_lora_targets, find_lora_targets

STATE_ATTR = "_peftops_patch"


@dataclass
class PatchState:
    """What unpatch needs: the replaced module names and every parameter's requires_grad before patching."""
    config: LoraConfig
    adapter_name: str
    layer_names: list
    requires_grad: list  # [(parameter, flag)]


def get_state(model: nn.Module):
    return model.__dict__.get(STATE_ATTR)


def _set_submodule(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def patch_lora(model: nn.Module, config: LoraConfig, adapter_name: str) -> nn.Module:
    state = get_state(model)
    if state is not None:
        raise ValueError(f"model is already patched by peftops (adapter {state.adapter_name!r}); "
                         "call peftops.unpatch(model) first")
    present = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    if present:
        raise ValueError(f"model already holds peftops LoRA layers at {present}; patching again would stack adapters")
    explicit = config.target_modules is not None
    targets = config.target_modules if explicit else default_lora_targets(model)
    found = find_lora_targets(model, targets, explicit)  # validates everything before the model is touched

    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    layers = {name: LoraLinear(module, config.r, config.scaling, config.dropout) for name, module in found}
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    # Bias training as peft's: "all" trains every bias of the model, "lora_only" those of the adapted layers.
    if config.bias == "all":
        for n, p in model.named_parameters():
            if n == "bias" or n.endswith(".bias"):
                p.requires_grad_(True)
    elif config.bias == "lora_only":
        for layer in layers.values():
            if layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)
    model.__dict__[STATE_ATTR] = PatchState(config, adapter_name, list(layers), flags)
    return model


def unpatch_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    state = get_state(model)
    for name in state.layer_names:
        layer = model.get_submodule(name)
        if merge:
            layer.merge()
        _set_submodule(model, name, layer.base_layer)
    for p, flag in state.requires_grad:
        p.requires_grad_(flag)
    del model.__dict__[STATE_ATTR]
    return model
