"""Issue 6: mixed-adapter batches and DoRA on CPU, float32, tokens=2048, 2048x2048, r=16.

- `multi_lora` (forward, inference): ops.multi_lora_linear with 1, 4 and 16 adapters against peft's mixed-batch forward
  (`layer(x, adapter_names=...)`), our backend mode on that peft layer (stacking cached), and a single-adapter
  ops.lora_linear on the same tokens. x is [16 rows, 128 tokens]; adapters are assigned to rows round-robin.
- `dora_linear` (forward+backward): ops.dora_linear against peft's DoRA layer and ops.lora_linear.
    pytest benches/bench_multi_dora.py --benchmark-only --benchmark-min-rounds=3
"""
import peft
import pytest
import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear

import peftops
from benchutil import record, saved_bytes

RANK, ALPHA, FEATURES, ROWS, ROW_TOKENS = 16, 32, 2048, 16, 128  # 16 x 128 = 2048 tokens
SCALE = ALPHA / RANK


class _Proj(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(FEATURES, FEATURES)

    def forward(self, x):
        return self.proj(x)


def _randomize(module):
    # B non-zero (unlike peft's init) so every product carries real data (DoRA's case scales B down: see there)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)


def _peft_multi_layer(n):
    model = peft.get_peft_model(_Proj(), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"]),
                                adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"]))
    model.requires_grad_(False)
    layer = model.base_model.model.proj
    _randomize(layer)
    return model.eval(), layer


def _multi_forward(impl, n):
    names = [f"a{i % n}" for i in range(ROWS)]
    if impl == "lora_linear":  # one adapter for every token: the single-adapter floor
        _, layer = _peft_multi_layer(1)
        a, b = layer.lora_A["a0"].weight, layer.lora_B["a0"].weight
        return lambda x: peftops.ops.lora_linear(x, layer.base_layer.weight, layer.base_layer.bias, a, b, SCALE,
                                                 training=False)
    model, layer = _peft_multi_layer(n)
    if impl == "peft":
        return lambda x: layer(x, adapter_names=names)
    if impl == "peftops-backend":
        peftops.patch(model)  # the same layer call, routed through ops.multi_lora_linear
        return lambda x: layer(x, adapter_names=names)
    # peftops op, factors stacked once
    lora_a = torch.stack([layer.lora_A[f"a{i}"].weight for i in range(n)])
    lora_b = torch.stack([layer.lora_B[f"a{i}"].weight for i in range(n)])
    scales = torch.full((n,), SCALE)
    index = torch.arange(ROWS).remainder(n).repeat_interleave(ROW_TOKENS)
    base = layer.base_layer
    return lambda x: peftops.ops.multi_lora_linear(x, base.weight, base.bias, lora_a, lora_b, scales, index)


MULTI_CASES = [pytest.param(impl, n, id=f"{impl}-fp32-t2048-d2048-n{n}")
               for n in (1, 4, 16) for impl in ("peftops", "peftops-backend", "peft")]
MULTI_CASES.append(pytest.param("lora_linear", 1, id="lora_linear-fp32-t2048-d2048-n1"))


@pytest.mark.parametrize("impl,n", MULTI_CASES)
def test_multi_lora_forward_cpu(benchmark, request, impl, n):
    benchmark.group = "multi_lora cpu fp32 t2048 d2048 forward"
    forward = _multi_forward(impl, n)
    x = torch.randn(ROWS, ROW_TOKENS, FEATURES)

    def step():
        with torch.no_grad():
            forward(x)

    record(benchmark, family="multi_lora_linear", impl=impl, device="cpu", dtype=torch.float32, saved=0,
           tokens=ROWS * ROW_TOKENS, in_features=FEATURES, out_features=FEATURES, r=RANK, adapters=n)
    rounds = request.config.getoption("benchmark_min_rounds", None) or 3
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1)


def _dora_forward(impl):
    base = torch.nn.Linear(FEATURES, FEATURES).requires_grad_(False)
    layer = PeftLoraLinear(base, "default", config=peft.LoraConfig(r=RANK, lora_alpha=ALPHA, use_dora=impl != "lora"),
                           r=RANK, lora_alpha=ALPHA, use_dora=impl != "lora")
    _randomize(layer)
    layer.train()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():  # a trained adapter's size: s B A about 0.14 of W's rows. DoRA's speed depends on it:
        b.mul_(0.04)       # where s B A outweighs W (unit-scale random B) its norms are redone row by row (+~8%)
    if impl == "peft":
        assert "default" in layer.lora_variant  # really peft's DoRA
        return layer, list(layer.parameters())
    if impl == "lora":
        return (lambda x: peftops.ops.lora_linear(x, base.weight, base.bias, a, b, SCALE, training=True)), [a, b]
    m = layer.lora_magnitude_vector["default"].weight
    return (lambda x: peftops.ops.dora_linear(x, base.weight, base.bias, a, b, m, SCALE, training=True)), [a, b, m]


@pytest.mark.parametrize("impl", ["peftops", "peft", "lora"], ids=lambda i: f"{i}-fp32-t2048-d2048")
def test_dora_fwd_bwd_cpu(benchmark, request, impl):
    benchmark.group = "dora_linear cpu fp32 t2048 d2048 fwd+bwd"
    forward, params = _dora_forward(impl)
    params = [p for p in params if p.requires_grad]
    x = torch.randn(ROWS * ROW_TOKENS, FEATURES, requires_grad=True)
    grad_out = torch.randn(ROWS * ROW_TOKENS, FEATURES)

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        forward(x).backward(grad_out)

    _, saved = saved_bytes(lambda: forward(x), exclude=params)
    record(benchmark, family="dora_linear", impl=impl, device="cpu", dtype=torch.float32, saved=saved,
           tokens=ROWS * ROW_TOKENS, in_features=FEATURES, out_features=FEATURES, r=RANK)
    rounds = request.config.getoption("benchmark_min_rounds", None) or 3
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1)
