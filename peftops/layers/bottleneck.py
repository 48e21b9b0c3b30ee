"""Bottleneck adapter module: `residual + scale * up(act(down(h)))` through the fused `adapter_bottleneck` op."""
import math

import torch
from torch import nn

from .. import ops


_RECOVERABLE = (torch.float32, torch.float64)


class BottleneckAdapter(nn.Module):
    """`down` [m, d] and `up` [d, m] with biases. `up` and both biases start at zero, so the adapter starts as the
    identity (residual + 0); `down` is Kaiming-uniform as nn.Linear's weight, so the first step already moves `up`.
    `save_output`: backward keeps the output instead of the input (see ops.adapter_bottleneck), for a placement whose
    output the model keeps anyway; float32 and float64 only (a 16-bit output's rounding would carry into the recovered
    input, and a 16-bit model's norm keeps a float32 copy rather than the output)."""

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

    def forward(self, h: torch.Tensor, residual: "torch.Tensor | None" = None) -> torch.Tensor:
        return ops.adapter_bottleneck(h, self.down, self.down_bias, self.up, self.up_bias, activation=self.activation,
                                      scale=self.scale, residual=residual,
                                      save_output=self.save_output and residual is None and h.dtype in _RECOVERABLE)

    def extra_repr(self) -> str:
        return (f"hidden={self.up.shape[0]}, bottleneck={self.down.shape[0]}, activation={self.activation}, "
                f"scale={self.scale}")
