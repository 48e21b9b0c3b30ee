"""Bottleneck adapters, forward+backward, CPU float32. Op level: `adapter_bottleneck` against the plain-PyTorch
composition (tokens 4096, hidden 2048, m 64). Model level: a small random Llama with Pfeiffer / Houlsby adapters
(reduction factor 16) computed by peftops against the same placement computed in plain PyTorch, and the frozen model
(the baseline of the saved-bytes overhead). Saved-for-backward bytes go to extra_info. Ids: `<case>-<impl>`.
    pytest benches/bench_bottleneck.py --benchmark-only --benchmark-min-rounds=3
    pytest benches/bench_bottleneck.py --benchmark-only -k op      # op level only (a few seconds)
"""
import pytest
import torch

import peftops
from bench_bitfit_ia3 import _model_step, _small_llama, _smollm2, run
from benchutil import adapterhub_bottleneck, frozen_baseline
from peftops.layers import BottleneckAdapter
from peftops.ops import reference

TOKENS, HIDDEN, M = 4096, 2048, 64


@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("impl", ["peftops", "torch"])
def test_op_adapter_bottleneck(benchmark, request, impl, activation):
    benchmark.group = f"adapter_bottleneck cpu fp32 t{TOKENS} d{HIDDEN} m{M} {activation}"
    h = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    params = [(torch.randn(M, HIDDEN) / HIDDEN**0.5).requires_grad_(), torch.zeros(M, requires_grad=True),
              (torch.randn(HIDDEN, M) / M**0.5).requires_grad_(), torch.zeros(HIDDEN, requires_grad=True)]
    grad_out = torch.randn(TOKENS, HIDDEN)
    op = peftops.ops.adapter_bottleneck if impl == "peftops" else reference.adapter_bottleneck

    def forward():
        return op(h, *params, activation=activation, scale=0.5)

    def step():
        for t in [h, *params]:
            t.grad = None
        forward().backward(grad_out)

    run(benchmark, request, step, forward, params, [], family="adapter_bottleneck", impl=impl, tokens=TOKENS,
        hidden=HIDDEN, bottleneck=M, activation=activation, rounds=5)


def _plain(module: BottleneckAdapter):
    """The same adapter in plain PyTorch (every intermediate kept for backward), at the same place."""
    def forward(h, residual=None):
        return reference.adapter_bottleneck(h, module.down, module.down_bias, module.up, module.up_bias,
                                            module.activation, module.scale, residual)
    return forward


def small_llama_with_adapters(placement, activation, impl):
    """The small Llama with adapters at reduction factor 16, computed by peftops ("peftops") or, at the same place,
    in plain PyTorch ("torch"); `up` given values (it is zero at init) so that every product carries data."""
    model = _small_llama().train()
    peftops.patch(model, peftops.AdapterConfig(bottleneck=model.config.hidden_size // 16, placement=placement,
                                               activation=activation))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BottleneckAdapter):
                m.up.normal_(0, 0.02)
                if impl == "torch":
                    m.forward = _plain(m)
    return model


@pytest.mark.parametrize("impl", ["peftops", "torch", "frozen"])
@pytest.mark.parametrize("placement, activation", [("pfeiffer", "relu"), ("houlsby", "silu")])
def test_model_small_llama(benchmark, request, placement, activation, impl):
    batch, seq = 4, 128
    benchmark.group = f"bottleneck {placement} small_llama train cpu fp32 b{batch} s{seq}"
    if impl == "frozen":
        model = frozen_baseline(_small_llama().train())
    else:
        model = small_llama_with_adapters(placement, activation, impl)
    ids = torch.randint(model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    step, forward, params, frozen = _model_step(model, ids)
    run(benchmark, request, step, forward, params, frozen, family=f"bottleneck_{placement}_small_llama", impl=impl,
        batch=batch, seq=seq, placement=placement)


@pytest.mark.parametrize("impl", ["peftops", "adapterhub", "frozen"])
@pytest.mark.parametrize("placement, activation", [("pfeiffer", "relu"), ("houlsby", "silu")])
def test_model_smollm2_vs_adapterhub(benchmark, request, placement, activation, impl):
    """SmolLM2-135M (demo cache), reduction factor 16, against AdapterHub's seq_bn / double_seq_bn on the same model.
    `adapters` 1.x pins transformers 4.57: run this in such a venv (BENCHMARKS.md says how); elsewhere it skips."""
    adapters = pytest.importorskip("adapters")
    batch, seq = 4, 256
    benchmark.group = f"bottleneck {placement} smollm2 train cpu fp32 b{batch} s{seq}"
    model = _smollm2().train()
    if impl == "frozen":
        frozen_baseline(model)
    elif impl == "adapterhub":
        adapterhub_bottleneck(model, placement, activation, adapters)
    else:
        peftops.patch(model, peftops.AdapterConfig(bottleneck=model.config.hidden_size // 16, placement=placement,
                                                   activation=activation))
    ids = torch.randint(model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    step, forward, params, frozen = _model_step(model, ids)
    run(benchmark, request, step, forward, params, frozen, family=f"bottleneck_{placement}_smollm2", impl=impl,
        batch=batch, seq=seq, placement=placement, rounds=3)
