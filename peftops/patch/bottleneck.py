"""Bottleneck adapters (Pfeiffer, Houlsby, parallel) in adapter mode, placed as AdapterHub (`adapters`) places them.

Nothing is replaced: each covered module gets a `bottleneck_adapter` child (so its parameters are in the state dict
and move with the model) and a per-instance `forward`; unpatch removes both. With A(x) = scale * up(act(down(x))),
s the sublayer output h plus the model's residual r:
- Pfeiffer (AdapterHub `seq_bn`: original_ln_before, residual_before_ln): after the feed-forward block, the adapter
  reads the post-add stream (BERT: normed) and its residual is h, before the model's own add and LayerNorm.
    BERT  `BertOutput`:        LN(s + A(LN(s)))      pre-LN (Llama, GPT-2) decoder layer: s + A(s)
- Houlsby (`double_seq_bn`): after attention and after the feed-forward block, on h itself.
    BERT  `BertSelfOutput`, `BertOutput`: LN(s + A(h))     pre-LN: attention and MLP outputs h -> h + A(h)
  On a Llama-style attention, whose output is o_proj's, o_proj runs the adapter and backward keeps o_proj's input
  (which attention keeps anyway) in place of h (`_projected_forward`).
- Parallel (`par_bn`, He et al. 2021): beside the feed-forward block, reading the stream r that enters it.
    BERT  `BertOutput` (r is its residual): LN(s + A(r))    pre-LN MLP: mlp(LN(r)) + A(r), r the un-normed stream,
  which the feed-forward norm hands on to the MLP (`_hand_on_input`), as AdapterHub reads it.
Every form is one `adapter_bottleneck` call whose residual is the tensor the model adds anyway."""
from dataclasses import dataclass

import torch
from torch import nn

from ..config import AdapterConfig
from ..layers.bottleneck import BottleneckAdapter
from ..layers.wrapped import adapter_dtype
from .adapter import STATE_ATTR, check_unpatched, freeze, restore_flags
from .forwards import call_original, is_replaced, replace_forward, restore_forward, thread_slot

CHILD = "bottleneck_adapter"
# Parallel placement on a pre-LN layer: the feed-forward norm keeps its input in its STREAM (a dict: a slot per thread,
# as threads may share a model; one slot while tracing) for the MLP, which finds that norm through NORM (a plain
# attribute, not a submodule). The MLP reads the norm's attribute itself, so a copy of it (torch.export makes one) is
# still the one the norm writes.
STREAM, NORM = "_peftops_stream", "_peftops_norm"


@dataclass
class BottleneckState:
    config: AdapterConfig
    adapter_name: str
    layer_names: list  # modules given an adapter child (and, but for a Llama attention, a new forward)
    relay_names: list  # modules given only a new forward (the norm that hands r on to a parallel adapter, the o_proj
    # that runs its attention's adapter)
    requires_grad: list  # freeze's [(name, parameter, flag)] before patching


def _post_forward(self, *args, **kwargs):
    """h -> h + A(h) on the output (a tensor, or the first element of a tuple as attention modules return)."""
    out = call_original(self, *args, **kwargs)
    if isinstance(out, torch.Tensor):
        return getattr(self, CHILD)(out)
    return (getattr(self, CHILD)(out[0]),) + tuple(out[1:])


def _layer_forward(self, *args, **kwargs):
    """Pfeiffer on a pre-LN decoder layer: s -> s + A(s) on the layer's output. The next norm keeps that output for
    its backward anyway, so the adapter keeps it too in place of s (save_output): s costs no memory."""
    return _post_forward(self, *args, **kwargs)


# Attentions that return o_proj's output as it is: on them the Houlsby adapter moves into o_proj (_projected_forward).
_PLAIN_OUTPUT_ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")


def _ends_in_plain_projection(attention: nn.Module) -> bool:
    return type(attention).__name__ in _PLAIN_OUTPUT_ATTENTIONS and type(getattr(attention, "o_proj", None)) is nn.Linear


def _projected_forward(self, x):
    """A Llama attention's o_proj with the attention's Houlsby adapter: o_proj(x) -> h + A(h), the same as on the
    attention's output, but keeping x (the attention output, which SDPA keeps anyway) for backward instead of h."""
    return getattr(self, CHILD).projected(x, self.weight, self.bias)


def _hand_on_input(self, x, *args, **kwargs):
    """A pre-LN layer's feed-forward norm: its input r goes on to the MLP's parallel adapter."""
    getattr(self, STREAM)[thread_slot()] = x
    return call_original(self, x, *args, **kwargs)


def _parallel_forward(self, x, *args, **kwargs):
    """mlp(LN(r)) + A(r), r as the norm handed it on (taken, so no activation outlives the layer's forward)."""
    stream = getattr(self.__dict__[NORM], STREAM)
    r = stream.pop(thread_slot(), None)
    if r is None and not torch.compiler.is_compiling():
        r = stream.pop(0, None)  # the norm ran in a traced graph, this MLP after a graph break
    if r is None:
        raise RuntimeError("parallel bottleneck adapter: the MLP ran without its layer's feed-forward norm before it")
    out = call_original(self, x, *args, **kwargs)
    if isinstance(out, torch.Tensor):
        return getattr(self, CHILD)(r, residual=out)
    return (getattr(self, CHILD)(r, residual=out[0]),) + tuple(out[1:])  # a MoE block's router logits ride along


def _bert_pfeiffer_forward(self, hidden_states, input_tensor):
    s = self.dropout(self.dense(hidden_states)) + input_tensor
    return self.LayerNorm(getattr(self, CHILD)(self.LayerNorm(s), residual=s))


def _bert_houlsby_forward(self, hidden_states, input_tensor):
    h = self.dropout(self.dense(hidden_states))
    return self.LayerNorm(getattr(self, CHILD)(h, residual=h + input_tensor))


def _bert_parallel_forward(self, hidden_states, input_tensor):
    s = self.dropout(self.dense(hidden_states)) + input_tensor
    return self.LayerNorm(getattr(self, CHILD)(input_tensor, residual=s))


def _is_bert_output(m) -> bool:
    return all(isinstance(getattr(m, a, None), t) for a, t in
               (("dense", nn.Linear), ("LayerNorm", nn.LayerNorm), ("dropout", nn.Dropout)))


def _layers(model):
    """(family, layer name, layer) for every transformer layer of a supported family."""
    for name, m in model.named_modules():
        if all(hasattr(m, a) for a in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")):
            yield "llama", name, m
        elif all(hasattr(m, a) for a in ("attn", "mlp", "ln_1", "ln_2")):
            yield "gpt2", name, m
        elif hasattr(m, "intermediate") and _is_bert_output(getattr(m, "output", None)) and \
                _is_bert_output(getattr(getattr(m, "attention", None), "output", None)):
            yield "bert", name, m


# (family, placement) -> [(submodule of the layer, new forward)]; "" is the layer itself. Every module listed gets an
# adapter child but those whose forward only relays the stream (_hand_on_input).
_PLAN = {
    ("llama", "pfeiffer"): [("", _layer_forward)],
    ("llama", "houlsby"): [("self_attn", _post_forward), ("mlp", _post_forward)],
    ("llama", "parallel"): [("post_attention_layernorm", _hand_on_input), ("mlp", _parallel_forward)],
    ("gpt2", "pfeiffer"): [("", _layer_forward)],
    ("gpt2", "houlsby"): [("attn", _post_forward), ("mlp", _post_forward)],
    ("gpt2", "parallel"): [("ln_2", _hand_on_input), ("mlp", _parallel_forward)],
    ("bert", "pfeiffer"): [("output", _bert_pfeiffer_forward)],
    ("bert", "houlsby"): [("attention.output", _bert_houlsby_forward), ("output", _bert_houlsby_forward)],
    ("bert", "parallel"): [("output", _bert_parallel_forward)],
}


def _plan(model, placement: str) -> list:
    """[(module name, new forward, layer name)] for every layer of the model."""
    plan = []
    for family, name, layer in _layers(model):
        for sub, forward in _PLAN[family, placement]:
            if sub == "post_attention_layernorm" and hasattr(layer, "pre_feedforward_layernorm"):
                sub = "pre_feedforward_layernorm"  # Gemma-style layers norm the MLP input with their own norm
            full = ".".join(n for n in (name, sub) if n)
            target = layer
            for attr in sub.split(".") if sub else ():
                target = getattr(target, attr, None)
            if not isinstance(target, nn.Module):
                raise ValueError(f"{placement} bottleneck adapters need {sub} in every {family}-style layer; {name} "
                                 f"has none (a layer with a parallel residual has no norm between attention and MLP)")
            plan.append((full, forward, name))
    if not plan:
        kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        raise ValueError(f"bottleneck adapters support the Llama, GPT-2 and BERT families; found no such layers in "
                         f"{kind}")
    return plan


def _hidden_size(model) -> int:
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise ValueError(f"bottleneck adapters need model.config.hidden_size; {type(model).__name__} has none")
    return hidden


def patch_adapter(model: nn.Module, config: AdapterConfig, adapter_name: str) -> nn.Module:
    check_unpatched(model)
    plan = _plan(model, config.placement)  # validated before the model is touched
    hidden = _hidden_size(model)
    flags = freeze(model)
    norms, holders, relays = {}, [], []
    for name, forward, layer in plan:
        module = model.get_submodule(name)
        if forward is not _hand_on_input:
            ref = next(module.parameters())  # the adapter lives on the sublayer's device, in float32 over 16 bits
            module.add_module(CHILD, BottleneckAdapter(hidden, config.bottleneck, config.activation, config.scale,
                                                       save_output=forward is _layer_forward,
                                                       dtype=adapter_dtype(ref.dtype), device=ref.device))
            holders.append(name)
        if forward is _hand_on_input:
            setattr(module, STREAM, {})
            norms[layer] = module
        if forward is _parallel_forward:
            module.__dict__[NORM] = norms[layer]  # (the plan lists a layer's norm before its MLP)
        if forward is _post_forward and _ends_in_plain_projection(module):
            # the attention keeps its adapter (and its state-dict keys); its o_proj runs it
            module.o_proj.__dict__[CHILD] = getattr(module, CHILD)
            module, name = module.o_proj, f"{name}.o_proj"
            forward = _projected_forward
        if forward in (_hand_on_input, _projected_forward):
            relays.append(name)
        replace_forward(module, forward)
    model.__dict__[STATE_ATTR] = BottleneckState(config, adapter_name, holders, relays, flags)
    return model


def unpatch_adapter(model: nn.Module) -> nn.Module:
    state = model.__dict__.pop(STATE_ATTR)
    for name in state.layer_names + state.relay_names:
        module = model.get_submodule(name)
        for attr in (CHILD, STREAM, NORM):
            if attr in module.__dict__ or attr in module._modules:
                delattr(module, attr)
        if is_replaced(module):  # (an attention whose o_proj runs its adapter keeps its own forward)
            restore_forward(module)
    restore_flags(model, state.requires_grad)
    return model


def adapter_parameters(model: nn.Module, state: BottleneckState) -> dict:
    """State-dict name -> parameter of every adapter (the keys of its file)."""
    return {f"{name}.{CHILD}.{p}": getattr(model.get_submodule(name), CHILD).get_parameter(p)
            for name in state.layer_names for p in ("down", "down_bias", "up", "up_bias")}
