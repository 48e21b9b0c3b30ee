"""Prefix tuning in adapter mode: every self-attention layer attends to its own trainable prefix keys and values
through `ops.prefix_attention` (the prefix is shared by the batch: never expanded, copied or put in a cache). A layer
that trains with attention dropout runs SDPA over the concatenation, as peft does (its numbers under one seed), or,
with PrefixConfig(fused_attention_dropout=True), drops inside the op with the counter-based mask.

Hooked into transformers through its attention-function registry (Llama, GPT-2, BERT in transformers 5.x, and any
family whose attention calls `ALL_ATTENTION_FUNCTIONS`): the model's `_attn_implementation` becomes "peftops_prefix",
whose function finds the layer's prefix on the attention module it is handed. BERT-style self-attention that computes
attention itself (BERT in transformers 4.x) gets its forward replaced by one that calls the same function. The mask transformers builds for it is
SDPA's; `_padding_and_causal` turns it back into the op's [B, S] padding mask and causal flag.

Semantics are peft's `PrefixTuningConfig` (same function on the same weights, peftops.io.prefix_format reads and
writes its files): the prefix of layer l is rows 2l (keys) and 2l+1 (values) of peft's
`[P, layers * 2, Hkv, D]` layout; with `prefix_projection` it is the output of peft's MLP
`Linear(token_dim, hidden) -> tanh -> Linear(hidden, layers * 2 * token_dim)` over P virtual-token embeddings; and,
because peft puts the prefix in the KV cache, positions are shifted by P (`_shift_positions`): a model numbers its
tokens after what its cache holds, BERT's absolute positions as a causal LM's."""
import copy
import dataclasses
import functools
import inspect
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import reference
from ..config import PrefixConfig
from ..layers.wrapped import adapter_dtype
from .adapter import STATE_ATTR, check_unpatched, freeze, restore_flags
from .forwards import replace_forward, restore_forward

ATTN_NAME = "peftops_prefix"
KEY, VALUE = "peftops_prefix_key", "peftops_prefix_value"  # per-layer parameters [Hkv, P, D] on attention modules
ENCODER = "peftops_prefix_encoder"  # the projection MLP (prefix_projection=True), a submodule of the model
_LAYER = "_peftops_prefix_layer"  # attention module -> (layer index, encoder or None), outside its submodules
_FUSED_DROPOUT = "_peftops_prefix_fused_dropout"  # attention module -> PrefixConfig.fused_attention_dropout


@dataclass
class PrefixState:
    config: PrefixConfig
    adapter_name: str
    attention_names: list  # the patched attention modules, in layer order
    requires_grad: list  # freeze's [(name, parameter, flag)] before patching
    configs: list  # [(the model's config or one of its sub-configs, the copy that its modules hold while patched)]
    module_forwards: bool  # the attention modules' forwards were replaced (no attention registry)
    position_hook: object  # handle of the position shift, or None
    num_kv_heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:  # peft's name for the prefix width of one layer's keys (or values)
        return self.num_kv_heads * self.head_dim

    def __setstate__(self, state):
        """A patched model loaded by torch.load (perhaps in another process) needs the attention function again."""
        self.__dict__.update(state)
        register()


class PrefixEncoder(nn.Module):
    """peft's reparameterisation (parameter names as peft's PrefixEncoder, so files map one to one)."""

    def __init__(self, num_tokens, token_dim, hidden, num_layers, dtype=None):
        super().__init__()
        self.num_layers = num_layers
        self.embedding = nn.Embedding(num_tokens, token_dim, dtype=dtype)
        self.transform = nn.Sequential(nn.Linear(token_dim, hidden, dtype=dtype), nn.Tanh(),
                                       nn.Linear(hidden, num_layers * 2 * token_dim, dtype=dtype))

    def full(self) -> torch.Tensor:
        """[P, layers * 2 * token_dim]: peft's `prompt_embeddings`."""
        return self.transform(self.embedding.weight)

    def layer(self, index: int, num_kv_heads: int):
        """(keys, values) [Hkv, P, D] of one layer, through only that layer's rows of the output projection."""
        hidden = self.transform[1](self.transform[0](self.embedding.weight))
        out = self.transform[2]
        rows = out.weight.shape[0] // (2 * self.num_layers)
        sl = slice(2 * index * rows, (2 * index + 2) * rows)
        kv = F.linear(hidden, out.weight[sl], out.bias[sl])
        return split_layer(kv.view(kv.shape[0], 2, num_kv_heads, -1))


def split_layer(kv: torch.Tensor):
    """[P, 2, Hkv, D] -> (keys, values), each [Hkv, P, D]."""
    kv = kv.permute(1, 2, 0, 3)
    return kv[0], kv[1]


def to_peft_layout(prefixes: list) -> torch.Tensor:
    """[(keys, values) [Hkv, P, D] per layer] -> peft's `prompt_embeddings` [P, layers * 2 * Hkv * D]."""
    stacked = torch.stack([t for kv in prefixes for t in kv])  # [layers * 2, Hkv, P, D]
    return stacked.permute(2, 0, 1, 3).reshape(stacked.shape[2], -1)


def from_peft_layout(embeddings: torch.Tensor, num_layers: int, num_kv_heads: int) -> list:
    """Inverse of `to_peft_layout` (peft's get_prompt: view [P, layers * 2, Hkv, D], permute, split by 2)."""
    P = embeddings.shape[0]
    view = embeddings.view(P, num_layers, 2, num_kv_heads, -1)
    return [split_layer(view[:, i]) for i in range(num_layers)]


def layer_prefix(module: nn.Module):
    """(keys, values) [Hkv, P, D] of a patched attention module."""
    index, encoder = module.__dict__[_LAYER]
    if encoder is not None:
        return encoder.layer(index, getattr(module, KEY + "_heads"))
    return getattr(module, KEY), getattr(module, VALUE)


# The attention function ------------------------------------------------------------------------------------------
def _padding_and_causal(mask, batch: int, L: int, S: int, causal: bool):
    """transformers' mask for SDPA ([B|1, 1|H, L|1, S] bool, or additive float; None: no padding) -> the op's
    ([B, S] bool padding mask or None, causal). A full [L, S] mask decides causality itself (transformers 4.x GPT-2
    passes is_causal=False with a causal mask); anything but padding, or padding plus causal masking (packed
    sequences, sliding windows) is refused rather than computed wrongly."""
    if mask is None:
        return None, causal
    if mask.dim() == 2:  # a plain padding mask (custom callers)
        padding = mask.bool()
    else:
        if mask.dim() != 4 or mask.shape[-1] != S or mask.shape[-2] not in (1, L):
            raise ValueError(f"prefix attention: attention mask of shape {tuple(mask.shape)} does not fit queries "
                             f"of length {L} and keys of length {S}")
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        allowed = allowed.amax(1) if allowed.shape[1] > 1 else allowed[:, 0]  # [B|1, L|1, S]
        padding = allowed[:, -1]  # the last query row sees every key that is not padding, causal or not
        if allowed.shape[1] == L and not torch.compiler.is_compiling():  # (reads the mask: eager only)
            causal = _mask_is_causal(allowed, padding, causal)
    padding = padding.expand(batch, S)
    if torch.compiler.is_compiling():  # a traced mask has no values to ask whether it hides anything
        return padding.contiguous(), causal
    return (None if bool(padding.all()) else padding.contiguous()), causal


def _mask_is_causal(allowed, padding, causal: bool) -> bool:
    """Whether a full mask [B|1, L, S] is the padding plus causal masking (aligned to the end), or the padding alone;
    the model's own flag is tried first. Rows that would see no key at all (padding queries) may see none or, opened up
    by transformers, all: with the prefix always visible their output is the same attention over the prefix either
    way. Anything else there (the first sequence of a packed row) is not padding."""
    L, S = allowed.shape[-2:]
    rule = torch.ones(L, S, dtype=torch.bool, device=allowed.device).tril(S - L)
    opened_or_shut = allowed.all(-1, keepdim=True) | ~allowed.any(-1, keepdim=True)
    for candidate in (causal, not causal):
        full = padding[:, None, :] & rule if candidate else padding[:, None, :].expand(-1, L, -1)
        live = full.any(-1, keepdim=True)
        if torch.equal(allowed & live, full & live) and bool((live | opened_or_shut).all()):
            return candidate
    raise ValueError("prefix attention supports padding masks (plus causal masking in causal models); this model's "
                     "attention mask is neither (packed sequences, sliding windows, a static cache?)")


def _materialised(q, k, v, pk, pv, padding, causal, scale, dropout):
    """SDPA over the concatenated prefix and keys, with torch's attention dropout: peft's computation, RNG included."""
    keys, values, allowed = reference.concatenated_prefix(q, k, v, pk, pv, padding, causal)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, dropout_p=dropout, scale=scale)


def prefix_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                             **kwargs):
    """transformers' attention-function signature: q [B, Hq, L, D], k, v [B, Hkv, S, D] -> ([B, L, Hq, D], None)."""
    if _LAYER not in module.__dict__:
        raise RuntimeError(f"{type(module).__name__} runs with attn_implementation={ATTN_NAME!r} but holds no "
                           "prefix: patch the model with peftops.patch(model, PrefixConfig(...))")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"prefix attention does not support {name} ({type(module).__name__})")
    pk, pv = (t.to(query.dtype) for t in layer_prefix(module))
    window, keys = kwargs.get("sliding_window"), pk.shape[-2] + key.shape[2]
    if window is not None and keys > window:  # a window as long as every key (Mistral's 4096, say) changes nothing
        raise ValueError(f"prefix attention does not support a sliding window ({window} keys) shorter than the "
                         f"prefix plus the sequence ({keys} keys) ({type(module).__name__})")
    if scaling is None and hasattr(module, "scale_attn_weights"):  # transformers 4.x GPT-2 leaves its flags to eager
        scaling = query.shape[-1] ** -0.5 if module.scale_attn_weights else 1.0
        if getattr(module, "scale_attn_by_inverse_layer_idx", False):
            scaling /= module.layer_idx + 1
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if torch.compiler.is_compiling():  # the mask cannot be read while tracing: the module says whether it is causal
        causal = getattr(module, "is_causal", causal)
    padding, causal = _padding_and_causal(attention_mask, query.shape[0], query.shape[2], key.shape[2], causal)
    if dropout > 0.0 and not module.__dict__.get(_FUSED_DROPOUT, False):  # (transformers passes 0 outside training)
        out = _materialised(query, key, value, pk, pv, padding, causal, scaling, dropout)
    else:
        out = ops.prefix_attention(query, key, value, pk, pv, attn_mask=padding, is_causal=causal, scale=scaling,
                                   dropout_p=float(dropout))
    return out.transpose(1, 2).contiguous(), None


def register():
    """Idempotent; SDPA's mask builder serves the function, so it receives SDPA's (skippable) masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTN_NAME, prefix_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _self_attention_forward(self, hidden_states, attention_mask=None, head_mask=None, encoder_hidden_states=None,
                            past_key_values=None, output_attentions=False, cache_position=None, **kwargs):
    """The forward of a BERT-style self-attention module that computes attention itself (transformers 4.x BERT and
    its kin): its query, key and value projections, then the registered prefix attention function."""
    if encoder_hidden_states is not None or head_mask is not None or \
            (past_key_values if past_key_values is not None else kwargs.get("past_key_value")) is not None:
        raise ValueError(f"prefix tuning on {type(self).__name__} supports self-attention without cross-attention, "
                         "a head mask or a KV cache")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    B, L, _ = hidden_states.shape
    q, k, v = (getattr(self, name)(hidden_states).view(B, L, self.num_attention_heads, -1).transpose(1, 2)
               for name in ("query", "key", "value"))
    out, _ = ALL_ATTENTION_FUNCTIONS[ATTN_NAME](
        self, q, k, v, attention_mask, dropout=self.dropout.p if self.training else 0.0,
        scaling=self.attention_head_size ** -0.5, is_causal=self.is_decoder)
    return out.reshape(B, L, -1), None


# Patching --------------------------------------------------------------------------------------------------------
def _shape(model):
    """(layers, Hkv, D) as peft derives them from the model config."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = next((getattr(cfg, n) for n in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(cfg, n)), None)
    heads = next((getattr(cfg, n) for n in ("num_attention_heads", "n_head") if hasattr(cfg, n)), None)
    hidden = next((getattr(cfg, n) for n in ("hidden_size", "n_embd", "d_model") if hasattr(cfg, n)), None)
    if None in (layers, heads, hidden):
        raise ValueError(f"prefix tuning: cannot read the layer count, heads and width of {type(cfg).__name__}")
    try:
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    except Exception as e:  # e.g. Gemma4's per-layer head dims, whose global read raises
        raise ValueError(f"prefix tuning needs one head dim for every layer; {type(cfg).__name__} has none: {e}") \
            from None
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"prefix tuning does not support attention logit softcapping ({type(cfg).__name__}."
                         f"attn_logit_softcapping={cfg.attn_logit_softcapping}); set it to None to patch")
    return layers, getattr(cfg, "num_key_value_heads", None) or heads, head_dim


@functools.lru_cache(maxsize=None)
def _forward_source(cls) -> str:
    """The source of a module class's forward ("" when it has none to read)."""
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def _positions_from_mask(model):
    """The class of a module of the model whose forward derives position ids from the attention mask (OPT, BioGpt in
    transformers 4.x), else None. peft's prefix is in that mask, so it numbers a left-padded row's tokens from P,
    where the shift of _shift_positions would count the padding too. Position embeddings themselves (OPT's) count
    from the mask only when given no position ids, and the shift always gives them: they are not asked."""
    for cls in {type(m) for m in model.modules() if not isinstance(m, nn.Embedding)}:
        source = _forward_source(cls)
        if "cumsum(" in source and "position_ids" in source:
            return cls.__name__
    return None


def _attention_modules(model, num_layers):
    """The self-attention modules, in layer order, and whether they call transformers' attention-function registry
    (else they are BERT-style modules that compute attention themselves, as BERT in transformers 4.x: their forward
    is replaced)."""
    registry = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("Attention")
                and hasattr(m, "layer_idx") and hasattr(m, "is_causal") and not getattr(m, "is_cross_attention", False)
                and not any(type(c).__name__.endswith("Attention") and hasattr(c, "layer_idx") for c in m.children())]
    if len(registry) == num_layers:
        own = {type(m).__name__ for _, m in registry if "ALL_ATTENTION_FUNCTIONS" not in _forward_source(type(m))}
        if own:  # switching the model's attention implementation would not reach them: the prefix would be ignored
            raise ValueError(f"prefix tuning needs attention that goes through transformers' attention registry; "
                             f"{', '.join(sorted(own))} computes its own")
        return registry, True
    legacy = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("SelfAttention")
              and "crossattention" not in n and hasattr(m, "attention_head_size") and not hasattr(m, "is_causal")
              and all(isinstance(getattr(m, p, None), nn.Linear) for p in ("query", "key", "value"))]
    if len(legacy) == num_layers:
        relative = {getattr(m, "position_embedding_type", "absolute") for _, m in legacy} - {"absolute"}
        if relative:
            raise ValueError(f"prefix tuning does not support {relative.pop()} position embeddings")
        return legacy, False
    kind = getattr(model.config, "model_type", type(model).__name__)
    raise ValueError(f"prefix tuning supports models whose attention goes through transformers' attention registry "
                     f"(Llama, GPT-2, BERT, ...) and BERT-style self-attention: found {len(registry)} and "
                     f"{len(legacy)} such layers in {kind}, expected {num_layers}")


def _own_config(model) -> list:
    """Gives the model's modules a copy of its config (sub-configs included) that only they hold: the attention
    implementation is switched on the config, which models built from one config object share (a reference model
    beside the patched one, say). Returns the [(original, copy)] pairs that unpatch puts back."""
    copies = {}
    copy.deepcopy(model.config, copies)  # the memo maps id(original) -> its copy, for every object copied
    pairs = [(c, copies[id(c)]) for c in _configs(model.config)]
    _hand_configs(model, {id(original): c for original, c in pairs})
    return pairs


def _configs(config) -> list:
    """A transformers config and its sub-configs (a composite model's text_config, ...)."""
    from transformers import PretrainedConfig
    subs = [v for v in vars(config).values() if isinstance(v, PretrainedConfig)]
    return [config] + [c for s in subs for c in _configs(s)]


def _hand_configs(model, replacement: dict):
    """Every module of the model that holds a config whose id is a key of `replacement` holds its value instead."""
    for module in model.modules():
        held = module.__dict__.get("config")
        if id(held) in replacement:
            module.config = replacement[id(held)]


def _set_attn_implementation(model, name):
    try:
        model.set_attn_implementation(name)
    except AttributeError:  # older transformers
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:
        model.config._attn_implementation = name


def _shift_positions(num_tokens, drop_token_types, module, args, kwargs):
    """The base model's forward pre-hook (bound to P with functools.partial, so a patched model pickles). peft keeps
    the prefix in the cache, so the model numbers its tokens after it (causal LMs and BERT alike): positions given are
    shifted by P, and absent ones are P + the cache length + 0 .. L-1 (what the model computes with P more cached
    tokens). peft also ignores token type ids, with a warning, for every task but classification and QA."""
    if drop_token_types and kwargs.get("token_type_ids") is not None:
        if not torch.compiler.is_compiling():  # (dynamo cannot trace warnings.warn)
            warnings.warn("prefix tuning ignores token type ids outside classification models, as peft does")
        kwargs["token_type_ids"] = None
    pos = kwargs.get("position_ids")
    if pos is None:
        x = kwargs.get("input_ids")
        x = kwargs.get("inputs_embeds") if x is None else x
        x = args[0] if x is None and args else x
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None:
            past = 0
        elif hasattr(cache, "get_seq_length"):
            past = cache.get_seq_length()
        else:  # legacy tuple of (keys, values) per layer
            past = cache[0][0].shape[-2]
        if kwargs.get("cache_position") is not None:
            pos = kwargs["cache_position"].unsqueeze(0)
        else:
            pos = torch.arange(past, past + x.shape[1], device=x.device).unsqueeze(0)
    kwargs["position_ids"] = pos + num_tokens
    return args, kwargs


def patch_prefix(model: nn.Module, config: PrefixConfig, adapter_name: str) -> nn.Module:
    check_unpatched(model)
    if not hasattr(model, "config") or not hasattr(model.config, "_attn_implementation"):
        raise ValueError(f"prefix tuning patches transformers models, not {type(model).__name__}")
    num_layers, num_kv, head_dim = _shape(model)
    found, through_registry = _attention_modules(model, num_layers)
    embeddings = getattr(model.base_model, "embeddings", None)
    if getattr(embeddings, "padding_idx", None) is not None and hasattr(embeddings, "position_embeddings"):
        # RoBERTa-style positions count from padding_idx + 1 over the real tokens and, with peft's prefix in the
        # cache, after it: not the positions _shift_positions gives, so refused rather than computed differently
        raise ValueError(f"prefix tuning does not support {type(embeddings).__name__}'s padding-based position ids "
                         "(RoBERTa-style models)")
    counting = _positions_from_mask(model)
    if counting is not None:
        raise ValueError(f"prefix tuning does not support {counting}'s position ids counted from the attention mask")
    register()

    # float32 over a 16-bit model, as peft's prompt encoder (cast to the queries' dtype in attention)
    P, dtype = config.num_virtual_tokens, adapter_dtype(next(model.parameters()).dtype)
    device = next(model.parameters()).device
    flags = freeze(model)
    encoder = None
    if config.prefix_projection:
        hidden = config.encoder_hidden_size or num_kv * head_dim
        encoder = PrefixEncoder(P, num_kv * head_dim, hidden, num_layers, dtype).to(device)
        model.add_module(ENCODER, encoder)
    for index, (_, module) in enumerate(found):
        module.__dict__[_LAYER] = (index, encoder)
        module.__dict__[KEY + "_heads"] = num_kv
        module.__dict__[_FUSED_DROPOUT] = config.fused_attention_dropout
        if encoder is None:  # peft's init: its nn.Embedding is N(0, 1)
            for name in (KEY, VALUE):
                module.register_parameter(name, nn.Parameter(torch.randn(num_kv, P, head_dim, dtype=dtype,
                                                                         device=device)))
    from ..io.peft_format import head_task  # (io imports patch)
    hook = model.base_model.register_forward_pre_hook(
        functools.partial(_shift_positions, P, head_task(model)[0] is None), with_kwargs=True)
    configs = []
    if through_registry:
        configs = _own_config(model)
        _set_attn_implementation(model, ATTN_NAME)
    else:
        for _, module in found:
            replace_forward(module, _self_attention_forward)
    model.__dict__[STATE_ATTR] = PrefixState(config, adapter_name, [n for n, _ in found], flags, configs,
                                             not through_registry, hook, num_kv, head_dim)
    return model


def prefixes(model, state) -> list:
    """[(keys, values)] per layer, as the model computes them now."""
    return [layer_prefix(model.get_submodule(n)) for n in state.attention_names]


def merge_prefix(model: nn.Module) -> nn.Module:
    """Fold the projection MLP away: its per-layer output becomes plain prefix parameters (the model stays patched,
    since a prefix lives in attention, not in any base weight). Plain prefixes have nothing to fold."""
    state = model.__dict__[STATE_ATTR]
    if not state.config.prefix_projection:
        return model
    with torch.no_grad():
        values = [(k.clone(), v.clone()) for k, v in prefixes(model, state)]
    for name, (k, v) in zip(state.attention_names, values):
        module = model.get_submodule(name)
        module.__dict__[_LAYER] = (module.__dict__[_LAYER][0], None)
        module.register_parameter(KEY, nn.Parameter(k))
        module.register_parameter(VALUE, nn.Parameter(v))
    delattr(model, ENCODER)
    state.config = dataclasses.replace(state.config, prefix_projection=False, encoder_hidden_size=None)
    return model


def unpatch_prefix(model: nn.Module) -> nn.Module:
    state = model.__dict__.pop(STATE_ATTR)
    for name in state.attention_names:
        module = model.get_submodule(name)
        for attr in (_LAYER, KEY + "_heads", _FUSED_DROPOUT):
            module.__dict__.pop(attr, None)
        for attr in (KEY, VALUE):
            module._parameters.pop(attr, None)
        if state.module_forwards:
            restore_forward(module)
    if ENCODER in model._modules:
        delattr(model, ENCODER)
    if state.position_hook is not None:
        state.position_hook.remove()
    _hand_configs(model, {id(c): original for original, c in state.configs})  # the originals, never switched
    restore_flags(model, state.requires_grad)
    return model
