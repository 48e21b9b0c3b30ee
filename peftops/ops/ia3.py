"""IA3 op (learned scaling vectors, peft's semantics): the public functional entry point and the fake kernels."""
import torch

from .. import _extension
from . import reference
from ._args import check_flag, check_tensors


def ia3_linear(x, weight, bias, ia3_scale, *, feedforward=False):
    """`(x @ weight.T + bias) * ia3_scale`, or with `feedforward=True`, `(x * ia3_scale) @ weight.T + bias`.

    `ia3_scale` has out_features (in_features with feedforward) elements, 1-D or in peft's [out, 1] / [1, in]
    shape. The frozen weight gets no gradient; the base output the scale's gradient needs is kept where it is no bigger
    than x (out_features <= in_features), else recomputed from x."""
    check_tensors("ia3_linear", ("bias",), x=x, weight=weight, bias=bias, ia3_scale=ia3_scale)
    feedforward = check_flag("ia3_linear", "feedforward", feedforward)
    if _extension.use_kernels(x.device):
        return torch.ops.peftops.ia3_linear(x, weight, bias, ia3_scale, feedforward=feedforward)
    _extension.check_like_kernels("ia3_linear", x, weight, bias, ia3_scale, feedforward=feedforward)
    return reference.ia3_linear(x, weight, bias, ia3_scale, feedforward)


def ia3_glu_linear(gate, up, weight, bias, ia3_scale):
    """`ia3_linear(gate * up, weight, bias, ia3_scale, feedforward=True)` for a gated feed-forward block (Llama's
    `down_proj(act_fn(gate_proj(x)) * up_proj(x))`), keeping only `gate` and `up` for backward, which the block's
    product would keep anyway, instead of a copy of their product: IA3 on the down projection then saves nothing."""
    check_tensors("ia3_glu_linear", ("bias",), gate=gate, up=up, weight=weight, bias=bias, ia3_scale=ia3_scale)
    if _extension.use_kernels(gate.device):
        return torch.ops.peftops.ia3_glu_linear(gate, up, weight, bias, ia3_scale)
    _extension.check_like_kernels("ia3_glu_linear", gate, up, weight, bias, ia3_scale)
    return reference.ia3_glu_linear(gate, up, weight, bias, ia3_scale)


if _extension.LOADED:

    @torch.library.register_fake("peftops::ia3_linear_forward")
    def _ia3_linear_forward_fake(x, weight, bias, ia3_scale, feedforward):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("peftops::ia3_linear_backward")
    def _ia3_linear_backward_fake(grad_out, x, base, weight, bias, ia3_scale, feedforward, output_mask):
        need_x, need_bias, need_scale = output_mask
        return (grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]) if need_x else (0,)),
                grad_out.new_empty((weight.shape[0],) if need_bias else (0,)),
                ia3_scale.new_empty(ia3_scale.shape if need_scale else (0,)))

    @torch.library.register_fake("peftops::ia3_glu_linear_forward")
    def _ia3_glu_linear_forward_fake(gate, up, weight, bias, ia3_scale):
        return gate.new_empty((*gate.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("peftops::ia3_glu_linear_backward")
    def _ia3_glu_linear_backward_fake(grad_out, gate, up, weight, ia3_scale, output_mask):
        need_gate, need_up, need_bias, need_scale = output_mask
        return (gate.new_empty(gate.shape if need_gate else (0,)), up.new_empty(up.shape if need_up else (0,)),
                gate.new_empty((weight.shape[0],) if need_bias else (0,)),
                ia3_scale.new_empty(ia3_scale.shape if need_scale else (0,)))
