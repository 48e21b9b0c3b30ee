"""Bottleneck adapter op: the public functional entry point and the fake kernels."""
import math

import torch

from .. import _extension
from . import reference
from ._args import as_float, check_flag, check_tensors


def adapter_bottleneck(h, w_down, b_down, w_up, b_up, *, activation="relu", scale=1.0, residual=None,
                       save_output=False):
    """`residual + scale * (act(h @ w_down.T + b_down) @ w_up.T + b_up)`, `residual` defaulting to `h`;
    activation one of relu, gelu, gelu_tanh, silu. Backward keeps only h and the bottleneck pre-activation.

    `save_output=True` (residual h only) keeps the output instead of h, for a caller whose model keeps the output
    anyway (a pre-LN layer's output, which the next norm saves): backward recovers h as the output minus the
    adapter's update, exact to the output's rounding."""
    check_tensors("adapter_bottleneck", ("b_down", "b_up", "residual"), h=h, w_down=w_down, b_down=b_down,
                  w_up=w_up, b_up=b_up, residual=residual)
    scale = as_float("adapter_bottleneck", "scale", scale)
    save_output = check_flag("adapter_bottleneck", "save_output", save_output)
    if not isinstance(activation, str):
        raise TypeError(f"adapter_bottleneck: activation must be a str, got {type(activation).__name__}")
    if _extension.use_kernels(h.device):
        return torch.ops.peftops.adapter_bottleneck(h, w_down, b_down, w_up, b_up, activation=activation,
                                                    scale=scale, residual=residual, save_output=save_output)
    _extension.check_like_kernels("adapter_bottleneck", h, w_down, b_down, w_up, b_up, activation=activation,
                                  scale=scale, residual=residual, save_output=save_output)
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"adapter_bottleneck: activation must be one of relu, gelu, gelu_tanh, silu, got '{activation}'")
    return reference.adapter_bottleneck(h, w_down, b_down, w_up, b_up, activation, scale, residual)


if _extension.LOADED:

    @torch.library.register_fake("peftops::adapter_bottleneck_forward")
    def _forward_fake(h, w_down, b_down, w_up, b_up, activation, scale, residual, save_output):
        return (h.new_empty((*h.shape[:-1], w_up.shape[0])),
                h.new_empty((math.prod(h.shape[:-1]), w_down.shape[0])))

    @torch.library.register_fake("peftops::adapter_bottleneck_backward")
    def _backward_fake(grad_out, h, a, w_down, w_up, activation, scale, residual_is_h, has_b_up, output_mask):
        need_h, need_wd, need_bd, need_wu, need_bu = output_mask
        return (h.new_empty(h.shape if need_h else (0,)), w_down.new_empty(w_down.shape if need_wd else (0,)),
                w_down.new_empty((w_down.shape[0],) if need_bd else (0,)),
                w_up.new_empty(w_up.shape if need_wu else (0,)), w_up.new_empty((w_up.shape[0],) if need_bu else (0,)))

    @torch.library.register_fake("peftops::bottleneck_activation")
    def _activation_fake(a, activation, ones):
        return a.new_empty((a.shape[0], a.shape[1] + (1 if ones else 0)))

    @torch.library.register_fake("peftops::bottleneck_activation_backward")
    def _activation_backward_fake(grad, a, activation, scale):
        return a.new_empty(a.shape)
