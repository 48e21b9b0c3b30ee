"""Bottleneck adapter module: `residual + scale * up(act(down(h)))` through the fused `adapter_bottleneck` op."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _extension, ops
from ..ops.reference import ACTIVATIONS
from .wrapped import cast_to


_RECOVERABLE = (torch.float32, torch.float64)


class BottleneckAdapter(nn.Module):
    """`down` [m, d] and `up` [d, m] with biases. `up` and both biases start at zero, so the adapter starts as the
    identity (residual + 0); `down` is Kaiming-uniform as nn.Linear's weight, so the first step already moves `up`.
    `save_output`: backward keeps the output instead of the input (see ops.adapter_bottleneck), for a placement whose
    output the model keeps anyway; float32 and float64 only (a 16-bit output's rounding would carry into the recovered
    input, and a 16-bit model's norm keeps a float32 copy rather than the output). Over a 16-bit model the parameters
    are float32 (peftops.patch passes wrapped.adapter_dtype's choice), cast to the input's dtype for each forward."""

    def __init__(self, hidden: int, bottleneck: int, activation: str = "relu", scale: float = 1.0, *,
                 save_output: bool = False, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.activation, self.scale, self.save_output = activation, float(scale), bool(save_output)
        self.down = nn.Parameter(torch.empty(bottleneck, hidden, **kw))
        self.down_bias = nn.Parameter(torch.zeros(bottleneck, **kw))
        self.up = nn.Parameter(torch.zeros(hidden, bottleneck, **kw))
        self.up_bias = nn.Parameter(torch.zeros(hidden, **kw))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    def _weights(self, dtype: torch.dtype) -> tuple:
        return tuple(cast_to(p, dtype) for p in (self.down, self.down_bias, self.up, self.up_bias))

    def forward(self, h: torch.Tensor, residual: "torch.Tensor | None" = None) -> torch.Tensor:
        return ops.adapter_bottleneck(h, *self._weights(h.dtype), activation=self.activation, scale=self.scale,
                                      residual=residual,
                                      save_output=self.save_output and residual is None and h.dtype in _RECOVERABLE)

    def projected(self, x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None") -> torch.Tensor:
        """h + A(h) with h = x W^T + b, a frozen projection's output (a Llama attention's o_proj), keeping x for
        backward in place of h: x is the attention output, which SDPA keeps for its own backward anyway."""
        autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)  # meta has no autocast
        if autocast or not _extension.use_kernels(x.device):
            return self(F.linear(x, weight, bias))
        return _ProjectedBottleneck.apply(x, weight, bias, *self._weights(x.dtype),
                                          list(ACTIVATIONS).index(self.activation), self.scale)

    def extra_repr(self) -> str:
        return (f"hidden={self.up.shape[0]}, bottleneck={self.down.shape[0]}, activation={self.activation}, "
                f"scale={self.scale}")


class _ProjectedBottleneck(torch.autograd.Function):
    """y = h + A(h), h = x Wp^T + bp, saving x and the bottleneck pre-activation a (not h). h feeds only the
    down-projection's weight gradient, da^T h = (da^T x) Wp^T + colsum(da) bp^T: an [m, d_in] product more, and no
    [tokens, d] tensor kept. The other gradients come from the op's own backward (the activation codes are the op's:
    reference.ACTIVATIONS lists them in its order)."""

    @staticmethod
    def forward(ctx, x, w_proj, b_proj, down, down_bias, up, up_bias, activation, scale):
        h = F.linear(x, w_proj, b_proj)
        y, a = torch.ops.peftops.adapter_bottleneck_forward(h, down, down_bias, up, up_bias, activation, scale, None,
                                                            False)
        ctx.save_for_backward(x, a, w_proj, b_proj, down, up, up_bias)
        ctx.activation, ctx.scale = activation, scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, a, w_proj, b_proj, down, up, up_bias = ctx.saved_tensors
        need_x, need_wp, need_bp, need_wd, need_bd, need_wu, need_bu = ctx.needs_input_grad[:7]
        dy = dy.contiguous()
        # dy has h's shape and stands in for h, which the op's backward reads only for grad_w_down (not asked here)
        dh, _, dbd, dwu, dbu = torch.ops.peftops.adapter_bottleneck_backward(
            dy, dy, a, down, up, ctx.activation, ctx.scale, True, up_bias is not None,
            [need_x or need_wp or need_bp, False, need_bd, need_wu, need_bu])
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.view(-1, dy.shape[-1])
        dwd = dx = dwp = dbp = None
        if need_wd:
            da = torch.ops.peftops.bottleneck_activation_backward(dy2 @ up, a, ctx.activation, ctx.scale)
            dwd = (da.t() @ x2) @ w_proj.t()
            if b_proj is not None:
                dwd.add_(torch.outer(da.sum(0), b_proj))
        if need_x or need_wp or need_bp:  # (else dh is an empty placeholder)
            dh2 = dh.view(dy2.shape)
            dx = (dh2 @ w_proj).view(x.shape) if need_x else None
            dwp = dh2.t() @ x2 if need_wp else None
            dbp = dh2.sum(0) if need_bp else None
        return (dx, dwp, dbp, dwd, dbd if need_bd else None, dwu if need_wu else None, dbu if need_bu else None,
                None, None)
