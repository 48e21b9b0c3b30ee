"""lora_linear against its plain-PyTorch reference: forward and every gradient, fresh random inputs."""
import pytest
import torch

import peftops
from peftops.ops import reference as ref
from op_helpers import SavedTensors, assert_close, batch_dims, random_shapes

DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float32, torch.bfloat16, torch.float16]}


def make(device, dtype, batch, d_in, d_out, r, bias=True, bias_grad=True, gen=None):
    def rnd(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_(grad)
    x = rnd(*batch, d_in)
    w = rnd(d_out, d_in, scale=d_in ** -0.5, grad=False)
    b = rnd(d_out, grad=bias_grad) if bias else None
    a = rnd(r, d_in, scale=d_in ** -0.5)
    bb = rnd(d_out, r, scale=0.5)
    return x, w, b, a, bb


def run_both(args, scale, p, training=True, seed=1234):
    """The op and the reference on the same inputs and the same dropout seed; returns outputs and grads."""
    x, w, b, a, bb = args
    torch.manual_seed(seed)
    y = peftops.ops.lora_linear(x, w, b, a, bb, scale, p, training=training)
    torch.manual_seed(seed)
    s = torch.randint(2**63 - 1, (), device=x.device) if (training and p > 0) else None
    # reference in float64 from the same (possibly low-precision) inputs
    dbl = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in args]
    y_ref = ref.lora_linear(*dbl, scale, p if s is not None else 0.0, s)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for t in (x, b, a, bb) if t is not None and t.requires_grad], g)
    grads_ref = torch.autograd.grad(y_ref, [t for t in dbl if t is not None and t.requires_grad and t is not dbl[1]],
                                    g.double())
    return y, y_ref, grads, grads_ref


def dtypes(device):
    return DTYPES[device]


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("shape", [((5,), 7, 3, 1), ((2, 9), 37, 29, 4), ((33,), 64, 48, 16), ((3, 4, 5), 19, 70, 17),
                                   ((130,), 96, 40, 40), ((3, 347), 200, 56, 8)]  # the last: several row blocks
                         + random_shapes(4, 1, lambda ri: (batch_dims(ri), ri(1, 300), ri(1, 300), ri(1, 48))))
def test_matches_reference(device, shape, p):
    batch, d_in, d_out, r = shape
    for dtype in dtypes(device):
        gen = torch.Generator().manual_seed(hash((shape, p)) % 2**31)
        args = make(device, dtype, batch, d_in, d_out, r, gen=gen)
        y, y_ref, grads, grads_ref = run_both(args, 1.7, p)
        assert y.dtype == dtype and y.shape == (*batch, d_out)
        assert_close(y, y_ref, dtype, "out")
        for name, g, gr in zip(["x", "bias", "lora_a", "lora_b"], grads, grads_ref):
            assert g.shape == gr.shape and g.dtype == dtype, name
            assert_close(g, gr, dtype, f"grad {name}")


def test_dropout_changes_output_and_reproduces(device):
    args = make(device, torch.float32, (64,), 48, 32, 8)
    torch.manual_seed(0)
    y1 = peftops.ops.lora_linear(*args, 2.0, 0.5)
    torch.manual_seed(0)
    y2 = peftops.ops.lora_linear(*args, 2.0, 0.5)
    y3 = peftops.ops.lora_linear(*args, 2.0, 0.5)
    y_eval = peftops.ops.lora_linear(*args, 2.0, 0.5, training=False)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    assert_close(y_eval, ref.lora_linear(*args, 2.0), torch.float32, "eval mode has no dropout")


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_non_contiguous_operands(device, p):
    # x a strided slice of a wider tensor, x transposed, weight a transposed view (GPT-2 Conv1D layout).
    base = torch.randn(40, 2 * 24, device=device)
    x_slice = base[:, ::2].requires_grad_()
    x_t = torch.randn(24, 40, device=device).t().requires_grad_()
    w = torch.randn(24, 30, device=device).t()  # [30, 24], stride (1, 30)
    b = torch.randn(30, device=device, requires_grad=True)
    a = torch.randn(6, 24, device=device, requires_grad=True)
    bb = torch.randn(30, 6, device=device, requires_grad=True)
    for x in (x_slice, x_t):
        assert not x.is_contiguous()
        y, y_ref, grads, grads_ref = run_both((x, w, b, a, bb), 0.5, p)
        assert_close(y, y_ref, torch.float32, "out")
        for g, gr in zip(grads, grads_ref):
            assert_close(g, gr, torch.float32, "grad")


def test_empty_batch(device):
    x, w, b, a, bb = make(device, torch.float32, (0, 3), 16, 8, 4)
    y = peftops.ops.lora_linear(x, w, b, a, bb, 1.0, 0.1)
    assert y.shape == (0, 3, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(bb.grad, torch.zeros_like(bb))
    assert torch.equal(b.grad, torch.zeros_like(b))


def test_weight_never_gets_a_gradient(device):
    x, w, b, a, bb = make(device, torch.float32, (8,), 16, 12, 4)
    w.requires_grad_()
    peftops.ops.lora_linear(x, w, b, a, bb, 1.0, 0.1).sum().backward()
    assert w.grad is None and a.grad is not None


def test_only_requested_gradients(device):
    # A frozen first layer: x needs no gradient; a frozen bias: none either.
    x, w, b, a, bb = make(device, torch.float32, (8,), 16, 12, 4, bias_grad=False)
    x.requires_grad_(False)
    y = peftops.ops.lora_linear(x, w, b, a, bb, 1.0, 0.0)
    y.sum().backward()
    assert x.grad is None and b.grad is None and a.grad is not None and bb.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("frozen", ["x", "lora_a", "x and lora_b"])
def test_dropout_gradients_when_only_some_are_needed(device, frozen, dtype):
    # backward's dropout part alone for dx (lora_a frozen) or for dA (x frozen), over several row blocks
    x, w, b, a, bb = make(device, dtype, (1700,), 160, 24, 8)
    for name, t in (("x", x), ("lora_a", a), ("lora_b", bb)):
        if name in frozen:
            t.requires_grad_(False)
    y, y_ref, grads, grads_ref = run_both((x, w, b, a, bb), 1.5, 0.25)
    assert_close(y, y_ref, dtype, "out")
    assert len(grads) == len(grads_ref)
    for g, gr in zip(grads, grads_ref):
        assert_close(g, gr, dtype, "grad")


def test_gradcheck_float64_with_dropout():
    x, w, b, a, bb = make("cpu", torch.float64, (3, 5), 9, 7, 3)
    seed = torch.tensor(4242)

    def f(x, b, a, bb):
        return torch.ops.peftops.lora_linear_forward(x, w, b, a, bb, 0.8, 0.3, seed)[0]

    assert torch.autograd.gradcheck(f, (x, b, a, bb))
    assert torch.autograd.gradcheck(lambda x, a, bb: peftops.ops.lora_linear(x, w, None, a, bb, 0.8), (x, a, bb))


def test_saves_no_mask_and_no_copy_of_x(device):
    x, w, b, a, bb = make(device, torch.float32, (256,), 128, 96, 8)
    saved = {}
    for p in (0.0, 0.1):
        with SavedTensors(exclude=(w, b, a, bb)) as s:
            peftops.ops.lora_linear(x, w, b, a, bb, 1.0, p)
        saved[p] = s
    x_bytes = x.untyped_storage().nbytes()
    t_bytes = 256 * 8 * 4
    assert saved[0.0].nbytes == x_bytes + t_bytes  # x itself (no copy) and the rank-r t
    assert saved[0.1].nbytes <= saved[0.0].nbytes + 8  # dropout adds only its 8-byte seed
    assert x.untyped_storage().data_ptr() in saved[0.1].storages


@pytest.mark.parametrize("bad,match,exc", [
    (dict(x=torch.randn(4, 5)), "x has 5 input features", ValueError),
    (dict(weight=torch.randn(6, 8, 1)), "weight must be 2-D", ValueError),
    (dict(lora_a=torch.randn(3, 9)), "lora_a must be", ValueError),
    (dict(lora_b=torch.randn(6, 3)), "lora_b must be", ValueError),
    (dict(lora_a=torch.randn(0, 8), lora_b=torch.randn(6, 0)), "rank r >= 1", ValueError),
    (dict(bias=torch.randn(5)), "bias must be", ValueError),
    (dict(lora_b=torch.randn(6, 4, dtype=torch.float64)), "lora_b has dtype", TypeError),
    (dict(x=torch.randint(0, 3, (4, 8))), "x must be float32", TypeError),
    (dict(dropout_p=1.0), "dropout_p must be in", ValueError),
    (dict(dropout_p=-0.1), "dropout_p must be in", ValueError),
    (dict(scale=float("nan")), "scale must be finite", ValueError),
    (dict(x=torch.tensor(1.0)), "0-d", ValueError),
    *((dict({name: torch.randn(*shape, device="meta")}), f"{name} is on meta but x is on cpu", ValueError)
      for name, shape in (("weight", (6, 8)), ("bias", (6,)), ("lora_a", (4, 8)), ("lora_b", (6, 4)))),
])
def test_bad_input_names_the_argument(bad, match, exc):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), bias=torch.randn(6), lora_a=torch.randn(4, 8),
                lora_b=torch.randn(6, 4), scale=1.0, dropout_p=0.1)
    args.update(bad)
    with pytest.raises(exc, match=match):
        peftops.ops.lora_linear(**args)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mismatch_is_an_error():
    with pytest.raises(ValueError, match="weight is on"):
        peftops.ops.lora_linear(torch.randn(4, 8, device="cuda"), torch.randn(6, 8), None,
                                torch.randn(4, 8, device="cuda"), torch.randn(6, 4, device="cuda"), 1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_with_the_same_seed():
    args = make("cpu", torch.float32, (50,), 40, 30, 8)
    torch.manual_seed(3)
    seed = torch.randint(2**63 - 1, ())
    y_cpu = torch.ops.peftops.lora_linear_forward(*args, 1.5, 0.4, seed)[0]
    cuda_args = [t.detach().cuda() for t in args]
    y_gpu = torch.ops.peftops.lora_linear_forward(*cuda_args, 1.5, 0.4, seed.cuda())[0]
    assert_close(y_gpu.cpu(), y_cpu, torch.float32, "same mask on CPU and CUDA")


def test_autocast_runs_in_the_autocast_dtype(device):
    low = torch.bfloat16
    x, w, b, a, bb = make(device, torch.float32, (6, 5), 24, 16, 4)
    with torch.autocast(device, dtype=low):
        y = peftops.ops.lora_linear(x, w, b, a, bb, 1.5)
        y_linear = torch.nn.functional.linear(x, w, b)
    assert y.dtype == y_linear.dtype == low
    y_ref = ref.lora_linear(*(t.detach().to(low).double() for t in (x, w, b, a, bb)), 1.5)
    assert_close(y, y_ref, low, "autocast output")
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and a.grad.dtype == torch.float32  # gradients in the leaves' dtype
