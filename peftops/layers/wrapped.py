"""What the peftops layers share about the layer they wrap (nn.Linear or transformers' GPT-2 Conv1D): its weight
as [out, in], the adapters' dtype over it, and what to do when its weight is made trainable."""
import warnings

import torch
from torch import nn


def conv1d_class():
    """transformers' Conv1D (weight stored [in, out]), or None when transformers is not installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_supported(module: nn.Module) -> bool:
    conv1d = conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def wrapped_shape(base_layer: nn.Module, owner: str):
    """(out_features, in_features) of a base layer the peftops layer `owner` wraps; a clear error for any other."""
    if not is_supported(base_layer):
        raise ValueError(f"{owner} wraps nn.Linear or transformers' Conv1D, not {type(base_layer).__name__}")
    if not base_layer.weight.is_floating_point():
        raise ValueError(f"{owner} needs a floating-point base weight, got {base_layer.weight.dtype}")
    return base_weight(base_layer).shape


def base_weight(module: nn.Module) -> torch.Tensor:
    """The base weight as [out, in]: Conv1D's is stored [in, out], so it is a transposed view (no copy)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """As peft's autocast_adapter_dtype: adapters over a float16 / bfloat16 base are float32 parameters (cast to the
    base's dtype for each forward), so training updates and saved files are float32."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def cast_to(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return p if p.dtype == dtype else p.to(dtype)


def _moves_nothing(module: nn.Module, x) -> bool:
    """accelerate's AlignDevicesHook without offloading, over the module's own forward, when x and the weights are
    already on its execution device: the hook would move nothing (a device_map over several devices puts one on
    every layer)."""
    hook, old = getattr(module, "_hf_hook", None), module.__dict__.get("_old_forward")
    weight, device = getattr(module, "weight", None), getattr(hook, "execution_device", None)
    return (type(hook).__name__ == "AlignDevicesHook" and not hook.offload and x is not None
            and getattr(old, "__func__", None) is type(module).forward
            and (weight is None or isinstance(weight, torch.Tensor) and weight.device == x.device)
            and (device is None or torch.device(device) == x.device))


def intercepted(module: nn.Module, x=None) -> bool:
    """Whether calling `module` on x runs more than its class's forward: hooks of its own or global ones, or a forward
    replaced on the instance (accelerate's offload hooks do that, and load the weight there). The fused ops read the
    weights and never call the module, so they would skip all of it."""
    hooks = nn.modules.module
    replaced = "forward" in module.__dict__ or getattr(module, "_hf_hook", None) is not None
    return bool(module._forward_hooks or module._forward_pre_hooks or (replaced and not _moves_nothing(module, x))
                or getattr(hooks, "_global_forward_hooks", None) or getattr(hooks, "_global_forward_pre_hooks", None))


def plain_base(base: nn.Module, x) -> bool:
    """Whether calling the base layer on x computes exactly x W^T + b and nothing else (nn.Linear's or Conv1D's own
    forward, no hooks), so that a fused op may read its weights instead."""
    conv1d = conv1d_class()
    kind = type(base).forward
    return not intercepted(base, x) and (kind is nn.Linear.forward or (conv1d is not None and kind is conv1d.forward))


def unfused_for_own_forward(base: nn.Module, x) -> bool:
    """not plain_base, warning that the layer then calls its base layer and adds the adapter in plain PyTorch, as peft
    does (a subclass's forward, or hooks, that the fused op would skip)."""
    if plain_base(base, x):
        return False
    if not torch.compiler.is_compiling():
        warnings.warn(f"peftops: a patched layer's base layer ({type(base).__name__}) has a forward of its own or "
                      "hooks; that layer calls it and adds its adapter unfused, as peft does", stacklevel=3)
    return True


def wants_base_grad(weight: torch.Tensor) -> bool:
    """Whether a base weight that a user made trainable wants its gradient now: the ops never give it one."""
    return weight.requires_grad and torch.is_grad_enabled()


def unfused_for_base_grad(weight: torch.Tensor) -> bool:
    """wants_base_grad, warning that the layer then runs peft's formulas in plain PyTorch (the warning points at
    torch's module call, one place, so the default filter shows it once; not while compiling, which cannot trace
    it)."""
    if not wants_base_grad(weight):
        return False
    if not torch.compiler.is_compiling():
        warnings.warn("peftops: a patched layer's base weight is trainable; that layer runs unfused in plain PyTorch "
                      "so that the weight gets its gradient", stacklevel=3)
    return True


class WrapsLayer:
    """What a module that owns the wrapped layer may read from it, as peft's tuner layers forward them: the base
    layer's own `weight` and `bias` (in its storage layout) and its feature counts."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return base_weight(self.base_layer).shape[1]

    @property
    def out_features(self) -> int:
        return base_weight(self.base_layer).shape[0]
