"""Prefix tuning: prefix_attention forward+backward against SDPA over the materialised, batch-expanded
concatenation (issue 3's shapes: B=8, Hq=Hkv=16, D=64, L=512, causal, P=20 and 128), and a training step of a tiny
Llama with peftops' PrefixConfig against peft's PrefixTuningConfig (forward, backward, AdamW).

Ids are stable (`<impl>-<dtype>-...`):
    pytest benches/bench_prefix.py --benchmark-only --benchmark-min-rounds=3 --benchmark-json=bench-results/prefix.json
"""
import copy

import peft
import pytest
import torch
import torch.nn.functional as F

import peftops
from benchutil import record, saved_bytes, sync, training_step

B, H, D, L = 8, 16, 64, 512


def materialised(q, k, v, pk, pv):
    """What peft's cache does: the prefix expanded over the batch and concatenated, the mask concatenated too."""
    P, S = pk.shape[-2], k.shape[-2]
    keys = torch.cat([pk.expand(q.shape[0], -1, -1, -1), k], 2)
    values = torch.cat([pv.expand(q.shape[0], -1, -1, -1), v], 2)
    allowed = torch.cat([torch.ones(L, P, dtype=torch.bool), torch.ones(L, S, dtype=torch.bool).tril()], 1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)


def ours(q, k, v, pk, pv):
    return peftops.ops.prefix_attention(q, k, v, pk, pv, is_causal=True)


@pytest.mark.parametrize("prefix", [20, 128])
@pytest.mark.parametrize("impl", ["peftops", "sdpa_concat"])
def test_prefix_attention_cpu(benchmark, request, impl, prefix):
    benchmark.group = f"prefix_attention cpu fp32 B{B} H{H} L{L} D{D} P{prefix}"
    fn = ours if impl == "peftops" else materialised
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    pk, pv = (torch.randn(H, prefix, D, requires_grad=True) for _ in range(2))
    grad = torch.randn(B, H, L, D)
    args = (q, k, v, pk, pv)

    def step():
        for t in args:
            t.grad = None
        fn(*args).backward(grad)
        sync("cpu")

    _, saved = saved_bytes(lambda: fn(*args), exclude=list(args))
    record(benchmark, family="prefix_attention", impl=impl, device="cpu", dtype=torch.float32, saved=saved, batch=B,
           heads=H, seq=L, head_dim=D, prefix=prefix)
    rounds = request.config.getoption("benchmark_min_rounds", None) or 3
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1)


def _models(impl, prefix):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)  # a small Llama, wider than the test one so that attention carries weight
    base = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512))
    if impl == "peftops":
        return peftops.patch(base, peftops.PrefixConfig(prefix))
    return peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                            num_virtual_tokens=prefix))


@pytest.mark.parametrize("prefix", [20, 128])
@pytest.mark.parametrize("impl", ["peftops", "peft"])
def test_prefix_tuning_step_cpu(benchmark, request, impl, prefix):
    batch, seq = 4, 256
    benchmark.group = f"prefix_tuning step cpu fp32 llama-h256x4 b{batch} s{seq} P{prefix}"
    model = _models(impl, prefix).train()
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(256, (batch, seq), generator=torch.Generator().manual_seed(0))

    def loss():
        return model(input_ids=ids, labels=ids).loss
    step = training_step(model, loss, lr=1e-3)

    frozen = [p for p in model.parameters() if not p.requires_grad]
    _, saved = saved_bytes(loss, exclude=params + frozen)
    record(benchmark, family="prefix_tuning_step", impl=impl, device="cpu", dtype=torch.float32, saved=saved,
           batch=batch, seq=seq, prefix=prefix, trainable=sum(p.numel() for p in params))
    rounds = request.config.getoption("benchmark_min_rounds", None) or 3
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1)
