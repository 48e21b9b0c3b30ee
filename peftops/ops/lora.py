"""LoRA ops: the public functional entry point and the fake (meta) kernels of the registered ops."""
import math

import torch

from .. import _extension
from . import reference
from ._args import as_float, check_dropout_p, check_flag, check_tensors


def lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0, *, training=True):
    """`x @ weight.T + bias + scale * dropout(x) @ lora_a.T @ lora_b.T`, fused (see ../shared/SPEC.md).

    `weight` is frozen (never gets a gradient). The dropout mask is regenerated in backward from a seed drawn
    from torch's generator for x's device, so `torch.manual_seed` reproduces it; it is never stored."""
    check_tensors("lora_linear", ("bias",), x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    scale, dropout_p = as_float("lora_linear", "scale", scale), as_float("lora_linear", "dropout_p", dropout_p)
    training = check_flag("lora_linear", "training", training)
    if _extension.use_kernels(x.device):
        return torch.ops.peftops.lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p,
                                             training=training)
    _extension.check_like_kernels("lora_linear", x, weight, bias, lora_a, lora_b, scale, dropout_p, training=False)
    check_dropout_p("lora_linear", "dropout_p", dropout_p, training)
    seed = reference.draw_seed(x.device, dropout_p, training)
    return reference.lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p if seed is not None else 0.0, seed)


if _extension.LOADED:

    @torch.library.register_fake("peftops::lora_linear_forward")
    def _lora_linear_forward_fake(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed):
        torch._check(x.shape[-1] == weight.shape[1], lambda: "lora_linear: x and weight disagree on in_features")
        rows = math.prod(x.shape[:-1])
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (x.new_empty((*x.shape[:-1], weight.shape[0])),
                x.new_empty((rows, lora_a.shape[0]), dtype=acc))

    @torch.library.register_fake("peftops::lora_linear_backward")
    def _lora_linear_backward_fake(grad_out, x, weight, lora_a, lora_b, t, scale, dropout_p, seed, output_mask):
        need_x, need_a, need_b, need_bias = output_mask
        return (x.new_empty(x.shape if need_x else (0,)),
                lora_a.new_empty(lora_a.shape) if need_a else x.new_empty((0,)),
                lora_b.new_empty(lora_b.shape) if need_b else x.new_empty((0,)),
                x.new_empty((weight.shape[0],) if need_bias else (0,)))
