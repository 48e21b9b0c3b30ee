"""torch.autocast around the ops and patched models: what backward keeps, the dtype a bottleneck adds in, the fused
paths taken (no silent fallback to plain PyTorch), against nn.Linear and the unpatched model under the same autocast."""
import copy

import pytest
import torch
import torch.nn.functional as F

import peftops
from peftops.layers import BottleneckAdapter
from peftops.profiling import saved_bytes
from tiny_models import BUILDERS, input_ids, loss_of, output, tiny_bert

LOW = torch.bfloat16
IN, OUT, R, N = 48, 40, 4, 6


def autocast(enabled=True):
    return torch.autocast("cpu", dtype=LOW, enabled=enabled)


def _factors():
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g) / shape[-1] ** 0.5  # noqa: E731
    return rand(OUT, IN), rand(OUT), rand(R, IN), rand(OUT, R)


LINEAR_OPS = {  # each op over x, a frozen float32 weight and its trainable parameters
    "lora_linear": lambda x, w, b, a, bb: peftops.ops.lora_linear(x, w, b, a, bb, 2.0),
    "dora_linear": lambda x, w, b, a, bb: peftops.ops.dora_linear(x, w, b, a, bb, w.norm(dim=1).requires_grad_(), 2.0),
    "multi_lora_linear": lambda x, w, b, a, bb: peftops.ops.multi_lora_linear(
        x, w, b, a[None], bb[None], torch.tensor([2.0]), torch.zeros(x.shape[0], dtype=torch.long)),
    "bias_linear": lambda x, w, b, a, bb: peftops.ops.bias_linear(x, w, b),
    "ia3_linear": lambda x, w, b, a, bb: peftops.ops.ia3_linear(x, w, b, torch.ones(OUT, requires_grad=True)),
}


@pytest.mark.parametrize("op", LINEAR_OPS)
def test_the_frozen_weight_cast_is_kept_only_when_x_needs_its_gradient(op):
    # Under autocast the weight an op receives is a fresh 16-bit copy; backward reads it only for dx, so (as
    # nn.Linear) it is kept only when x needs a gradient, and the other gradients do not change.
    w, b, a, bb = _factors()
    b, a, bb = (t.requires_grad_() for t in (b, a, bb))
    x = torch.randn(N, IN)
    copy_bytes = w.numel() * LOW.itemsize

    def run(x):
        with autocast():
            y, saved = saved_bytes(lambda: LINEAR_OPS[op](x, w, b, a, bb), exclude=(w, b, a, bb))
        y.float().square().sum().backward()
        grads = [t.grad.clone() for t in (b, a, bb) if t.grad is not None]
        for t in (b, a, bb):
            t.grad = None
        return saved, grads

    saved, grads = run(x)
    assert saved < copy_bytes, f"{op} keeps {saved} bytes with x frozen: the weight's 16-bit copy is {copy_bytes}"
    x_trains = x.clone().requires_grad_()
    saved_x, grads_x = run(x_trains)
    assert saved_x >= copy_bytes and x_trains.grad is not None
    for g, g_x in zip(grads, grads_x):
        torch.testing.assert_close(g, g_x)


def test_bottleneck_adds_its_update_in_the_residual_dtype():
    # PyTorch's `residual + up(...)` is float32 for a float32 residual; a zero update leaves it exact
    h, residual = torch.randn(N, IN), 1000 + torch.randn(N, IN)
    w_down, w_up = torch.randn(R, IN), torch.zeros(IN, R)
    with autocast():
        y = peftops.ops.adapter_bottleneck(h.to(LOW), w_down, None, w_up, None, residual=residual)
        y_h = peftops.ops.adapter_bottleneck(h, w_down, None, w_up, None)
        y_low = peftops.ops.adapter_bottleneck(h.to(LOW), w_down.to(LOW), None, w_up.to(LOW), None)
    assert y.dtype == y_h.dtype == torch.float32 and y_low.dtype == LOW
    assert torch.equal(y, residual) and torch.equal(y_h, h)


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby", "parallel"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_fresh_bottleneck_model_under_autocast_is_the_unpatched_model(family, placement):
    # adapters start as the identity: under autocast too, same outputs and hidden-state dtypes as the unpatched model
    base = tiny_bert() if family == "bert" else BUILDERS[family]()
    ref = copy.deepcopy(base)
    ours = peftops.patch(base, peftops.AdapterConfig(bottleneck=4, placement=placement))
    ids = input_ids()
    with autocast():
        got, want = ours(input_ids=ids, output_hidden_states=True), ref(input_ids=ids, output_hidden_states=True)
    assert [h.dtype for h in got.hidden_states] == [h.dtype for h in want.hidden_states]
    for h, h_ref in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(h, h_ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pfeiffer_output_saving_costs_no_precision_under_autocast(family):
    # the adapter runs in its float32 residual stream's dtype, so recovering its input from its output is as exact
    # as keeping the input
    model = peftops.patch(BUILDERS[family](), peftops.AdapterConfig(bottleneck=5, placement="pfeiffer"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (10.0 if n.endswith("up") else 0.3))
    adapters = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    assert adapters and all(a.save_output for a in adapters)
    ids = input_ids()

    def grads():
        with autocast():
            loss = loss_of(output(model, ids))
        loss.backward()
        out = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        return out

    saving = grads()
    for a in adapters:
        a.save_output = False
    for g_saving, g_keeping in zip(saving, grads()):
        torch.testing.assert_close(g_saving, g_keeping, rtol=1e-4, atol=1e-6)


def test_bitfit_bert_output_sublayers_stay_fused_under_autocast(monkeypatch):
    # the dense output (16-bit) and the residual (float32) differ in dtype only by autocast, which the op promotes
    calls = []
    fused = peftops.ops.bias_dropout_add
    monkeypatch.setattr(peftops.ops, "bias_dropout_add", lambda *a, **k: calls.append(1) or fused(*a, **k))
    model, ref = peftops.patch(tiny_bert(), peftops.BitFitConfig()).eval(), tiny_bert().eval()
    ids = input_ids()
    with autocast():
        got, want = output(model, ids), output(ref, ids)
    assert len(calls) == 2 * model.config.num_hidden_layers  # attention and feed-forward output sublayers
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_linear_ops_under_autocast_match_nn_linear_dtype():
    # the output dtype of every linear op under autocast is nn.Linear's
    w, b, a, bb = _factors()
    x = torch.randn(N, IN)
    with autocast():
        want = F.linear(x, w, b).dtype
        assert all(LINEAR_OPS[op](x, w, b, a, bb).dtype == want for op in LINEAR_OPS)
