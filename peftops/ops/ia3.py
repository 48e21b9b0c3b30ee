"""IA3 op (learned scaling vectors, peft's semantics): the public functional entry point and the fake kernels."""
import torch

from .. import _extension
from . import reference


def ia3_linear(x, weight, bias, ia3_scale, *, feedforward=False):
    """`(x @ weight.T + bias) * ia3_scale`, or with `feedforward=True`, `(x * ia3_scale) @ weight.T + bias`.

    `ia3_scale` has out_features (in_features with feedforward) elements, 1-D or in peft's [out, 1] / [1, in]
    shape. The frozen weight gets no gradient; the base output the scale's gradient needs is recomputed."""
    if _extension.use_kernels(x.device):
        return torch.ops.peftops.ia3_linear(x, weight, bias, ia3_scale, feedforward=feedforward)
    return reference.ia3_linear(x, weight, bias, ia3_scale, feedforward)


if _extension.LOADED:

    @torch.library.register_fake("peftops::ia3_linear_forward")
    def _ia3_linear_forward_fake(x, weight, bias, ia3_scale, feedforward):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("peftops::ia3_linear_backward")
    def _ia3_linear_backward_fake(grad_out, x, weight, bias, ia3_scale, feedforward, output_mask):
        need_x, need_bias, need_scale = output_mask
        return (x.new_empty(x.shape if need_x else (0,)),
                x.new_empty((weight.shape[0],) if need_bias else (0,)),
                ia3_scale.new_empty(ia3_scale.shape if need_scale else (0,)))
