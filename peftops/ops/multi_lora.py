"""Many LoRA adapters in one batch: the public functional entry point and the fake kernels."""
import math

import torch

from .. import _extension
from . import reference
from ._args import check_tensors


def multi_lora_linear(x, weight, bias, lora_a, lora_b, scales, adapter_index):
    """`x @ weight.T + bias`, plus for each token row i with adapter a = adapter_index[i] >= 0,
    `scales[a] * x_i @ lora_a[a].T @ lora_b[a].T` (-1: base layer only).

    `lora_a [n, r, in]`, `lora_b [n, out, r]`, `scales [n]`, `adapter_index [tokens]` (int64, one per row of x
    flattened to [tokens, in]). Adapters of lower rank are zero-padded to r. Rows are grouped by adapter once per
    call; each segment is shrunk to rank r and expanded into the output in place."""
    check_tensors("multi_lora_linear", ("bias",), x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b,
                  scales=scales, adapter_index=adapter_index)
    if _extension.use_kernels(x.device):
        return torch.ops.peftops.multi_lora_linear(x, weight, bias, lora_a, lora_b, scales, adapter_index)
    _extension.check_like_kernels("multi_lora_linear", x, weight, bias, lora_a, lora_b, scales, adapter_index)
    # the kernels' index checks, which the fallback's reference needs too: it would skip an index it has no adapter for
    if adapter_index.dtype != torch.int64:
        raise TypeError(f"multi_lora_linear: adapter_index must be int64, got {adapter_index.dtype}")
    tokens = math.prod(x.shape[:-1])
    if adapter_index.shape != (tokens,):
        raise ValueError(f"multi_lora_linear: adapter_index must be [{tokens}] (one entry per token row of x), got "
                         f"shape {tuple(adapter_index.shape)}")
    wrong = ((adapter_index < -1) | (adapter_index >= lora_a.shape[0])).nonzero()
    if len(wrong):
        i = int(wrong[0])
        raise ValueError(f"multi_lora_linear: adapter_index[{i}] = {int(adapter_index[i])} is out of range "
                         f"[-1, {lora_a.shape[0]})")
    return reference.multi_lora_linear(x, weight, bias, lora_a, lora_b, scales, adapter_index)


if _extension.LOADED:

    @torch.library.register_fake("peftops::multi_lora_linear_forward")
    def _multi_lora_linear_forward_fake(x, weight, bias, lora_a, lora_b, scales, adapter_index):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (x.new_empty((*x.shape[:-1], weight.shape[0])),
                x.new_empty((math.prod(x.shape[:-1]), lora_a.shape[1]), dtype=acc))

    @torch.library.register_fake("peftops::multi_lora_linear_backward")
    def _multi_lora_linear_backward_fake(grad_out, x, weight, lora_a, lora_b, scales, adapter_index, t, output_mask):
        need_x, need_a, need_b, need_bias = output_mask
        return (x.new_empty(x.shape if need_x else (0,)),
                lora_a.new_empty(lora_a.shape if need_a else (0,)),
                lora_b.new_empty(lora_b.shape if need_b else (0,)),
                x.new_empty((weight.shape[0],) if need_bias else (0,)))
