"""multi_lora_linear and dora_linear against their plain-PyTorch references and against peft itself."""

import pytest
import torch
from torch import nn

import peftops
from peftops.ops import reference as ref
from op_helpers import SavedTensors, assert_close, batch_dims, random_shapes

DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float32, torch.bfloat16, torch.float16]}


def check_grads(y, y_ref, inputs, inputs_ref, dtype):
    assert_close(y, y_ref, dtype, "out")
    g = torch.randn_like(y)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(y_ref, inputs_ref, g.double()))):
        assert a.shape == inputs[i].shape
        assert_close(a, b, dtype, f"grad {i}")


def doubles(*ts):
    return [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in ts]


def skewed_index(tokens, n, gen):
    """Mostly adapter 0, a few of the others, some -1 (base only), and adapter n - 1 never used (empty segment)."""
    idx = torch.zeros(tokens, dtype=torch.long)
    rest = torch.randint(-1, max(n - 1, 1), (tokens // 3,), generator=gen)
    idx[torch.randperm(tokens, generator=gen)[: tokens // 3]] = rest
    return idx


@pytest.mark.parametrize("n", [1, 3, 16])
@pytest.mark.parametrize("shape", [((37,), 24, 20, 4), ((3, 11), 40, 33, 8), ((64,), 17, 9, 17)]
                         + random_shapes(2, 5, lambda ri: (batch_dims(ri), ri(1, 200), ri(1, 200), ri(1, 32))))
def test_multi_lora_matches_reference(device, n, shape):
    batch, d_in, d_out, r = shape
    for dtype in DTYPES[device]:
        gen = torch.Generator().manual_seed(n * d_in)
        tokens = torch.Size(batch).numel()
        x = torch.randn(*batch, d_in, generator=gen).to(device, dtype).requires_grad_()
        w = (torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5).to(device, dtype)
        b = torch.randn(d_out, generator=gen).to(device, dtype).requires_grad_()
        a = (torch.randn(n, r, d_in, generator=gen) / d_in ** 0.5).to(device, dtype).requires_grad_()
        bb = torch.randn(n, d_out, r, generator=gen).to(device, dtype).requires_grad_()
        scales = torch.rand(n, generator=gen).to(device) + 0.5
        idx = skewed_index(tokens, n, gen).to(device)
        y = peftops.ops.multi_lora_linear(x, w, b, a, bb, scales, idx)
        xd, wd, bd, ad, bbd = doubles(x, w, b, a, bb)
        y_ref = ref.multi_lora_linear(xd, wd, bd, ad, bbd, scales.double(), idx)
        check_grads(y, y_ref, (x, b, a, bb), (xd, bd, ad, bbd), dtype)


@pytest.mark.parametrize("index", [[0, 0, 0, 1, 1, 2, 2, 2, 2, -1, -1, 1], [1] * 12,
                                   [-1, 2, 2, 2, 0, 0, 0, 0, 1, 2, 1, 1]])
def test_multi_lora_runs_of_rows_match_reference(device, index):
    # a request's tokens share its adapter: segments that are one contiguous run are served as views, in place
    gen = torch.Generator().manual_seed(11)
    idx = torch.tensor(index, device=device)
    x = torch.randn(12, 9, generator=gen).to(device).requires_grad_()
    w = torch.randn(7, 9, generator=gen).to(device)
    a = torch.randn(3, 4, 9, generator=gen).to(device).requires_grad_()
    bb = torch.randn(3, 7, 4, generator=gen).to(device).requires_grad_()
    scales = torch.tensor([0.5, 1.5, 2.0], device=device)
    y = peftops.ops.multi_lora_linear(x, w, None, a, bb, scales, idx)
    xd, wd, _, ad, bbd = doubles(x, w, None, a, bb)
    y_ref = ref.multi_lora_linear(xd, wd, None, ad, bbd, scales.double(), idx)
    check_grads(y, y_ref, (x, a, bb), (xd, ad, bbd), torch.float32)


def test_multi_lora_scales_get_a_gradient_when_they_train(device):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(13, 10, generator=gen, dtype=torch.float64).to(device)
    w = torch.randn(7, 10, generator=gen, dtype=torch.float64).to(device)
    a = torch.randn(3, 2, 10, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    bb = torch.randn(3, 7, 2, generator=gen, dtype=torch.float64).to(device)
    scales = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    idx = torch.tensor([0, 2, -1, 2, 0, 0, 2, -1, 2, 2, 0, 2, 2], device=device)  # adapter 1 has no rows: zero
    torch.autograd.gradcheck(lambda s, a: peftops.ops.multi_lora_linear(x, w, None, a, bb, s, idx), (scales, a))
    (g,) = torch.autograd.grad(peftops.ops.multi_lora_linear(x, w, None, a, bb, scales, idx).square().sum(), scales)
    (g_ref,) = torch.autograd.grad(ref.multi_lora_linear(x, w, None, a, bb, scales, idx).square().sum(), scales)
    torch.testing.assert_close(g, g_ref)
    assert g[1] == 0


def test_multi_lora_ranks_differ_by_zero_padding(device):
    # adapter 0 of rank 2 and adapter 1 of rank 5, both served as rank 5: padding contributes exactly zero
    x = torch.randn(10, 16, device=device)
    w = torch.randn(12, 16, device=device)
    a0, b0 = torch.randn(2, 16, device=device), torch.randn(12, 2, device=device)
    a1, b1 = torch.randn(5, 16, device=device), torch.randn(12, 5, device=device)
    a = torch.zeros(2, 5, 16, device=device)
    bb = torch.zeros(2, 12, 5, device=device)
    a[0, :2], bb[0, :, :2], a[1], bb[1] = a0, b0, a1, b1
    idx = torch.tensor([0, 1, 1, -1, 0, 0, 1, -1, 1, 0], device=device)
    y = peftops.ops.multi_lora_linear(x, w, None, a, bb, torch.tensor([1.0, 2.0], device=device), idx)
    for i, k in enumerate(idx.tolist()):
        expected = x[i] @ w.T + ({0: x[i] @ a0.T @ b0.T, 1: 2.0 * (x[i] @ a1.T @ b1.T)}.get(k, 0.0))
        assert_close(y[i], expected, torch.float32, f"row {i}")


def test_multi_lora_matches_peft_mixed_batch():
    peft = pytest.importorskip("peft")
    from tiny_models import randomize_lora

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 24))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), adapter_name="a0")
    for i in (1, 2):
        model.add_adapter(f"a{i}", peft.LoraConfig(r=4, lora_alpha=4 * (i + 1), target_modules=["0"]))
    randomize_lora(model)
    model.eval()
    layer = model.base_model.model[0]
    names = ["a0", "a1", "a2"]
    x = torch.randn(9, 32)
    adapter_names = ["a1", "__base__", "a0", "a2", "a2", "a1", "__base__", "a0", "a0"]
    with torch.no_grad():
        expected = model(x, adapter_names=adapter_names)
    idx = torch.tensor([names.index(a) if a in names else -1 for a in adapter_names])
    y = peftops.ops.multi_lora_linear(x, layer.base_layer.weight, layer.base_layer.bias,
                                      torch.stack([layer.lora_A[a].weight for a in names]),
                                      torch.stack([layer.lora_B[a].weight for a in names]),
                                      torch.tensor([layer.scaling[a] for a in names]), idx)
    assert_close(y, expected, torch.float32, "peft mixed batch")


@pytest.mark.parametrize("path", ["kernels", "fallback"])
def test_multi_lora_bad_indices(monkeypatch, path):
    if path == "fallback":  # PEFTOPS_FALLBACK=1 with no kernel for the device: the same index errors
        monkeypatch.setattr(peftops._extension, "use_kernels", lambda device: False)
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    a, bb, s = torch.randn(2, 3, 8), torch.randn(2, 6, 3), torch.ones(2)
    with pytest.raises(ValueError, match=r"adapter_index\[2\] = 2 is out of range"):
        peftops.ops.multi_lora_linear(x, w, None, a, bb, s, torch.tensor([0, 1, 2, -1]))
    with pytest.raises(ValueError, match="out of range"):
        peftops.ops.multi_lora_linear(x, w, None, a, bb, s, torch.tensor([0, -2, 1, 1]))
    with pytest.raises(ValueError, match="adapter_index must be \\[4\\]"):
        peftops.ops.multi_lora_linear(x, w, None, a, bb, s, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="adapter_index must be int64"):
        peftops.ops.multi_lora_linear(x, w, None, a, bb, s, torch.tensor([0, 1, 0, 1], dtype=torch.int32))
    if path == "fallback":
        return  # its other checks are left to torch's own errors
    with pytest.raises(ValueError, match="lora_b must be"):
        peftops.ops.multi_lora_linear(x, w, None, a, torch.randn(3, 6, 3), s, torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="scales must be"):
        peftops.ops.multi_lora_linear(x, w, None, a, bb, torch.ones(3), torch.tensor([0, 1, 0, 1]))


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("shape", [((29,), 24, 20, 4), ((2, 7), 33, 41, 8), ((50,), 16, 16, 17)]
                         + random_shapes(3, 6, lambda ri: (batch_dims(ri), ri(1, 200), ri(1, 200), ri(1, 32))))
def test_dora_matches_reference(device, shape, p):
    batch, d_in, d_out, r = shape
    for dtype in DTYPES[device]:
        gen = torch.Generator().manual_seed(d_in + d_out)
        x = torch.randn(*batch, d_in, generator=gen).to(device, dtype).requires_grad_()
        w = (torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5).to(device, dtype)
        b = torch.randn(d_out, generator=gen).to(device, dtype).requires_grad_()
        a = (torch.randn(r, d_in, generator=gen) / d_in ** 0.5).to(device, dtype).requires_grad_()
        bb = (torch.randn(d_out, r, generator=gen) * 0.3).to(device, dtype).requires_grad_()
        m = (torch.rand(d_out, generator=gen) + 0.5).to(device, dtype).requires_grad_()
        torch.manual_seed(4)
        y = peftops.ops.dora_linear(x, w, b, a, bb, m, 1.3, p)
        torch.manual_seed(4)
        seed = ref.draw_seed(device, p, True)
        xd, wd, bd, ad, bbd, md = doubles(x, w, b, a, bb, m)
        y_ref = ref.dora_linear(xd, wd, bd, ad, bbd, md, 1.3, p, seed)
        check_grads(y, y_ref, (x, b, a, bb, m), (xd, bd, ad, bbd, md), dtype)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_dora_matches_peft_layer(fan_in_fan_out):
    peft = pytest.importorskip("peft")
    from tiny_models import randomize_lora

    torch.manual_seed(1)
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D
        base = nn.Sequential(Conv1D(20, 24))
    else:
        base = nn.Sequential(nn.Linear(24, 20))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["0"], fan_in_fan_out=fan_in_fan_out)
    model = peft.get_peft_model(base, cfg)
    randomize_lora(model)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(20) + 0.5)
    w = layer.base_layer.weight.t() if fan_in_fan_out else layer.base_layer.weight
    a, bb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    x = torch.randn(2, 5, 24, requires_grad=True)
    expected = model(x)
    y = peftops.ops.dora_linear(x, w, layer.base_layer.bias, a, bb, m, layer.scaling["default"])
    assert_close(y, expected, torch.float32, "peft DoRA output")
    g = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, a, bb, m), g)
    theirs = torch.autograd.grad(expected, (x, a, bb, m), g)
    for name, u, v in zip(["x", "lora_a", "lora_b", "magnitude"], ours, theirs):
        assert_close(u, v, torch.float32, f"peft DoRA grad {name}")


def test_dora_saves_no_full_weight_and_no_mask(device):
    x = torch.randn(64, 32, device=device, requires_grad=True)
    w = torch.randn(48, 32, device=device)
    a = torch.randn(4, 32, device=device, requires_grad=True)
    bb = torch.randn(48, 4, device=device, requires_grad=True)
    m = torch.rand(48, device=device, requires_grad=True)
    saved = {}
    for p in (0.0, 0.2):
        with SavedTensors(exclude=(w, a, bb, m)) as s:
            peftops.ops.dora_linear(x, w, None, a, bb, m, 1.0, p)
        saved[p] = s.nbytes
    # x, z [64, 48], t [64, 4] and the norms [48]: never a [48, 32] matrix nor a mask
    expected = (64 * 32 + 64 * 48 + 64 * 4 + 48) * 4
    assert saved[0.0] == expected and saved[0.2] == expected + 8


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    x, b, a, bb = mk(3, 6), mk(5), mk(2, 6), mk(5, 2)
    w = torch.randn(5, 6, generator=g, dtype=torch.float64)
    m = (torch.rand(5, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    seed = torch.tensor(12)
    # DoRA detaches the norm of W + s B A (as peft): the true Jacobian in A and B differs from DoRA's gradient on
    # purpose, so gradcheck covers x, the bias and the magnitude; A and B are checked against the reference and peft.
    assert torch.autograd.gradcheck(
        lambda x, b, m: torch.ops.peftops.dora_linear_forward(x, w, b, a, bb, m, 0.7, 0.3, seed)[0], (x, b, m))
    la, lb = mk(3, 2, 6), mk(3, 5, 2)
    idx = torch.tensor([2, -1, 0])
    assert torch.autograd.gradcheck(
        lambda x, b, la, lb: peftops.ops.multi_lora_linear(x, w, b, la, lb, torch.tensor([1.0, 0.5, 2.0]), idx),
        (x, b, la, lb))


def test_opcheck_and_compile(device):
    x = torch.randn(2, 3, 8, device=device, requires_grad=True)
    w = torch.randn(6, 8, device=device)
    b = torch.randn(6, device=device, requires_grad=True)
    a = torch.randn(2, 8, device=device, requires_grad=True)
    bb = torch.randn(6, 2, device=device, requires_grad=True)
    m = torch.rand(6, device=device, requires_grad=True)
    la = torch.randn(3, 2, 8, device=device, requires_grad=True)
    lb = torch.randn(3, 6, 2, device=device, requires_grad=True)
    s = torch.tensor([1.0, 2.0, 0.5], device=device)
    idx = torch.tensor([0, 2, -1, 2, 2, 0], device=device)
    torch.library.opcheck(torch.ops.peftops.dora_linear_forward.default,
                          (x, w, b, a, bb, m, 1.5, 0.2, torch.tensor(5, device=device)))
    torch.library.opcheck(torch.ops.peftops.multi_lora_linear_forward.default, (x, w, b, la, lb, s, idx))
    torch._dynamo.reset()

    def f(x):
        return (peftops.ops.dora_linear(x, w, b, a, bb, m, 1.5) +
                peftops.ops.multi_lora_linear(x, w, b, la, lb, s, idx)).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for u, v in zip(torch.autograd.grad(f(x), (x, a, m, la)), torch.autograd.grad(compiled(x), (x, a, m, la))):
        assert_close(v, u, torch.float32, "compiled grad")
