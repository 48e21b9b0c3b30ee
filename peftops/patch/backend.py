"""Backend mode: every peft LoRA `Linear` layer of a PeftModel computes through peftops.ops.lora_linear, DoRA
adapters through ops.dora_linear, mixed-adapter batches (`adapter_names=`) through ops.multi_lora_linear (see
backend_mixed.py); IA3 layers through ops.ia3_linear (see backend_ia3.py).

Only the layers' `forward` is replaced, per instance and reversibly; parameters, names, state dict keys and peft's
API stay peft's. What the fused op does not cover runs peft's own forward, with one warning per reason."""
import functools
import warnings

import torch
from torch import nn

from .. import ops
from ..layers.wrapped import base_weight, intercepted, plain_base, wants_base_grad
from .forwards import call_original, is_replaced, one_dtype_for_ops, replace_forward, restore_forward

_WARNED = "_peftops_warned"  # the set of fallback reasons already warned about, shared by one patch call


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def peft_layer_names(model) -> list:
    """The modules of `model` that are peft tuner layers (a peft model's inner transformers model holds them)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def warn_once(module, reason: str, kind: str = "LoRA"):
    warned = module.__dict__[_WARNED]
    if reason not in warned:
        warned.add(reason)
        warnings.warn(f"peftops: peft {kind} layers run peft's own forward for {reason}", stacklevel=3)


def base_reason(module, x, args, kwargs):
    """Why the base layer call cannot be fused (shared by LoRA and IA3), or None."""
    if kwargs.get("adapter_names") is not None:
        return "adapter_names= (mixed adapter batches are fused for LoRA layers only)"
    if args or any(v is not None for v in kwargs.values()):
        return "extra forward arguments"
    base = module.base_layer
    if not plain_base(base, x):
        return f"base layer {type(base).__name__} (not a plain nn.Linear or Conv1D, or it has hooks)"
    weight = base.weight
    if weight.is_meta and not x.is_meta:
        return "a base weight on the meta device (offloaded)"
    if type(weight) is not nn.Parameter and type(weight) is not torch.Tensor:
        return f"base weight of type {type(weight).__name__}"
    if wants_base_grad(weight):
        return "a trainable base weight (the op never gives the base weight a gradient)"
    return None


def is_dora(module, name) -> bool:
    from peft.tuners.lora.variants import DoraLinearVariant
    return type(module.lora_variant.get(name)) is DoraLinearVariant


def adapter_reason(module, x, name, allow_dora):
    """Why adapter `name` of this layer cannot be fused, or None."""
    if name in module.lora_variant and not (allow_dora and is_dora(module, name)):
        return f"LoRA variant {type(module.lora_variant[name]).__name__}"
    if module.lora_bias.get(name, False):
        return "lora_bias"
    a, b, drop = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
    if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
        return "LoRA factors that are not plain bias-free nn.Linear"
    if type(drop) not in (nn.Dropout, nn.Identity):
        return f"dropout module {type(drop).__name__}"
    if intercepted(a, x) or intercepted(b, x) or intercepted(drop, x):
        return "LoRA factors or dropout with hooks"
    if not (x.is_floating_point() and a.weight.is_floating_point() and one_dtype_for_ops(x, module.base_layer.weight)):
        return "an input whose dtype differs from the base weight's (outside autocast), or non-float weights"
    return None


def _fallback_reason(module, x, args, kwargs, active):
    """Why this call must run peft's forward, or None when the fused op computes exactly what peft would."""
    reason = base_reason(module, x, args, kwargs)
    if reason is not None:
        return reason
    # peft adds a second adapter's DoRA term onto the first one's output (its `base_result`): not what the op computes.
    if len(active) > 1 and any(is_dora(module, name) for name in active):
        return "DoRA with several active adapters"
    return next((r for r in (adapter_reason(module, x, n, allow_dora=True) for n in active) if r is not None), None)


def _fused_forward(self, x, *args, **kwargs):
    if kwargs.get("adapter_names") is not None and not self.disable_adapters:
        return mixed_forward(self, x, *args, **kwargs)
    # Base only (adapters disabled or merged) or an adapter set the op does not cover: peft's code is exact there.
    active = [name for name in self.active_adapters if name in self.lora_A]
    if self.disable_adapters or self.merged or not active:
        return call_original(self, x, *args, **kwargs)
    reason = _fallback_reason(self, x, args, kwargs, active)
    if reason is not None:
        warn_once(self, reason)
        return call_original(self, x, *args, **kwargs)

    def dropout_p(name):
        drop = self.lora_dropout[name]
        return drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0

    base = self.base_layer
    first, *rest = active
    # peft keeps LoRA factors in float32 over a half-precision base (autocast_adapter_dtype); the fused op computes
    # in the base dtype (float32 accumulation), so the factors are cast, differentiably, and the low-rank path is
    # rounded to that dtype where peft would round only its sum.
    a, b = (self.lora_A[first].weight.to(x.dtype), self.lora_B[first].weight.to(x.dtype))
    if is_dora(self, first):  # the only active adapter (see _fallback_reason)
        magnitude = self.lora_magnitude_vector[first].weight.to(x.dtype)
        return ops.dora_linear(x, base_weight(base), base.bias, a, b, magnitude, self.scaling[first],
                               dropout_p(first), training=self.training)
    result = ops.lora_linear(x, base_weight(base), base.bias, a, b, self.scaling[first], dropout_p(first),
                             training=self.training)
    for name in rest:  # further active adapters add their own low-rank term, as peft does
        lora_x = self._cast_input_dtype(x, self.lora_A[name].weight.dtype)
        delta = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](lora_x))) * self.scaling[name]
        result = result + delta.to(result.dtype)
    return result


# peft's PeftModel methods that may add tuner layers (an adapter on new target modules): while patched, each is
# followed by patch_peft again, so that those layers compute fused too.
_ADDS_LAYERS = ("add_adapter", "load_adapter")


def _then_patch(name, model, *args, **kwargs):
    result = getattr(type(model), name)(model, *args, **kwargs)
    patch_peft(model)
    return result


def patch_peft(model) -> nn.Module:
    """Swap the forward of every peft LoRA (or IA3) `Linear` layer; idempotent (a second call patches only layers
    added since; `add_adapter` and `load_adapter` make that call themselves while the model is patched)."""
    if not is_peft_model(model):
        raise ValueError(f"peftops.patch(model) without a config needs a peft.PeftModel adapted with LoRA or IA3, got "
                         f"{type(model).__name__}; pass a peftops config to add peftops adapters to a plain model")
    kinds = sorted({str(getattr(c.peft_type, "value", c.peft_type)) for c in model.peft_config.values()})
    if kinds == ["LORA"]:
        from peft.tuners.lora.layer import Linear, LoraLayer as Layer
        fused, kind = _fused_forward, "LoRA"
    elif kinds == ["IA3"]:
        from peft.tuners.ia3.layer import IA3Layer as Layer, Linear

        from .backend_ia3 import fused_forward as fused
        kind = "IA3"
    else:
        raise ValueError(f"peftops backend mode supports peft LoRA or IA3 models, this one has adapter types {kinds}")

    warned = next((m.__dict__[_WARNED] for m in model.modules() if _WARNED in m.__dict__), set())
    uncovered = set()
    for module in model.modules():
        if isinstance(module, Linear) and type(module).forward is Linear.forward:
            if not is_replaced(module):
                module.__dict__[_WARNED] = warned
                replace_forward(module, fused)
        elif isinstance(module, Layer):
            uncovered.add(type(module).__name__)
    if uncovered and "layer types" not in warned:
        warned.add("layer types")
        warnings.warn(f"peftops: peft {kind} layers of type {sorted(uncovered)} keep peft's own forward", stacklevel=3)
    for name in _ADDS_LAYERS:  # (a partial of a module-level function: the patched model still pickles)
        if name not in model.__dict__:
            setattr(model, name, functools.partial(_then_patch, name, model))
    return model


def is_patched_peft(model) -> bool:
    return any(is_replaced(m) for m in model.modules())


def unpatch_peft(model) -> nn.Module:
    for name in _ADDS_LAYERS:
        model.__dict__.pop(name, None)
    for module in model.modules():
        if is_replaced(module):
            restore_forward(module)
            del module.__dict__[_WARNED]
    return model


from .backend_mixed import mixed_forward  # noqa: E402  (it uses the helpers above)
