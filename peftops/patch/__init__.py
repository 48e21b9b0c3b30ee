"""Model surgery: patch, unpatch, merge and trainable_parameters (../shared/SPEC.md)."""
from torch import nn

from ..config import AdapterConfig, BitFitConfig, IA3Config, LoraConfig, PrefixConfig
from . import adapter, backend, bitfit, bottleneck, prefix

_PATCHERS = {LoraConfig: adapter.patch_lora, IA3Config: adapter.patch_ia3, BitFitConfig: bitfit.patch_bitfit,
             AdapterConfig: bottleneck.patch_adapter, PrefixConfig: prefix.patch_prefix}


def patch(model: nn.Module, config=None, *, adapter_name: str = "default") -> nn.Module:
    """Adapter mode with a config (peftops layers in place, base frozen); backend mode without one on a peft model
    (peft's LoRA or IA3 layers compute through peftops kernels). Returns the same object."""
    adapter.check_model("patch", model)
    if config is None:
        return backend.patch_peft(model)
    if type(config) not in _PATCHERS:
        raise TypeError(f"config must be a peftops config such as peftops.LoraConfig, got {type(config).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
    if backend.is_peft_model(model):
        raise ValueError("model is a peft.PeftModel: call peftops.patch(model) without a config (backend mode)")
    config.__post_init__()  # validated again: a config's fields may have been changed since it was built
    return _PATCHERS[type(config)](model, config, adapter_name)


def unpatch(model: nn.Module) -> nn.Module:
    """Back to the original modules (or peft's forwards) and requires_grad flags."""
    adapter.check_model("unpatch", model)
    state = adapter.get_state(model)
    if isinstance(state, bitfit.BitFitState):
        return bitfit.unpatch_bitfit(model)
    if isinstance(state, bottleneck.BottleneckState):
        return bottleneck.unpatch_adapter(model)
    if isinstance(state, prefix.PrefixState):
        return prefix.unpatch_prefix(model)
    if state is not None:
        return adapter.unpatch_layers(model)
    if backend.is_patched_peft(model):
        return backend.unpatch_peft(model)
    raise ValueError(f"{type(model).__name__} is not patched by peftops")


def merge(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and remove their layers. Adapter mode returns the same model with
    its original modules and requires_grad flags; on a peft model, returns peft's `merge_and_unload()`. BitFit has
    nothing to fold (its trained biases are the model's own): merge unpatches it, keeping the biases."""
    adapter.check_model("merge", model)
    state = adapter.get_state(model)
    if isinstance(state, bitfit.BitFitState):
        return bitfit.unpatch_bitfit(model)
    if isinstance(state, bottleneck.BottleneckState):
        # The adapter is a nonlinear function of the sublayer's output: there is no weight to fold it into.
        raise ValueError("bottleneck adapters cannot be merged into the base weights (act(down(h)) is nonlinear); "
                         "keep the model patched, or peftops.unpatch(model) to drop the adapters")
    if isinstance(state, prefix.PrefixState):  # folds prefix_projection into plain prefixes; stays patched
        return prefix.merge_prefix(model)
    if state is not None:
        return adapter.unpatch_layers(model, merge=True)
    if backend.is_peft_model(model):
        backend.unpatch_peft(model)
        return model.merge_and_unload()
    raise ValueError(f"{type(model).__name__} is not patched by peftops and is not a peft model: nothing to merge")


def trainable_parameters(model: nn.Module) -> tuple:
    """(trainable, total) parameter element counts; shared (tied) parameters count once."""
    adapter.check_model("trainable_parameters", model)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
