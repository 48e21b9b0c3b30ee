"""Backend mode for peft's mixed-adapter batches: `forward(..., adapter_names=[...])` (one name per batch row,
"__base__" for the base model alone), which peft's LoraModel hands to every LoRA layer as a keyword argument,
computed by peftops.ops.multi_lora_linear instead of peft's loop of gathers and scatters (`_mixed_batch_forward`).

peft's own argument checks run first, so errors are peft's. A name this layer does not hold adds nothing (as peft).
Adapters of lower rank are zero-padded to the layer's largest involved rank; padded rows and columns add zero."""
import math

import torch
import torch.nn.functional as F

from .. import ops
from ..layers.wrapped import base_weight
from .backend import adapter_reason, base_reason, warn_once
from .forwards import call_original


def _reason(module, x, args, kwargs, names):
    reason = base_reason(module, x, args, kwargs)
    if reason is not None:
        return reason
    if x.dim() < 2:
        return "adapter_names= with an input of fewer than 2 dimensions"
    for name in names:
        reason = adapter_reason(module, x, name, allow_dora=False)
        if reason is not None:
            return reason
        drop = module.lora_dropout[name]
        if getattr(drop, "p", 0.0) > 0 and drop.training:
            return "adapter_names= with dropout in training mode"
    return None


def _stacked(module, names, dtype):
    """(lora_a [n, r, in], lora_b [n, out, r], scales [n]) of `names`, cast to `dtype`, stacked at every call (about
    20 us per layer): a cache would miss in-place edits through `.data`, which no version counter sees."""
    pairs = [(module.lora_A[n].weight.to(dtype), module.lora_B[n].weight.to(dtype)) for n in names]
    r = max(a.shape[0] for a, _ in pairs)
    lora_a = torch.stack([a if a.shape[0] == r else F.pad(a, (0, 0, 0, r - a.shape[0])) for a, _ in pairs])
    lora_b = torch.stack([b if b.shape[1] == r else F.pad(b, (0, r - b.shape[1])) for _, b in pairs])
    # the op reads the scales and the index on the host: made there, a GPU batch costs no copies either way
    scales = torch.tensor([float(module.scaling[n]) for n in names], dtype=torch.float32)
    return lora_a, lora_b, scales


def mixed_forward(self, x, *args, adapter_names, **kwargs):
    # peft's checks: one name per row, nothing merged, no DoRA adapter named.
    self._check_forward_args(x, *args, adapter_names=adapter_names, **kwargs)
    # Slots in order of first appearance; names this layer lacks stay at -1 (base only), as peft skips them.
    names = [n for n in dict.fromkeys(adapter_names) if n != "__base__" and n in self.lora_A]
    reason = _reason(self, x, args, kwargs, names)
    if reason is not None:
        warn_once(self, reason)
        return call_original(self, x, *args, adapter_names=adapter_names, **kwargs)
    base = self.base_layer
    if not names:
        return base(x)
    lora_a, lora_b, scales = _stacked(self, names, x.dtype)
    slot = {n: i for i, n in enumerate(names)}
    rows = torch.tensor([slot.get(n, -1) for n in adapter_names], dtype=torch.int64)
    # adapter_names is per batch row; the op takes one index per token row of x flattened to [tokens, in].
    index = rows.repeat_interleave(math.prod(x.shape[1:-1]))
    return ops.multi_lora_linear(x, base_weight(base), base.bias, lora_a, lora_b, scales, index)
