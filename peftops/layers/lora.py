"""LoraLinear: a LoRA drop-in over nn.Linear or transformers' GPT-2 Conv1D, computed by the fused op."""
import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import reference


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


def trains_base(weight: torch.Tensor) -> bool:
    """Whether a base weight that a user made trainable wants its gradient now. The ops never give it one, so such a
    layer runs peft's formulas in plain PyTorch instead, as peft would (warned once)."""
    if not (weight.requires_grad and torch.is_grad_enabled()):
        return False
    warnings.warn("peftops: a patched layer's base weight is trainable; that layer runs unfused in plain PyTorch so "
                  "that the weight gets its gradient", stacklevel=3)
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
        if trains_base(weight):
            drop = functools.partial(F.dropout, p=self.dropout) if self.training and self.dropout > 0 else None
            if self.use_dora:
                return reference.dora_composed(x, weight, bias, a, b, magnitude, self.scaling, drop)
            return reference.lora_composed(x, weight, bias, a, b, self.scaling, drop)
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
