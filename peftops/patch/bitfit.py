"""BitFit in adapter mode: only biases train, and the sublayers whose bias trains compute through the BitFit ops.

Nothing is replaced: each covered module keeps its parameters and names and gets a per-instance `forward`, so state
dict keys are the model's own and unpatch restores the instance's previous forward.
- BERT's `BertSelfOutput` / `BertOutput` (`LayerNorm(dropout(dense(x)) + residual)`) run
  `LayerNorm(bias_dropout_add(x W^T, dense.bias, residual, p))`: no dropout mask or pre-dropout activation is kept
  and the bias gradient comes out of the same backward pass.
- Every other nn.Linear / transformers Conv1D with a bias runs `bias_linear` (keeps no activation). This covers
  GPT-2 entirely: its residual add sits in `GPT2Block.forward`, which would have to be rewritten (and differs across
  transformers versions) to fuse it, so GPT-2's `c_proj` layers keep torch's dropout after `bias_linear`.
A call the ops cannot compute exactly (trainable weight, dtype mismatch, extra arguments) runs the original forward."""
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import BitFitConfig
from ..layers.lora import base_weight, conv1d_class
from .adapter import STATE_ATTR, check_unpatched
from .forwards import call_original, is_replaced, replace_forward, restore_forward



@dataclass
class BitFitState:
    config: BitFitConfig
    adapter_name: str
    layer_names: list  # modules whose forward is replaced
    requires_grad: list  # [(parameter, flag)] before patching
    trainable: list  # names of the parameters BitFit trains (the keys of its adapter file)


def _bias_linear_forward(self, x, *args, **kwargs):
    if args or kwargs or self.weight.requires_grad or x.dtype != self.weight.dtype:
        return call_original(self, x, *args, **kwargs)
    return ops.bias_linear(x, base_weight(self), self.bias)


def _output_forward(self, hidden_states, input_tensor, *args, **kwargs):
    dense, drop = self.dense, self.dropout
    if args or kwargs or dense.weight.requires_grad or not (hidden_states.dtype == input_tensor.dtype ==
                                                             dense.weight.dtype == dense.bias.dtype):
        return call_original(self, hidden_states, input_tensor, *args, **kwargs)
    # The bias is left out of the matmul: bias_dropout_add adds it, so its gradient is reduced in its backward.
    h = ops.bias_dropout_add(F.linear(hidden_states, dense.weight), dense.bias, input_tensor, drop.p,
                             training=drop.training)
    return self.LayerNorm(h)


def _fused_output_classes() -> tuple:
    try:
        from transformers.models.bert.modeling_bert import BertOutput, BertSelfOutput
    except ImportError:
        return ()
    return BertSelfOutput.forward, BertOutput.forward


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or \
        "norm" in type(module).__name__.lower()


def _plain(module: nn.Module, forward) -> bool:
    return type(module).forward is forward and not is_replaced(module)


def _plan(model: nn.Module):
    """(fused sublayer names, bias_linear layer names): what gets a new forward, decided before touching anything."""
    fused_forwards = _fused_output_classes()
    fused, skip = [], set()
    for name, m in model.named_modules():
        if type(m).forward in fused_forwards and isinstance(getattr(m, "dense", None), nn.Linear) \
                and m.dense.bias is not None and type(m.dropout) is nn.Dropout and _plain(m.dense, nn.Linear.forward) \
                and not (m.dense._forward_hooks or m.dense._forward_pre_hooks or m.dropout._forward_hooks
                         or m.dropout._forward_pre_hooks):
            fused.append(name)
            skip.add(m.dense)
    conv1d = conv1d_class()
    linear = [n for n, m in model.named_modules() if m not in skip and getattr(m, "bias", None) is not None
              and (_plain(m, nn.Linear.forward) or (conv1d is not None and _plain(m, conv1d.forward)))]
    return fused, linear


def patch_bitfit(model: nn.Module, config: BitFitConfig, adapter_name: str) -> nn.Module:
    check_unpatched(model)
    norm_params = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    trainable = [n for n, p in model.named_parameters() if (n == "bias" or n.endswith(".bias"))
                 and p.is_floating_point() and (config.train_norm_bias or id(p) not in norm_params)]
    if not trainable:
        kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        what = "bias" if config.train_norm_bias else "bias outside its normalisation layers"
        raise ValueError(f"BitFit trains biases, but {kind} has no {what} (e.g. Llama's layers have none)")
    fused, linear = _plan(model)

    flags = [(p, p.requires_grad) for p in model.parameters()]
    params = dict(model.named_parameters())
    for p, _ in flags:
        p.requires_grad_(False)
    for n in trainable:
        params[n].requires_grad_(True)
    for names, forward in ((fused, _output_forward), (linear, _bias_linear_forward)):
        for name in names:
            module = model.get_submodule(name)
            replace_forward(module, forward)
    model.__dict__[STATE_ATTR] = BitFitState(config, adapter_name, fused + linear, flags, trainable)
    return model


def unpatch_bitfit(model: nn.Module) -> nn.Module:
    state = model.__dict__.pop(STATE_ATTR)
    for name in state.layer_names:
        module = model.get_submodule(name)
        restore_forward(module)
    for p, flag in state.requires_grad:
        p.requires_grad_(flag)
    return model
