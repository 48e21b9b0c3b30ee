"""BitFit in adapter mode: only biases train, and the sublayers whose bias trains compute through the BitFit ops.

Nothing is replaced: each covered module keeps its parameters and names and gets a per-instance `forward`, so state
dict keys are the model's own and unpatch restores the instance's previous forward.
- BERT's `BertSelfOutput` / `BertOutput` (`LayerNorm(dropout(dense(x)) + residual)`) run
  `LayerNorm(bias_dropout_add(x W^T, dense.bias, residual, p))`: no dropout mask or pre-dropout activation is kept
  and the bias gradient comes out of the same backward pass.
- GPT-2's blocks (`GPT2Block`, whose residual adds sit in the block's forward) get a forward that hands each
  sublayer's residual to the sublayer's output dropout: the `c_proj` before it leaves its bias out and the dropout
  computes `bias_dropout_add(h, c_proj.bias, residual, p)`, so the block's `sublayer + residual` is the op's. Calls
  with cross-attention or asking for attention weights run the block's own forward, in which the same `c_proj` and
  dropout behave as the unfused pair (`bias_linear`, then torch's dropout).
- Every other nn.Linear / transformers Conv1D with a bias runs `bias_linear` (keeps no activation).
A call the ops cannot compute exactly (trainable weight, dtype mismatch, extra arguments) runs the original forward."""
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import BitFitConfig
from ..layers.wrapped import base_weight, conv1d_class
from .adapter import STATE_ATTR, check_unpatched, freeze, restore_flags
from .forwards import call_original, one_dtype_for_ops, replace_forward, restore_forward, thread_slot


@dataclass
class BitFitState:
    config: BitFitConfig
    adapter_name: str
    layer_names: list  # modules whose forward is replaced
    requires_grad: list  # freeze's [(name, parameter, flag)] before patching
    trainable: list  # names of the parameters BitFit trains (the keys of its adapter file)


def _bias_linear_forward(self, x, *args, **kwargs):
    if args or kwargs or self.weight.requires_grad or not one_dtype_for_ops(x, self.weight):
        return call_original(self, x, *args, **kwargs)
    return ops.bias_linear(x, base_weight(self), self.bias)


def _output_forward(self, hidden_states, input_tensor, *args, **kwargs):
    dense, drop = self.dense, self.dropout
    if args or kwargs or dense.weight.requires_grad or (drop.training and drop.p >= 1.0) or not one_dtype_for_ops(
            hidden_states, input_tensor, dense.weight, dense.bias):
        return call_original(self, hidden_states, input_tensor, *args, **kwargs)
    # The bias is left out of the matmul: bias_dropout_add adds it, so its gradient is reduced in its backward.
    h = ops.bias_dropout_add(F.linear(hidden_states, dense.weight), dense.bias, input_tensor, drop.p,
                             training=drop.training)
    return self.LayerNorm(h)


# GPT-2: the block hands a sublayer's residual to its output dropout through the dropout's _RESIDUAL, a dict with a
# slot per thread (threads may share a model; a block's own forward, unfused, finds no residual in its thread's). While
# tracing it goes through the plain attribute _TRACED instead: dynamo follows a setattr, where a dict written in the
# trace breaks the next block's signature.bind (a mappingproxy read). The projection and the dropout of one sublayer
# know each other through _PAIR.
_RESIDUAL, _TRACED, _PAIR, _BLOCK_API = "_peftops_residual", "_peftops_traced", "_peftops_pair", "_peftops_block_api"


def _handed_residual(dropout):
    """The residual the running sublayer handed to `dropout`, or None when it runs unfused."""
    traced = getattr(dropout, _TRACED)
    if torch.compiler.is_compiling():
        return traced
    residual = getattr(dropout, _RESIDUAL).get(thread_slot())
    return traced if residual is None else residual  # (traced: handed over in a graph, read after a graph break)


def _block_projection_forward(self, x, *args, **kwargs):
    if _handed_residual(self.__dict__[_PAIR]) is None:
        return _bias_linear_forward(self, x, *args, **kwargs)
    return F.linear(x, base_weight(self))  # the bias goes to bias_dropout_add


def _block_dropout_forward(self, h):
    residual = _handed_residual(self)
    if residual is None:
        return call_original(self, h)
    if self.training and self.p >= 1.0:  # nn.Dropout's p = 1 (everything dropped), which the op does not take
        return residual + call_original(self, h + self.__dict__[_PAIR].bias)
    return ops.bias_dropout_add(h, self.__dict__[_PAIR].bias, residual, self.p, training=self.training)


def _sublayer(block_part, residual, dropout, *args, **kwargs):
    """Runs a GPT-2 sublayer with its residual handed to its output dropout: the result already holds the residual."""
    if torch.compiler.is_compiling():
        setattr(dropout, _TRACED, residual)
        try:
            return block_part(*args, **kwargs)
        finally:
            setattr(dropout, _TRACED, None)
    slots, slot = getattr(dropout, _RESIDUAL), thread_slot()
    slots[slot] = residual
    try:
        return block_part(*args, **kwargs)
    finally:
        del slots[slot]


def _compiling_a_checkpoint(block) -> bool:
    """Whether dynamo traces this block inside activation checkpointing, where it refuses the residual handed from
    block to dropout (a side effect): the block's own forward, whose bias_linear projections hand nothing, runs."""
    return torch.compiler.is_compiling() and getattr(block, "gradient_checkpointing", False) and block.training and \
        torch.is_grad_enabled()


def _gpt2_block_forward(self, *args, **kwargs):
    """GPT2Block's forward (transformers 4.57 or 5: one signature read at patch time) with each sublayer's residual add
    fused into its output dropout; cross-attention and returned attention weights run the block's own forward."""
    names, positional, takes_kwargs, returns_tuple = self.__dict__[_BLOCK_API]
    # Signature.bind by hand: dynamo before torch 2.1x does not trace it (a graph break per block)
    named, extra = dict(zip(names, args)), {}
    for key, value in kwargs.items():
        (named if key in names else extra)[key] = value
    if len(args) > positional or (extra and not takes_kwargs) or named.get("encoder_hidden_states") is not None or \
            named.get("output_attentions") or _compiling_a_checkpoint(self):
        return call_original(self, *args, **kwargs)
    hidden = named.pop("hidden_states")
    attn_args = {k: v for k, v in named.items() if k not in ("self", "encoder_hidden_states", "encoder_attention_mask")}
    hidden = _sublayer(self.attn, hidden, self.attn.resid_dropout, self.ln_1(hidden), **attn_args, **extra)[0]
    hidden = _sublayer(self.mlp, hidden, self.mlp.dropout, self.ln_2(hidden))
    return (hidden,) if returns_tuple else hidden


def _gpt2_blocks(model: nn.Module) -> list:
    """[(block name, [(projection name, dropout name)] of attention and MLP)] of the GPT2Blocks the fused forward
    takes: plain Conv1D projections with biases, plain dropouts, no hooks, and a block whose forward is its class's
    (one that accelerate's hooks or anyone else set on the instance runs as it is)."""
    try:
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    except ImportError:
        return []
    conv1d, found = conv1d_class(), []
    for name, block in model.named_modules():
        if not (type(block) is GPT2Block and _plain(block, GPT2Block.forward) and not block._forward_pre_hooks):
            continue
        pairs = [(f"{name}.attn.c_proj", f"{name}.attn.resid_dropout"), (f"{name}.mlp.c_proj", f"{name}.mlp.dropout")]
        modules = [(model.get_submodule(p), model.get_submodule(d)) for p, d in pairs]
        if all(type(p) is conv1d and p.bias is not None and type(d) is nn.Dropout and _skippable(p, conv1d.forward)
               and _skippable(d, nn.Dropout.forward) for p, d in modules):
            found.append((name, pairs))
    return found


def _block_api(block: nn.Module):
    """(the block forward's parameter names after self, how many of them come positionally, whether it takes
    **kwargs, whether it returns a tuple): transformers 4.57's takes output_attentions and returns (hidden_states,
    ...); 5's returns the hidden states."""
    parameters = list(inspect.signature(type(block).forward).parameters.values())[1:]
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    positional = sum(p.kind == p.POSITIONAL_OR_KEYWORD for p in parameters)
    return names, positional, any(p.kind == p.VAR_KEYWORD for p in parameters), "output_attentions" in names


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
    """The module runs its class's `forward`: none set on the instance (by peftops, or by accelerate's hooks)."""
    return type(module).forward is forward and "forward" not in module.__dict__


def _skippable(module: nn.Module, forward) -> bool:
    """_plain and without hooks: a module whose call a fused forward may take over (its hooks would not run)."""
    return _plain(module, forward) and not (module._forward_hooks or module._forward_pre_hooks)


def _plan(model: nn.Module):
    """(fused sublayer names, bias_linear layer names, GPT-2 blocks): what gets a new forward, decided before touching
    anything."""
    fused_forwards = _fused_output_classes()
    fused, skip = [], set()
    for name, m in model.named_modules():
        if type(m).forward in fused_forwards and "forward" not in m.__dict__ \
                and isinstance(getattr(m, "dense", None), nn.Linear) and m.dense.bias is not None \
                and type(m.dropout) is nn.Dropout and _skippable(m.dropout, nn.Dropout.forward) \
                and _skippable(m.dense, nn.Linear.forward):
            fused.append(name)
            skip.add(m.dense)
    blocks = _gpt2_blocks(model)
    skip |= {model.get_submodule(p) for _, pairs in blocks for p, _ in pairs}
    conv1d = conv1d_class()
    linear = [n for n, m in model.named_modules() if m not in skip and getattr(m, "bias", None) is not None
              and (_plain(m, nn.Linear.forward) or (conv1d is not None and _plain(m, conv1d.forward)))]
    return fused, linear, blocks


def patch_bitfit(model: nn.Module, config: BitFitConfig, adapter_name: str) -> nn.Module:
    check_unpatched(model)
    norm_params = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    trainable = [n for n, p in model.named_parameters() if (n == "bias" or n.endswith(".bias"))
                 and p.is_floating_point() and (config.train_norm_bias or id(p) not in norm_params)]
    if not trainable:
        kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        what = "bias" if config.train_norm_bias else "bias outside its normalisation layers"
        raise ValueError(f"BitFit trains biases, but {kind} has no {what} (e.g. Llama's layers have none)")
    fused, linear, blocks = _plan(model)

    flags = freeze(model)
    params = dict(model.named_parameters())
    for n in trainable:
        params[n].requires_grad_(True)
    for names, forward in ((fused, _output_forward), (linear, _bias_linear_forward)):
        for name in names:
            module = model.get_submodule(name)
            replace_forward(module, forward)
    replaced = fused + linear
    for block, pairs in blocks:
        module = model.get_submodule(block)
        module.__dict__[_BLOCK_API] = _block_api(module)
        replace_forward(module, _gpt2_block_forward)
        replaced.append(block)
        for proj_name, dropout_name in pairs:
            proj, dropout = model.get_submodule(proj_name), model.get_submodule(dropout_name)
            proj.__dict__[_PAIR], dropout.__dict__[_PAIR] = dropout, proj
            setattr(dropout, _RESIDUAL, {})
            setattr(dropout, _TRACED, None)
            replace_forward(proj, _block_projection_forward)
            replace_forward(dropout, _block_dropout_forward)
            replaced += [proj_name, dropout_name]
    model.__dict__[STATE_ATTR] = BitFitState(config, adapter_name, replaced, flags, trainable)
    return model


def unpatch_bitfit(model: nn.Module) -> nn.Module:
    state = model.__dict__.pop(STATE_ATTR)
    for name in state.layer_names:
        module = model.get_submodule(name)
        restore_forward(module)
        for attr in (_PAIR, _RESIDUAL, _TRACED, _BLOCK_API):
            module.__dict__.pop(attr, None)
    restore_flags(model, state.requires_grad)
    return model
