"""Registration of the LoRA ops: opcheck (schema, fake kernels, autograd registration, AOT dispatch) and
torch.compile(fullgraph=True), eager and compiled agreeing on outputs and gradients."""
import pytest
import torch

import peftops
from op_helpers import assert_close


def operands(device, bias=True, batch=(3, 5)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*batch, 24, generator=g).to(device).requires_grad_()
    w = torch.randn(20, 24, generator=g).to(device)
    b = torch.randn(20, generator=g).to(device).requires_grad_() if bias else None
    a = torch.randn(4, 24, generator=g).to(device).requires_grad_()
    bb = torch.randn(20, 4, generator=g).to(device).requires_grad_()
    return x, w, b, a, bb


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_opcheck_forward(device, bias, p):
    x, w, b, a, bb = operands(device, bias)
    seed = torch.tensor(77, device=device) if p > 0 else None
    torch.library.opcheck(torch.ops.peftops.lora_linear_forward.default, (x, w, b, a, bb, 1.5, p, seed))


def test_opcheck_backward(device):
    x, w, b, a, bb = operands(device)
    x, b, a, bb = (t.detach() for t in (x, b, a, bb))
    y, t = torch.ops.peftops.lora_linear_forward(x, w, b, a, bb, 1.5, 0.25, torch.tensor(5, device=device))
    for mask in ([True, True, True, True], [False, True, True, False]):
        torch.library.opcheck(torch.ops.peftops.lora_linear_backward.default,
                              (torch.randn_like(y), x, w, a, bb, t, 1.5, 0.25, torch.tensor(5, device=device), mask))


def test_opcheck_public_op_without_dropout(device):
    x, w, b, a, bb = operands(device)
    torch.library.opcheck(torch.ops.peftops.lora_linear.default, (x, w, b, a, bb, 0.5, 0.0))


def _loss_and_grads(fn, args):
    torch.manual_seed(11)
    y = fn(*args)
    loss = (y * y).sum()
    grads = torch.autograd.grad(loss, [t for t in args if t is not None and t.requires_grad])
    return loss, grads


def _lora(x, w, b, a, bb, p):
    return torch.nn.functional.gelu(peftops.ops.lora_linear(x, w, b, a, bb, 2.0, p))


def test_compile_fullgraph_matches_eager(device):
    # Inductor, dynamic shapes off; no dropout (inductor draws random numbers its own way).
    torch._dynamo.reset()
    args = operands(device)
    fn = lambda *t: _lora(*t, 0.0)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    loss, grads = _loss_and_grads(fn, args)
    loss_c, grads_c = _loss_and_grads(compiled, args)
    assert_close(loss_c, loss, torch.float32, "loss")
    for g, gc in zip(grads, grads_c):
        assert_close(gc, g, torch.float32, "grad")


def test_compile_with_dropout_replays_the_eager_mask(device):
    # aot_eager runs the seed draw through torch's generator, as eager does: same seed, same mask, same numbers.
    torch._dynamo.reset()
    args = operands(device, batch=(7,))
    fn = lambda *t: _lora(*t, 0.3)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    loss, grads = _loss_and_grads(fn, args)
    loss_c, grads_c = _loss_and_grads(compiled, args)
    assert_close(loss_c, loss, torch.float32, "loss")
    for g, gc in zip(grads, grads_c):
        assert_close(gc, g, torch.float32, "grad")


def test_activation_checkpointing_regenerates_the_same_mask(device):
    from torch.utils.checkpoint import checkpoint
    x, w, b, a, bb = operands(device)

    def grads(use_checkpoint):
        torch.manual_seed(5)
        fn = lambda x: _lora(x, w, b, a, bb, 0.5)  # noqa: E731
        y = checkpoint(fn, x, use_reentrant=False) if use_checkpoint else fn(x)
        return torch.autograd.grad(y.square().sum(), (x, b, a, bb))

    for g, gc in zip(grads(False), grads(True)):
        assert torch.equal(g, gc)


def test_backends_reports_the_build():
    info = peftops.backends()
    assert "cpu" in info["compiled"] and "cpu" in info["runs"]
    assert ("cuda" in info["runs"]) == (torch.cuda.is_available() and "cuda" in info["compiled"])
    if "cuda" in info["compiled"]:
        assert info["cuda_archs"] and info["archs"] == info["cuda_archs"]


@pytest.mark.parametrize("archs,capability,runs", [
    (["8.0", "9.0"], (8, 0), True), (["8.0", "9.0"], (8, 9), True), (["8.0", "9.0"], (9, 0), True),
    (["8.0", "9.0"], (7, 5), False), (["8.0", "9.0"], (10, 0), False), (["8.0", "9.0"], (12, 0), False),
    (["8.0", "9.0+PTX"], (12, 0), True), (["9.0a"], (9, 0), True), (["10.0a"], (10, 3), False),
    (["Hopper"], (9, 0), True), (["Hopper"], (12, 0), True), (["Ampere"], (9, 0), True), (["Ampere"], (8, 9), True), (["Volta+Tegra"], (8, 0), False),
    (["sm_90"], (7, 5), True),  # an entry it cannot read: left to the launch
])
def test_a_gpu_the_build_has_no_code_for_gets_a_clear_error(monkeypatch, archs, capability, runs):
    # code built for major.minor runs on major.x, x >= minor; PTX also on every later GPU; anything else would fail
    # at the first kernel launch with "no kernel image is available", so the op refuses it up front
    from peftops import _extension
    monkeypatch.setattr(_extension, "LOADED", True)
    monkeypatch.setattr(_extension, "COMPILED", ["cpu", "cuda"])
    monkeypatch.setattr(_extension, "CUDA_ARCHS", archs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.delenv("PEFTOPS_FALLBACK", raising=False)
    _extension._archs_run_on.cache_clear()
    try:
        assert ("cuda" in peftops.backends()["runs"]) == runs
        if runs:
            assert _extension.use_kernels(torch.device("cuda"))
            return
        assert "compute capability %d.%d" % capability in peftops.backends()["error"]
        with pytest.raises(RuntimeError, match=r"none of which runs on cuda:0 \(compute capability %d\.%d\).*"
                                               r"PEFTOPS_FALLBACK=1" % capability):
            _extension.use_kernels(torch.device("cuda"))
        monkeypatch.setenv("PEFTOPS_FALLBACK", "1")
        monkeypatch.setattr(_extension, "_warned_fallback", False)
        with pytest.warns(UserWarning, match="pure-PyTorch fallback"):
            assert not _extension.use_kernels(torch.device("cuda", 0))
    finally:
        _extension._archs_run_on.cache_clear()
