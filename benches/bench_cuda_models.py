"""Model level on CUDA: a training step (forward, backward, AdamW) of SmolLM2-135M's architecture with random weights
(the GPU machine has no model files; speed does not depend on the values), bfloat16, batch 8, seq 512, for each
technique computed by peftops against peft (or, for bottleneck adapters, the same placement in plain PyTorch) and the
frozen model's forward+backward (the baseline of time, saved bytes and peak memory). Skipped without a GPU.
    pytest benches/bench_cuda_models.py --benchmark-only
"""

import peft
import pytest
import torch

import peftops
from bench_bottleneck import _plain
from benchutil import cuda_step_peak, record, saved_bytes, sync
from peftops.layers import BottleneckAdapter

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BATCH, SEQ = 8, 512
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_architecture():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         rope_theta=100000.0, tie_word_embeddings=True)
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16)


def build(technique, impl):
    base = smollm2_architecture()
    if impl == "frozen":
        return base.requires_grad_(False)
    if technique in ("lora", "dora"):
        dora = technique == "dora"
        if impl == "peftops":
            return peftops.patch(base, peftops.LoraConfig(r=16, alpha=32, dropout=0.1, target_modules=TARGETS,
                                                          use_dora=dora))
        model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1,
                                                          target_modules=TARGETS, use_dora=dora))
        return peftops.patch(model) if impl == "peft+peftops" else model
    if technique == "ia3":
        if impl == "peftops":
            return peftops.patch(base, peftops.IA3Config())
        return peft.get_peft_model(base, peft.IA3Config(target_modules=None, feedforward_modules=None))
    if technique == "prefix":
        if impl == "peftops":
            return peftops.patch(base, peftops.PrefixConfig(20))
        return peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))
    model = peftops.patch(base, peftops.AdapterConfig(bottleneck=36, placement=technique))  # reduction factor 16
    if impl == "torch":
        for module in model.modules():
            if isinstance(module, BottleneckAdapter):
                module.forward = _plain(module)
    return model


CASES = [pytest.param(t, i, id=f"{t}-{i}") for t, impls in [
    ("frozen", ["frozen"]), ("lora", ["peftops", "peft", "peft+peftops"]), ("dora", ["peftops", "peft"]),
    ("ia3", ["peftops", "peft"]), ("prefix", ["peftops", "peft"]), ("pfeiffer", ["peftops", "torch"]),
    ("houlsby", ["peftops", "torch"])] for i in impls]


@pytest.mark.parametrize("technique,impl", CASES)
def test_smollm2_step_cuda(benchmark, technique, impl):
    benchmark.group = f"smollm2-arch train cuda bf16 b{BATCH} s{SEQ}"
    model = build(technique, impl).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    ids = torch.randint(49152, (BATCH, SEQ), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    embeds = None
    if impl == "frozen":  # nothing trains: backpropagate to the input embeddings, as far as every adapter's would go
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()

    def loss():
        if embeds is not None:
            return model(inputs_embeds=embeds, labels=ids).loss
        return model(input_ids=ids, labels=ids).loss

    def step():
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss().backward()
        if opt is not None:
            opt.step()
        sync("cuda")

    frozen = [p for p in model.parameters() if not p.requires_grad]
    _, saved = saved_bytes(loss, exclude=params + frozen)
    record(benchmark, family="smollm2_arch_step", impl=f"{technique}:{impl}" if impl != "frozen" else "frozen",
           device="cuda", dtype=torch.bfloat16, saved=saved, peak_bytes=cuda_step_peak(step), batch=BATCH, seq=SEQ,
           trainable=sum(p.numel() for p in params))
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
