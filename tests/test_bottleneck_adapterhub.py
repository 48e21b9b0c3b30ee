"""Interop with AdapterHub: on the same base model and the same adapter weights, peftops' Pfeiffer and Houlsby
and parallel adapters give the outputs of `adapters`' `seq_bn`, `double_seq_bn` and `par_bn` configurations.

`adapters` 1.x pins transformers 4.57: CI runs this file in its transformers 4.57 stage (.ci/run), with
`pip install --no-deps "adapters==1.3.*"`; in a transformers 5.x venv it skips.
(tests/test_bottleneck_adapters.py checks the same placements against a plain-PyTorch re-implementation always.)"""
import copy

import pytest
import torch

import peftops
from peftops.patch.adapter import get_state
from peftops.patch.bottleneck import CHILD
from tiny_models import assert_close, input_ids, output, tiny_bert, tiny_gpt2, tiny_llama

adapters = pytest.importorskip("adapters")

# placement -> (AdapterHub config class name, its activation, ours)
CONFIGS = {"pfeiffer": ("SeqBnConfig", "relu", "relu"), "houlsby": ("DoubleSeqBnConfig", "swish", "silu"),
           "parallel": ("ParBnConfig", "relu", "relu")}


def ours_name(ah_name, placement, ours):
    """AdapterHub's adapter module -> the peftops module holding the same adapter."""
    site = ah_name.rpartition(".adapters.")[0]  # `encoder.layer.0.output` or `model.layers.0.output_adapters`
    layer, _, where = site.rpartition(".")
    if where == "output_adapters":  # pre-LN decoder layer: Pfeiffer wraps the layer, Houlsby and parallel the MLP
        return layer if placement == "pfeiffer" else layer + ".mlp"
    if where == "attention_adapters":  # Llama's self_attn, GPT-2's attn
        return layer + (".self_attn" if hasattr(ours.get_submodule(layer), "self_attn") else ".attn")
    return site  # BERT: the BertOutput / BertSelfOutput holding the adapter


@pytest.mark.parametrize("placement", sorted(CONFIGS))
@pytest.mark.parametrize("builder", [tiny_bert, tiny_llama, tiny_gpt2])
def test_same_outputs_as_adapterhub(builder, placement):
    from adapters.methods.modeling import Adapter
    cls, ah_act, act = CONFIGS[placement]
    base = builder()
    ah = copy.deepcopy(base)
    ours = peftops.patch(base, peftops.AdapterConfig(bottleneck=4, placement=placement, activation=act, scale=0.7))
    adapters.init(ah)
    ah.add_adapter("a", config=getattr(adapters, cls)(reduction_factor=base.config.hidden_size / 4,
                                                      non_linearity=ah_act, scaling=0.7))
    ah.set_active_adapters("a")
    g = torch.Generator().manual_seed(0)
    copied = set()
    with torch.no_grad():
        for name, m in ah.named_modules():
            if isinstance(m, Adapter):
                mine = getattr(ours.get_submodule(ours_name(name, placement, ours)), CHILD)
                for p in mine.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
                m.adapter_down[0].weight.copy_(mine.down)
                m.adapter_down[0].bias.copy_(mine.down_bias)
                m.adapter_up.weight.copy_(mine.up)
                m.adapter_up.bias.copy_(mine.up_bias)
                copied.add(ours_name(name, placement, ours))
    assert copied == set(get_state(ours).layer_names)
    ids = input_ids()
    assert_close(output(ours, ids), output(ah, ids), 1e-5, "output")
