"""lora_linear forward+backward against peft's LoRA layer and the frozen base nn.Linear (dx only).

Ids are stable (`<impl>-<dtype>-t<tokens>-d<features>[-p<dropout>]`) so ratios can be computed across runs:
    pytest benches/ --benchmark-only --benchmark-min-rounds=3 --benchmark-json=bench-results/lora.json
    pytest benches/ --benchmark-only -k "fp32-t2048-d2048"      # the cheapest shape only (a few seconds)
The frozen layer does not depend on dropout, so it runs once per shape and dtype.
"""
import itertools

import peft
import pytest
import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear

import peftops
from benchutil import cuda_step_peak, record, saved_bytes, sync

FAMILY = "lora_linear"
RANK = 16
ALPHA = 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _base(features, dtype, device):
    base = torch.nn.Linear(features, features, device=device, dtype=dtype)
    base.requires_grad_(False)
    return base


def _lora_weights(features, dtype, device):
    # B non-zero (unlike peft's init) so every product carries real data; speed does not depend on values.
    a = (torch.randn(RANK, features, device=device) / features**0.5).to(dtype).requires_grad_()
    b = (torch.randn(features, RANK, device=device) / RANK**0.5).to(dtype).requires_grad_()
    return a, b


def build(impl, features, dtype, device, dropout):
    """(forward function, trainable params, frozen params) for one implementation."""
    base = _base(features, dtype, device)
    frozen = [base.weight, base.bias]
    if impl == "frozen":
        return base, [], frozen
    a, b = _lora_weights(features, dtype, device)
    if impl == "peftops":
        def forward(x):
            return peftops.ops.lora_linear(x, base.weight, base.bias, a, b, ALPHA / RANK, dropout, training=True)
        return forward, [a, b], frozen
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout)
    layer = PeftLoraLinear(base, "default", config=cfg, r=RANK, lora_alpha=ALPHA, lora_dropout=dropout)
    layer.to(device=device, dtype=dtype).train()
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight], frozen


def run_bench(benchmark, request, *, impl, dtype_name, tokens, features, dropout, device, rounds, warmup,
              iterations=1):
    dtype = DTYPES[dtype_name]
    forward, params, frozen = build(impl, features, dtype, device, dropout)
    x = torch.randn(tokens, features, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(tokens, features, device=device, dtype=dtype)

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        forward(x).backward(grad_out)
        sync(device)

    _, saved = saved_bytes(lambda: forward(x), exclude=params + frozen)
    shape = dict(tokens=tokens, in_features=features, out_features=features, r=RANK,
                 dropout=(None if impl == "frozen" else dropout))
    if device == "cuda":
        shape["peak_bytes"] = cuda_step_peak(step)
    record(benchmark, family=FAMILY, impl=impl, device=device, dtype=dtype, saved=saved, **shape)
    if device == "cpu":  # CPU cases are slow: --benchmark-min-rounds sets their count (pedantic ignores it)
        rounds = request.config.getoption("benchmark_min_rounds", None) or rounds
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=iterations)


def _cases(impls, dtypes, tokens, features, dropouts):
    for impl, dt, f in itertools.product(impls, dtypes, features):
        for p in ([None] if impl == "frozen" else dropouts):
            name = f"{impl}-{dt}-t{tokens}-d{f}" + ("" if p is None else f"-p{p}")
            yield pytest.param(impl, dt, tokens, f, p or 0.0, id=name)


CPU_CASES = list(_cases(["frozen", "peftops", "peft"], ["fp32", "bf16"], 2048, [2048, 4096], [0.0, 0.1]))
CUDA_CASES = list(_cases(["frozen", "peftops", "peft"], ["bf16"], 8192, [4096], [0.0, 0.1]))


@pytest.mark.parametrize("impl,dtype_name,tokens,features,dropout", CPU_CASES)
def test_lora_cpu(benchmark, request, impl, dtype_name, tokens, features, dropout):
    benchmark.group = f"{FAMILY} cpu {dtype_name} t{tokens} d{features}"
    run_bench(benchmark, request, impl=impl, dtype_name=dtype_name, tokens=tokens, features=features,
              dropout=dropout, device="cpu", rounds=5, warmup=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl,dtype_name,tokens,features,dropout", CUDA_CASES)
def test_lora_cuda(benchmark, request, impl, dtype_name, tokens, features, dropout):
    benchmark.group = f"{FAMILY} cuda {dtype_name} t{tokens} d{features}"
    run_bench(benchmark, request, impl=impl, dtype_name=dtype_name, tokens=tokens, features=features,
              dropout=dropout, device="cuda", rounds=30, warmup=5, iterations=5)
