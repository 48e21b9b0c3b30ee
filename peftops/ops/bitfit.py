"""BitFit ops (bias-only training): the public functional entry points and the fake kernels."""
import torch

from .. import _extension
from . import reference
from ._args import as_float, check_dropout_p, check_flag, check_tensors


def bias_linear(x, weight, bias):
    """`x @ weight.T + bias` with a frozen weight: gradients to x and bias only, no activation saved."""
    check_tensors("bias_linear", x=x, weight=weight, bias=bias)
    if _extension.use_kernels(x.device):
        return torch.ops.peftops.bias_linear(x, weight, bias)
    _extension.check_like_kernels("bias_linear", x, weight, bias)
    return reference.bias_linear(x, weight, bias)


def bias_dropout_add(x, bias, residual, p=0.0, *, training=True):
    """`residual + dropout(x + bias)` in one pass; the mask is regenerated in backward from a seed, never stored."""
    check_tensors("bias_dropout_add", x=x, bias=bias, residual=residual)
    p, training = as_float("bias_dropout_add", "p", p), check_flag("bias_dropout_add", "training", training)
    if _extension.use_kernels(x.device):
        return torch.ops.peftops.bias_dropout_add(x, bias, residual, p, training=training)
    _extension.check_like_kernels("bias_dropout_add", x, bias, residual, p, training=False)
    check_dropout_p("bias_dropout_add", "p", p, training)
    seed = reference.draw_seed(x.device, p, training)
    return reference.bias_dropout_add(x, bias, residual, p if seed is not None else 0.0, seed)


if _extension.LOADED:

    @torch.library.register_fake("peftops::bias_linear_backward")
    def _bias_linear_backward_fake(grad_out, weight, output_mask):
        return (grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]) if output_mask[0] else (0,)),
                grad_out.new_empty((weight.shape[0],) if output_mask[1] else (0,)))

    @torch.library.register_fake("peftops::bias_dropout_add_forward")
    def _bias_dropout_add_forward_fake(x, bias, residual, p, seed):
        return x.new_empty(x.shape)

    @torch.library.register_fake("peftops::bias_dropout_add_backward")
    def _bias_dropout_add_backward_fake(grad_out, p, seed, output_mask):
        return (grad_out.new_empty(grad_out.shape if output_mask[0] else (0,)),
                grad_out.new_empty((grad_out.shape[-1],) if output_mask[1] else (0,)))
