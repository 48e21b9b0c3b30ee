"""Ia3Linear: IA3's learned scaling over nn.Linear or transformers' GPT-2 Conv1D, computed by the fused op."""
import torch
from torch import nn

from .. import ops
from ..ops import reference
from .wrapped import (WrapsLayer, adapter_dtype, base_weight, cast_to, plain_base, unfused_for_base_grad,
                      unfused_for_own_forward, wants_base_grad, wrapped_shape)


class Ia3Linear(WrapsLayer, nn.Module):
    """`base(x) * l` (output scaling), or with `feedforward=True`, `base(x * l)` (input scaling), as peft's IA3.

    `ia3_l` is shaped as peft's ([out, 1], or [1, in] for feed-forward layers) and initialised to ones, so state dict
    keys and tensors map one to one onto peft's (`<name>.ia3_l` here, `<name>.ia3_l.<adapter>` in peft)."""

    def __init__(self, base_layer: nn.Module, feedforward: bool = False):
        super().__init__()
        out_features, in_features = wrapped_shape(base_layer, "Ia3Linear")
        weight = base_layer.weight
        self.base_layer = base_layer
        self.feedforward = bool(feedforward)
        self.merged = False
        shape = (1, in_features) if self.feedforward else (out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=adapter_dtype(weight.dtype), device=weight.device))

    def _scale(self) -> torch.Tensor:
        return cast_to(self.ia3_l, self.base_layer.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        weight = base_weight(self.base_layer)
        own_forward = unfused_for_own_forward(self.base_layer, x)
        if own_forward or unfused_for_base_grad(weight):
            return reference.ia3_composed(x, weight, self.base_layer.bias, self._scale(), self.feedforward,
                                          self.base_layer if own_forward else None)
        return ops.ia3_linear(x, weight, self.base_layer.bias, self._scale(), feedforward=self.feedforward)

    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """This feed-forward layer over a gated block's product `gate * up`, keeping only the two factors for
        backward (ops.ia3_glu_linear); peftops.patch routes Llama-style MLPs through it."""
        if self.merged or not self.feedforward or wants_base_grad(self.base_layer.weight) or \
                not plain_base(self.base_layer, gate):
            return self(gate * up)
        return ops.ia3_glu_linear(gate, up, base_weight(self.base_layer), self.base_layer.bias, self._scale())

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold `l` into the base weight as peft's merge does (rows for output scaling, columns for input scaling;
        the bias is scaled too for output scaling); from then on this layer computes the base alone. Returns the base
        layer, which can replace this one."""
        if not self.merged:
            base = self.base_layer
            # base_weight is [out, in] (a view of Conv1D's [in, out]): [out, 1] scales rows, [1, in] columns.
            w = base_weight(base)
            w.copy_((w * self.ia3_l).to(w.dtype))
            if not self.feedforward and base.bias is not None:
                base.bias.copy_((base.bias * self.ia3_l.reshape(base.bias.shape)).to(base.bias.dtype))
            self.merged = True
        return self.base_layer

    def extra_repr(self) -> str:
        return ("feedforward" if self.feedforward else "output scaling") + (", merged" if self.merged else "")
