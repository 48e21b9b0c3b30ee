"""IA3 on the down projection of a gated feed-forward block (Llama's MLP and the families that copy it): the block's
forward becomes `down_proj.gated(act_fn(gate_proj(x)), up_proj(x))`, so that the product `act * up` that peft scales
is never kept for backward (ops.ia3_glu_linear keeps its two factors, which the block keeps anyway). Only blocks whose
forward is Llama's, bytecode for bytecode, are taken over; others keep the plain IA3 layer."""
from torch import nn

from ..layers.ia3 import Ia3Linear
from .forwards import replace_forward, restore_forward


def _llama_mlp_code():
    try:
        from transformers.models.llama.modeling_llama import LlamaMLP
    except ImportError:
        return None
    return LlamaMLP.forward.__code__


def _is_llama_mlp(module: nn.Module) -> bool:
    code, own = _llama_mlp_code(), getattr(type(module).forward, "__code__", None)
    return None not in (code, own) and own.co_code == code.co_code and own.co_names == code.co_names \
        and "forward" not in module.__dict__


def _gated_forward(self, x):
    return self.down_proj.gated(self.act_fn(self.gate_proj(x)), self.up_proj(x))


def fuse_gated_blocks(model: nn.Module) -> list:
    """Takes over the blocks whose down projection is a feed-forward Ia3Linear; returns their names."""
    names = []
    for name, module in model.named_modules():
        down = getattr(module, "down_proj", None)
        if isinstance(down, Ia3Linear) and down.feedforward and _is_llama_mlp(module):
            replace_forward(module, _gated_forward)
            names.append(name)
    return names


def unfuse_gated_blocks(model: nn.Module, names: list) -> None:
    for name in names:
        restore_forward(model.get_submodule(name))
