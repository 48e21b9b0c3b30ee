"""LoraLinear: a LoRA drop-in over nn.Linear or transformers' GPT-2 Conv1D, computed by the fused op."""
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import reference
from .wrapped import (WrapsLayer, adapter_dtype, base_weight, cast_to, unfused_for_base_grad, unfused_for_own_forward,
                      wrapped_shape)


class LoraLinear(WrapsLayer, nn.Module):
    """`base(x) + scaling * dropout(x) @ lora_A.T @ lora_B.T`, with the original module kept as `base_layer`; with
    `use_dora`, peft's DoRA: the rows of `W + scaling * B A` rescaled to the trainable `lora_magnitude_vector` [out].

    Parameters are named as peft's (`<name>.base_layer.weight`, `lora_A` [r, in], `lora_B` [out, r]) so state dict
    keys map one to one onto peft's; initialisation is peft's (A Kaiming-uniform, B zero, magnitude the row norms)."""

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float = 0.0, use_dora: bool = False):
        super().__init__()
        out_features, in_features = wrapped_shape(base_layer, "LoraLinear")
        weight = base_layer.weight
        self.base_layer = base_layer
        self.r, self.scaling, self.dropout = r, float(scaling), float(dropout)
        self.merged = False
        dtype = adapter_dtype(weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.use_dora = bool(use_dora)
        if self.use_dora:
            with torch.no_grad():
                self.lora_magnitude_vector = nn.Parameter(self._dora_norm(self._delta_weight()).to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        weight = base_weight(self.base_layer)
        a, b, bias = cast_to(self.lora_A, weight.dtype), cast_to(self.lora_B, weight.dtype), self.base_layer.bias
        magnitude = cast_to(self.lora_magnitude_vector, weight.dtype) if self.use_dora else None
        own_forward = unfused_for_own_forward(self.base_layer, x)
        if own_forward or unfused_for_base_grad(weight):
            drop = functools.partial(F.dropout, p=self.dropout) if self.training and self.dropout > 0 else None
            base = self.base_layer if own_forward else None
            if self.use_dora:
                return reference.dora_composed(x, weight, bias, a, b, magnitude, self.scaling, drop, base)
            return reference.lora_composed(x, weight, bias, a, b, self.scaling, drop, base)
        if self.use_dora:
            return ops.dora_linear(x, weight, bias, a, b, magnitude, self.scaling, self.dropout, training=self.training)
        return ops.lora_linear(x, weight, bias, a, b, self.scaling, self.dropout, training=self.training)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold `scaling * B @ A` into the base weight; from then on this layer computes the base alone. Returns
        the base layer, which can replace this one."""
        if not self.merged:
            weight = base_weight(self.base_layer)
            # As peft: in the adapters' dtype (float32 over a 16-bit base), rounded into the weight once.
            merged = weight + self._delta_weight(torch.promote_types(self.lora_A.dtype, weight.dtype))
            if self.use_dora:  # peft's DoRA merge: W' = m / ||W + dW|| * (W + dW), by rows
                merged *= (self.lora_magnitude_vector / torch.linalg.norm(merged, dim=1)).view(-1, 1)
            weight.copy_(merged)
            self.merged = True
        return self.base_layer

    def _delta_weight(self, dtype=None) -> torch.Tensor:
        """`scaling * B @ A` [out, in] in `dtype` (default: the base weight's), computed as peft's
        `get_delta_weight`."""
        a, b = self.lora_A, self.lora_B
        if a.dtype in (torch.float16, torch.bfloat16):  # as peft: half matmuls are slow or lossy on CPU
            a, b = a.float(), b.float()
        return ((b @ a) * self.scaling).to(dtype or self.base_layer.weight.dtype)

    def _dora_norm(self, delta: torch.Tensor) -> torch.Tensor:
        """Row norms of `W + delta`, as peft's `get_weight_norm` (in the weight's dtype)."""
        weight = base_weight(self.base_layer)
        return torch.linalg.norm(weight + delta, dim=1).to(weight.dtype)

    def extra_repr(self) -> str:
        return (f"r={self.r}, scaling={self.scaling:g}, dropout={self.dropout:g}" + (", dora" if self.use_dora else "")
                + (", merged" if self.merged else ""))
