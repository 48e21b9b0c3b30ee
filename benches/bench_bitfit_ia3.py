"""BitFit and IA3, forward+backward, CPU float32: op level against the plain-PyTorch compositions, model level
against plain bias-only training (BitFit, MiniLM) and peft's IA3 (a small random Llama, and SmolLM2-135M when its
demo cache exists). Saved-for-backward bytes go to extra_info. Ids: `<case>-<impl>`.
    pytest benches/bench_bitfit_ia3.py --benchmark-only --benchmark-min-rounds=3
    pytest benches/bench_bitfit_ia3.py --benchmark-only -k op      # op level only (a few seconds)
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import peftops
from benchutil import load_smollm2, record, saved_bytes

TOKENS, WIDTH, DROPOUT = 4096, 2048, 0.1


def run(benchmark, request, step, forward, params, frozen, *, family, impl, rounds=3, **shape):
    """Record saved bytes of one forward, then time forward+backward steps (CPU: --benchmark-min-rounds rounds)."""
    _, saved = saved_bytes(forward, exclude=list(params) + list(frozen))
    record(benchmark, family=family, impl=impl, device="cpu", dtype=torch.float32, saved=saved, **shape)
    rounds = request.config.getoption("benchmark_min_rounds", None) or rounds
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)


def _step(forward, leaves, grad_out=None):
    def step():
        for t in leaves:
            t.grad = None
        out = forward()
        out.backward(grad_out if grad_out is not None else torch.ones_like(out))
    return step


# Op level ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["peftops", "torch"])
def test_op_bias_linear(benchmark, request, impl):
    benchmark.group = f"bias_linear cpu fp32 t{TOKENS} d{WIDTH}"
    weight = torch.randn(WIDTH, WIDTH) / WIDTH**0.5
    bias = torch.zeros(WIDTH, requires_grad=True)
    x = torch.randn(TOKENS, WIDTH, requires_grad=True)
    grad_out = torch.randn(TOKENS, WIDTH)
    fn = peftops.ops.bias_linear if impl == "peftops" else F.linear  # frozen weight: no grad either way
    forward = lambda: fn(x, weight, bias)  # noqa: E731
    run(benchmark, request, _step(forward, [x, bias], grad_out), forward, [bias], [weight], family="bias_linear",
        impl=impl, tokens=TOKENS, in_features=WIDTH, out_features=WIDTH)


@pytest.mark.parametrize("impl", ["peftops", "torch"])
def test_op_bias_dropout_add(benchmark, request, impl):
    benchmark.group = f"bias_dropout_add cpu fp32 t{TOKENS} d{WIDTH} p{DROPOUT}"
    x = torch.randn(TOKENS, WIDTH, requires_grad=True)
    residual = torch.randn(TOKENS, WIDTH, requires_grad=True)
    bias = torch.zeros(WIDTH, requires_grad=True)
    grad_out = torch.randn(TOKENS, WIDTH)
    if impl == "peftops":
        forward = lambda: peftops.ops.bias_dropout_add(x, bias, residual, DROPOUT, training=True)  # noqa: E731
    else:
        forward = lambda: residual + F.dropout(x + bias, DROPOUT, training=True)  # noqa: E731
    run(benchmark, request, _step(forward, [x, residual, bias], grad_out), forward, [bias], [],
        family="bias_dropout_add", impl=impl, tokens=TOKENS, features=WIDTH, dropout=DROPOUT)


# Model level -------------------------------------------------------------------------------------------------------
def _tests_dir():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if path not in sys.path:
        sys.path.insert(0, path)


def _model_step(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]

    def forward():
        out = model(input_ids=ids)
        out = out.logits if hasattr(out, "logits") else out.last_hidden_state
        return out.float().square().mean()

    def step():
        model.zero_grad(set_to_none=True)
        forward().backward()

    return step, forward, params, frozen


@pytest.mark.parametrize("impl", ["peftops", "torch"])
def test_model_bitfit_minilm(benchmark, request, impl):
    _tests_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel
    from tiny_models import minilm_path
    batch, seq = 8, 128
    benchmark.group = f"bitfit minilm train cpu fp32 b{batch} s{seq}"
    model = BertModel.from_pretrained(minilm_path()).train()  # its own dropout 0.1 stays on
    if impl == "peftops":
        peftops.patch(model, peftops.BitFitConfig())
    else:  # plain PyTorch bias-only training: the same trainable set
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith("bias"))
    ids = torch.randint(model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    step, forward, params, frozen = _model_step(model, ids)
    run(benchmark, request, step, forward, params, frozen, family="bitfit_minilm", impl=impl, batch=batch, seq=seq)


def _small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512))


def _smollm2():
    """SmolLM2-135M from the demo's cache; the case skips without it."""
    try:
        return load_smollm2()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("impl", ["peftops", "peft"])
@pytest.mark.parametrize("which, batch, seq", [("small_llama", 4, 128), ("smollm2", 4, 256)])
def test_model_ia3(benchmark, request, which, batch, seq, impl):
    import peft
    benchmark.group = f"ia3 {which} train cpu fp32 b{batch} s{seq}"
    base = _small_llama() if which == "small_llama" else _smollm2()
    if impl == "peftops":
        model = peftops.patch(base, peftops.IA3Config())
    else:
        model = peft.get_peft_model(base, peft.IA3Config(target_modules=None, feedforward_modules=None))
    model.train()
    ids = torch.randint(base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    step, forward, params, frozen = _model_step(model, ids)
    run(benchmark, request, step, forward, params, frozen, family=f"ia3_{which}", impl=impl, batch=batch, seq=seq,
        rounds=2 if which == "smollm2" else 3)
