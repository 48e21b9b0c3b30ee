"""A plain-PyTorch re-implementation of bottleneck adapter placements, written from AdapterHub's (`adapters`)
definition rather than from peftops': its Adapter.pre_forward / forward / post_forward with the `seq_bn` and
`double_seq_bn` / `par_bn` flags, installed on an unpatched model through hooks."""
import torch
import torch.nn.functional as F

from peftops.ops.reference import ACTIVATIONS

# AdapterHub's config flags (configuration/adapter_config.py: SeqBnConfig, DoubleSeqBnConfig, ParBnConfig).
SEQ_BN = dict(original_ln_before=True, original_ln_after=True, residual_before_ln=True, parallel=False)
DOUBLE_SEQ_BN = dict(original_ln_before=False, original_ln_after=True, residual_before_ln=True, parallel=False)
PAR_BN = dict(original_ln_before=False, original_ln_after=True, residual_before_ln=True, parallel=True)
FLAGS = {"pfeiffer": SEQ_BN, "houlsby": DOUBLE_SEQ_BN, "parallel": PAR_BN}


def adapter_up(w, x, activation, scale):
    """scale * up(act(down(x))) from a dict of plain tensors."""
    return scale * F.linear(ACTIVATIONS[activation](F.linear(x, w["down"], w["down_bias"])), w["up"], w["up_bias"])


def adapter_layer(flags, w, activation, scale, h, r, ln):
    """AdapterHub's bottleneck_layer_forward for one adapter: h the sublayer output, r its residual input, ln the
    model's LayerNorm after the add (None on pre-LN models, where the add is all that happens)."""
    if flags["parallel"]:  # ParallelAdapter: reads the residual input, adds h, then the original add + LN
        out = adapter_up(w, r, activation, scale) + h
    else:
        residual, x = h, h  # residual_before_ln=True
        if flags["original_ln_before"]:
            x = h + r
            x = ln(x) if ln is not None else x
        out = adapter_up(w, x, activation, scale) + residual
    return ln(out + r) if ln is not None else out + r


def install(model, placement, weights, activation, scale):
    """Hooks that make an unpatched model compute the placement; `weights` maps a peftops module name (the one
    holding `bottleneck_adapter`) to its adapter tensors. Returns the hook handles."""
    flags, handles, captured = FLAGS[placement], [], {}

    def capture(key):
        def hook(module, args, kwargs):
            captured[key] = args[0] if args else kwargs["hidden_states"]
        return hook

    def bert_forward(module, w):
        def forward(hidden_states, input_tensor):
            h = module.dropout(module.dense(hidden_states))
            return adapter_layer(flags, w, activation, scale, h, input_tensor, module.LayerNorm)
        return forward

    def pre_ln_hook(key, w):
        # The decoder layer adds r after this output: return AdapterHub's result minus r.
        def hook(module, args, kwargs, out):
            h = out if isinstance(out, torch.Tensor) else out[0]
            new = adapter_layer(flags, w, activation, scale, h, captured[key], None) - captured[key]
            return new if isinstance(out, torch.Tensor) else (new,) + tuple(out[1:])
        return hook

    for name, w in weights.items():
        module = model.get_submodule(name)
        parent, _, leaf = name.rpartition(".")
        if hasattr(module, "LayerNorm"):  # BERT's BertOutput / BertSelfOutput
            module.forward = bert_forward(module, w)
            continue
        if leaf == "mlp":
            layer = model.get_submodule(parent)
            norm = layer.post_attention_layernorm if hasattr(layer, "post_attention_layernorm") else layer.ln_2
            handles.append(norm.register_forward_pre_hook(capture(parent + ".ffn"), with_kwargs=True))
            handles.append(module.register_forward_hook(pre_ln_hook(parent + ".ffn", w), with_kwargs=True))
        elif leaf in ("self_attn", "attn"):
            layer = model.get_submodule(parent)
            handles.append(layer.register_forward_pre_hook(capture(parent + ".attn"), with_kwargs=True))
            handles.append(module.register_forward_hook(pre_ln_hook(parent + ".attn", w), with_kwargs=True))
        else:  # Pfeiffer on a pre-LN decoder layer: the adapter sits on the FFN's output, r = the FFN's residual
            mlp = module.mlp
            norm = module.post_attention_layernorm if hasattr(module, "post_attention_layernorm") else module.ln_2
            handles.append(norm.register_forward_pre_hook(capture(name + ".ffn"), with_kwargs=True))
            handles.append(mlp.register_forward_hook(pre_ln_hook(name + ".ffn", w), with_kwargs=True))
    return handles
