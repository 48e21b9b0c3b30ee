"""DoRA (peft's definition) and the shared dropout op: public entry points and fake kernels."""
import math

import torch

from .. import _extension
from . import reference
from ._args import as_float, check_dropout_p, check_flag, check_tensors


def dora_linear(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p=0.0, *, training=True):
    """peft's DoRA: `magnitude / ||W + scale * B A||` (norm detached) times the LoRA layer's output, bias after;
    computed without materialising `W + scale * B @ A`. With dropout in training, as peft, the base output of the
    dropped input is recomputed: `x W^T + b + (g - 1) * (x_d W^T) + g * scale * x_d A^T B^T`."""
    check_tensors("dora_linear", ("bias",), x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b,
                  magnitude=magnitude)
    scale, dropout_p = as_float("dora_linear", "scale", scale), as_float("dora_linear", "dropout_p", dropout_p)
    training = check_flag("dora_linear", "training", training)
    if _extension.use_kernels(x.device):
        return torch.ops.peftops.dora_linear(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p,
                                             training=training)
    _extension.check_like_kernels("dora_linear", x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p,
                                  training=False)
    check_dropout_p("dora_linear", "dropout_p", dropout_p, training)
    seed = reference.draw_seed(x.device, dropout_p, training)
    return reference.dora_linear(x, weight, bias, lora_a, lora_b, magnitude, scale,
                                 dropout_p if seed is not None else 0.0, seed)


if _extension.LOADED:

    @torch.library.register_fake("peftops::dropout")  # the shared Philox dropout (DoRA's dropped input)
    def _dropout_fake(x, p, seed):
        return x.new_empty(x.shape)

    @torch.library.register_fake("peftops::dropout_keep_mask")
    def _dropout_keep_mask_fake(size, p, seed, offset=0):
        return seed.new_empty(size, dtype=torch.bool)

    @torch.library.register_fake("peftops::dora_linear_forward")
    def _dora_linear_forward_fake(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        out_shape = (*x.shape[:-1], weight.shape[0])
        return (x.new_empty(out_shape), x.new_empty(out_shape),
                x.new_empty((math.prod(x.shape[:-1]), lora_a.shape[0]), dtype=acc),
                weight.new_empty((weight.shape[0],), dtype=acc))

    @torch.library.register_fake("peftops::dora_linear_backward")
    def _dora_linear_backward_fake(grad_out, x, weight, lora_a, lora_b, magnitude, z, t, norm, scale, dropout_p, seed,
                                   output_mask):
        need_x, need_a, need_b, need_m, need_bias = output_mask
        return (x.new_empty(x.shape if need_x else (0,)),
                lora_a.new_empty(lora_a.shape if need_a else (0,)),
                lora_b.new_empty(lora_b.shape if need_b else (0,)),
                magnitude.new_empty(magnitude.shape if need_m else (0,)),
                x.new_empty((weight.shape[0],) if need_bias else (0,)))
