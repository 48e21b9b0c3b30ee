"""Every op family but LoRA (bench_lora.py has its own CUDA cases) on CUDA, bfloat16, op level, against the
composition or peer that users would run instead, in the same run: forward+backward unless named forward.
Records saved-for-backward bytes and the peak of one step above what is resident. Skipped without a GPU.
    pytest benches/bench_cuda_ops.py --benchmark-only            # on a GPU machine (benches/gpu_check.sh runs it)
Ids: `<impl>-bf16-<shape>`; groups name the op and shape.
"""
import peft
import pytest
import torch
import torch.nn.functional as F

import peftops
from bench_prefix import L, B, D, H
from benchutil import cuda_step_peak, record, saved_bytes, sync
from peftops.ops import reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV, DT = "cuda", torch.bfloat16
TOKENS, WIDTH = 8192, 4096
RANK, SCALE = 16, 2.0


def rnd(*shape, grad=True, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(DT).requires_grad_(grad)


def run(benchmark, forward, leaves, *, family, impl, backward=True, exclude=(), **shape):
    """Time forward (+ backward with a random output gradient), 20 rounds of 5 after warm-up; record what it keeps."""
    grad_out = torch.randn_like(forward()) if backward else None

    def step():
        for t in leaves:
            t.grad = None
        if backward:
            forward().backward(grad_out)
        else:
            with torch.no_grad():
                forward()
        sync(DEV)

    _, saved = saved_bytes(forward, exclude=list(leaves) + list(exclude)) if backward else (None, 0)
    record(benchmark, family=family, impl=impl, device=DEV, dtype=DT, saved=saved, peak_bytes=cuda_step_peak(step),
           **shape)
    benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=5)


@pytest.mark.parametrize("impl", ["peftops", "peftops_dense", "sdpa_concat", "sdpa_sequence_only"])
@pytest.mark.parametrize("prefix", [20, 128])
def test_prefix_attention_cuda(benchmark, monkeypatch, impl, prefix):
    # peftops: the tiled CUDA kernels; peftops_dense: the two-segment host path beside them (ATen's products);
    # sdpa_sequence_only: causal SDPA without any prefix, issue 3's GPU yardstick (peftops within 1.2x of it)
    if impl == "peftops_dense":
        monkeypatch.setenv("PEFTOPS_PREFIX_DENSE", "1")
    benchmark.group = f"prefix_attention cuda bf16 B{B} H{H} L{L} D{D} P{prefix}"
    q, k, v = (rnd(B, H, L, D) for _ in range(3))
    pk, pv = rnd(H, prefix, D), rnd(H, prefix, D)
    allowed = torch.cat([torch.ones(L, prefix, dtype=torch.bool, device=DEV),
                         torch.ones(L, L, dtype=torch.bool, device=DEV).tril()], 1)

    def forward():
        if impl.startswith("peftops"):
            return peftops.ops.prefix_attention(q, k, v, pk, pv, is_causal=True)
        if impl == "sdpa_sequence_only":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        keys = torch.cat([pk.expand(B, -1, -1, -1), k], 2)
        values = torch.cat([pv.expand(B, -1, -1, -1), v], 2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)

    run(benchmark, forward, [q, k, v, pk, pv], family="prefix_attention", impl=impl, batch=B, heads=H, seq=L,
        head_dim=D, prefix=prefix)


@pytest.mark.parametrize("impl", ["peftops", "torch"])
def test_adapter_bottleneck_cuda(benchmark, impl):
    m = 64
    benchmark.group = f"adapter_bottleneck cuda bf16 t{TOKENS} d{WIDTH} m{m} silu"
    h = rnd(TOKENS, WIDTH)
    params = [rnd(m, WIDTH, scale=WIDTH**-0.5), rnd(m), rnd(WIDTH, m, scale=m**-0.5), rnd(WIDTH)]
    op = peftops.ops.adapter_bottleneck if impl == "peftops" else reference.adapter_bottleneck
    run(benchmark, lambda: op(h, *params, activation="silu", scale=0.5), [h, *params], family="adapter_bottleneck",
        impl=impl, tokens=TOKENS, hidden=WIDTH, bottleneck=m, activation="silu")


@pytest.mark.parametrize("impl", ["peftops", "torch"])
def test_bias_linear_cuda(benchmark, impl):
    benchmark.group = f"bias_linear cuda bf16 t{TOKENS} d{WIDTH}"
    x, w, b = rnd(TOKENS, WIDTH), rnd(WIDTH, WIDTH, grad=False, scale=WIDTH**-0.5), rnd(WIDTH)
    fn = peftops.ops.bias_linear if impl == "peftops" else F.linear
    run(benchmark, lambda: fn(x, w, b), [x, b], exclude=[w], family="bias_linear", impl=impl, tokens=TOKENS,
        in_features=WIDTH, out_features=WIDTH)


@pytest.mark.parametrize("impl", ["peftops", "torch"])
def test_bias_dropout_add_cuda(benchmark, impl):
    p = 0.1
    benchmark.group = f"bias_dropout_add cuda bf16 t{TOKENS} d{WIDTH} p{p}"
    x, r, b = rnd(TOKENS, WIDTH), rnd(TOKENS, WIDTH), rnd(WIDTH)
    if impl == "peftops":
        forward = lambda: peftops.ops.bias_dropout_add(x, b, r, p, training=True)  # noqa: E731
    else:
        forward = lambda: r + F.dropout(x + b, p, training=True)  # noqa: E731
    run(benchmark, forward, [x, r, b], family="bias_dropout_add", impl=impl, tokens=TOKENS, features=WIDTH, dropout=p)


@pytest.mark.parametrize("impl", ["peftops", "torch"])
@pytest.mark.parametrize("feedforward", [False, True], ids=["out", "ff"])
def test_ia3_linear_cuda(benchmark, impl, feedforward):
    benchmark.group = f"ia3_linear cuda bf16 t{TOKENS} d{WIDTH} {'ff' if feedforward else 'out'}"
    x, w, b = rnd(TOKENS, WIDTH), rnd(WIDTH, WIDTH, grad=False, scale=WIDTH**-0.5), rnd(WIDTH, grad=False)
    s = rnd(WIDTH)
    if impl == "peftops":
        forward = lambda: peftops.ops.ia3_linear(x, w, b, s, feedforward=feedforward)  # noqa: E731
    elif feedforward:  # peft's IA3: input scaling for feed-forward modules, output scaling otherwise
        forward = lambda: F.linear(x * s, w, b)  # noqa: E731
    else:
        forward = lambda: F.linear(x, w, b) * s  # noqa: E731
    run(benchmark, forward, [x, s], exclude=[w, b], family="ia3_linear", impl=impl, tokens=TOKENS,
        in_features=WIDTH, out_features=WIDTH, feedforward=feedforward)


class _Proj(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return self.proj(x)


def _peft_layer(n, use_dora=False):
    """peft's LoRA (or DoRA) layer over a frozen WIDTH x WIDTH linear with n adapters a0.., B non-zero, on the GPU."""
    config = lambda: peft.LoraConfig(r=RANK, lora_alpha=RANK * SCALE, use_dora=use_dora,  # noqa: E731
                                     target_modules=["proj"])
    model = peft.get_peft_model(_Proj(), config(), adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", config())
    layer = model.base_model.model.proj
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
    return layer.to(DEV, DT)


@pytest.mark.parametrize("impl", ["peftops", "peft", "lora_linear"])
@pytest.mark.parametrize("n", [4, 16])
def test_multi_lora_forward_cuda(benchmark, impl, n):
    rows = 32
    benchmark.group = f"multi_lora cuda bf16 t{TOKENS} d{WIDTH} n{n} forward"
    layer = _peft_layer(n).eval()
    x = rnd(rows, TOKENS // rows, WIDTH, grad=False)
    base = layer.base_layer
    if impl == "peft":
        names = [f"a{i % n}" for i in range(rows)]
        forward = lambda: layer(x, adapter_names=names)  # noqa: E731
    elif impl == "lora_linear":  # every token on one adapter: the single-adapter floor
        a, b = layer.lora_A["a0"].weight, layer.lora_B["a0"].weight
        forward = lambda: peftops.ops.lora_linear(x, base.weight, base.bias, a, b, SCALE, training=False)  # noqa: E731
    else:
        lora_a = torch.stack([layer.lora_A[f"a{i}"].weight for i in range(n)])
        lora_b = torch.stack([layer.lora_B[f"a{i}"].weight for i in range(n)])
        scales = torch.full((n,), SCALE, device=DEV)
        index = torch.arange(rows, device=DEV).remainder(n).repeat_interleave(TOKENS // rows)
        forward = lambda: peftops.ops.multi_lora_linear(x, base.weight, base.bias, lora_a, lora_b, scales,  # noqa: E731
                                                        index)
    run(benchmark, forward, [], backward=False, family="multi_lora_linear", impl=impl, tokens=TOKENS,
        in_features=WIDTH, out_features=WIDTH, r=RANK, adapters=n)


@pytest.mark.parametrize("impl", ["peftops", "peft", "lora_linear"])
def test_dora_fwd_bwd_cuda(benchmark, impl):
    benchmark.group = f"dora_linear cuda bf16 t{TOKENS} d{WIDTH}"
    layer = _peft_layer(1, use_dora=True).train()
    base, a, b = layer.base_layer, layer.lora_A["a0"].weight, layer.lora_B["a0"].weight
    m = layer.lora_magnitude_vector["a0"].weight
    x = rnd(TOKENS, WIDTH)
    if impl == "peft":
        forward = lambda: layer(x)  # noqa: E731
    elif impl == "lora_linear":
        forward = lambda: peftops.ops.lora_linear(x, base.weight, base.bias, a, b, SCALE, training=True)  # noqa: E731
    else:
        forward = lambda: peftops.ops.dora_linear(x, base.weight, base.bias, a, b, m, SCALE, training=True)  # noqa: E731
    run(benchmark, forward, [x, a, b, m], exclude=[base.weight, base.bias], family="dora_linear", impl=impl,
        tokens=TOKENS, in_features=WIDTH, out_features=WIDTH, r=RANK)
