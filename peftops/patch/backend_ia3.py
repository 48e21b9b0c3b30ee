"""Backend mode for peft IA3: a peft `ia3.Linear` layer's forward computed by peftops.ops.ia3_linear.

Follows peft's `Linear.forward`: disabled or merged adapters run the base alone (peft's code, which also unmerges);
several active adapters multiply their vectors. peft multiplies by vectors of their own dtype (float32 over a 16-bit
base, its autocast_adapter_dtype) and rounds the product once, which the fused op, one dtype throughout, cannot: such
layers run peft's forward (with one warning), except under autocast, where the op casts everything to autocast's
dtype as it does for nn.Linear."""

from .. import ops
from ..layers.wrapped import base_weight
from .backend import base_reason, warn_once
from .forwards import call_original, one_dtype_for_ops


def _fallback_reason(module, x, args, kwargs, active):
    reason = base_reason(module, x, args, kwargs)
    if reason is not None:
        return reason
    base = module.base_layer
    tensors = [base.weight] + ([base.bias] if base.bias is not None else []) + [module.ia3_l[n] for n in active]
    if not x.is_floating_point() or not all(t.is_floating_point() for t in tensors) or \
            not one_dtype_for_ops(x, *tensors):
        return "an input, base weight and IA3 vectors of different dtypes (outside autocast)"
    return None


def fused_forward(self, x, *args, **kwargs):
    active = [name for name in self.active_adapters if name in self.ia3_l]
    if self.disable_adapters or self.merged or not active:
        return call_original(self, x, *args, **kwargs)
    reason = _fallback_reason(self, x, args, kwargs, active)
    if reason is not None:
        warn_once(self, reason, "IA3")
        return call_original(self, x, *args, **kwargs)
    # One adapter: its [out, 1] / [1, in] vector goes in as is; several multiply, in peft's order.
    scale = self.ia3_l[active[0]]
    if len(active) > 1:
        scale = scale.flatten()
        for name in active[1:]:
            scale = scale * self.ia3_l[name].flatten()
    base = self.base_layer
    return ops.ia3_linear(x, base_weight(base), base.bias, scale, feedforward=self.is_feedforward)
