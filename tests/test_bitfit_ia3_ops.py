"""bias_linear, bias_dropout_add, ia3_linear and ia3_glu_linear against their plain-PyTorch references: forward and every
gradient on fresh random inputs, gradcheck, opcheck, torch.compile, saved tensors and bad input."""
import pytest
import torch

import peftops
from peftops.ops import reference as ref
from op_helpers import SavedTensors, assert_close, batch_dims, random_shapes

DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float32, torch.bfloat16, torch.float16]}
SHAPES = [((5,), 7, 3), ((2, 9), 37, 29), ((3, 4, 5), 19, 70), ((130,), 96, 40),
          *random_shapes(3, 4, lambda ri: (batch_dims(ri), ri(1, 300), ri(1, 300)))]


def rnd(gen, device, dtype, *shape, grad=True, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_(grad)


def check_against_reference(fn, ref_fn, args, dtype, seed=None):
    """fn(*args) against ref_fn on float64 copies of the same inputs; every input that requires grad compared."""
    if seed is not None:
        torch.manual_seed(seed)
    y = fn(*args)
    dbl = [a.detach().double().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    y_ref = ref_fn(*dbl)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, "out")
    g = torch.randn_like(y)
    wrt = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(y, [args[i] for i in wrt], g)
    grads_ref = torch.autograd.grad(y_ref, [dbl[i] for i in wrt], g.double())
    for i, a, b in zip(wrt, grads, grads_ref):
        assert a.shape == args[i].shape and a.dtype == args[i].dtype
        assert_close(a, b, dtype, f"grad of input {i}")


@pytest.mark.parametrize("shape", SHAPES)
def test_bias_linear(device, shape):
    batch, d_in, d_out = shape
    for dtype in DTYPES[device]:
        g = torch.Generator().manual_seed(d_in * d_out)
        x = rnd(g, device, dtype, *batch, d_in)
        w = rnd(g, device, dtype, d_out, d_in, grad=False, scale=d_in ** -0.5)
        b = rnd(g, device, dtype, d_out)
        check_against_reference(peftops.ops.bias_linear, ref.bias_linear, (x, w, b), dtype)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(7,), (3, 50), (2, 3, 129), (64, 33)])
def test_bias_dropout_add(device, shape, p):
    for dtype in DTYPES[device]:
        g = torch.Generator().manual_seed(sum(shape))
        x, r = rnd(g, device, dtype, *shape), rnd(g, device, dtype, *shape)
        b = rnd(g, device, dtype, shape[-1])
        torch.manual_seed(9)
        seed = ref.draw_seed(device, p, True)
        check_against_reference(lambda *a: peftops.ops.bias_dropout_add(*a, p),
                                lambda x, b, r: ref.bias_dropout_add(x, b, r, p, seed), (x, b, r), dtype, seed=9)


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_ia3_linear(device, shape, bias, feedforward):
    batch, d_in, d_out = shape
    for dtype in DTYPES[device]:
        g = torch.Generator().manual_seed(d_in + d_out)
        x = rnd(g, device, dtype, *batch, d_in)
        w = rnd(g, device, dtype, d_out, d_in, grad=False, scale=d_in ** -0.5)
        b = rnd(g, device, dtype, d_out) if bias else None
        # peft's vector shapes: [out, 1] for output scaling, [1, in] for feed-forward input scaling
        l = rnd(g, device, dtype, *((1, d_in) if feedforward else (d_out, 1)))
        check_against_reference(lambda x, w, b, l: peftops.ops.ia3_linear(x, w, b, l, feedforward=feedforward),
                                lambda x, w, b, l: ref.ia3_linear(x, w, b, l, feedforward), (x, w, b, l), dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_ia3_glu_linear(device, shape, bias):
    batch, d_in, d_out = shape
    for dtype in DTYPES[device]:
        g = torch.Generator().manual_seed(d_in * d_out)
        gate, up = rnd(g, device, dtype, *batch, d_in), rnd(g, device, dtype, *batch, d_in)
        w = rnd(g, device, dtype, d_out, d_in, grad=False, scale=d_in ** -0.5)
        b = rnd(g, device, dtype, d_out) if bias else None
        l = rnd(g, device, dtype, 1, d_in)  # peft's feed-forward shape
        check_against_reference(peftops.ops.ia3_glu_linear, ref.ia3_glu_linear, (gate, up, w, b, l), dtype)


def test_ia3_glu_linear_is_ia3_linear_over_the_product_and_saves_only_the_factors(device):
    gate = torch.randn(3, 40, 24, device=device)[:, ::2].requires_grad_()  # non-contiguous
    up = torch.randn(3, 20, 24, device=device, requires_grad=True)
    w, b = torch.randn(10, 24, device=device), torch.randn(10, device=device, requires_grad=True)
    l = torch.rand(24, device=device, requires_grad=True)
    with SavedTensors(exclude=(w, b, l)) as s:
        y = peftops.ops.ia3_glu_linear(gate, up, w, b, l)
    assert s.nbytes == gate.untyped_storage().nbytes() + up.untyped_storage().nbytes()
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (gate, up, b, l), gy)
    prod = (gate * up).detach().requires_grad_()
    y2 = peftops.ops.ia3_linear(prod, w, b, l, feedforward=True)
    assert torch.equal(y, y2)  # the same rounding as scaling the product, in peft's order
    d_prod, db, dl = torch.autograd.grad(y2, (prod, b, l), gy)
    assert_close(grads[0], (d_prod * up).detach(), torch.float32, "grad of gate")
    assert_close(grads[1], (d_prod * gate).detach(), torch.float32, "grad of up")
    assert_close(grads[2], db, torch.float32, "grad of bias")
    assert_close(grads[3], dl, torch.float32, "grad of ia3_scale")
    empty = torch.randn(0, 24, device=device, requires_grad=True)
    peftops.ops.ia3_glu_linear(empty, empty, w, b, l).sum().backward()
    assert empty.grad.shape == empty.shape


def test_non_contiguous_and_empty(device):
    x = torch.randn(12, 40, device=device)[:, ::2].requires_grad_()
    w = torch.randn(20, 9, device=device).t()
    b = torch.randn(9, device=device, requires_grad=True)
    l = torch.rand(20, device=device, requires_grad=True)
    check_against_reference(peftops.ops.bias_linear, ref.bias_linear, (x, w, b), torch.float32)
    check_against_reference(lambda *a: peftops.ops.ia3_linear(*a, feedforward=True),
                            lambda *a: ref.ia3_linear(*a, True), (x, w, b, l), torch.float32)
    r = torch.randn(20, 12, device=device).t().requires_grad_()
    check_against_reference(lambda *a: peftops.ops.bias_dropout_add(*a, 0.0), ref.bias_dropout_add,
                            (x, torch.randn(20, device=device, requires_grad=True), r), torch.float32)
    empty = torch.randn(0, 20, device=device, requires_grad=True)
    for y in (peftops.ops.bias_linear(empty, w, b), peftops.ops.ia3_linear(empty, w, b, torch.ones(9, device=device)),
              peftops.ops.bias_dropout_add(empty, b[:0].new_zeros(20), empty, 0.5)):
        y.sum().backward()
    assert torch.equal(b.grad, torch.zeros_like(b)) and empty.grad.shape == empty.shape


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x, w, b = rnd(g, "cpu", torch.float64, 4, 6), rnd(g, "cpu", torch.float64, 5, 6, grad=False), rnd(g, "cpu", torch.float64, 5)
    l_out, l_in = rnd(g, "cpu", torch.float64, 5), rnd(g, "cpu", torch.float64, 6)
    r, bb = rnd(g, "cpu", torch.float64, 4, 6), rnd(g, "cpu", torch.float64, 6)
    seed = torch.tensor(31)
    assert torch.autograd.gradcheck(lambda x, b: peftops.ops.bias_linear(x, w, b), (x, b))
    assert torch.autograd.gradcheck(lambda x, b, l: peftops.ops.ia3_linear(x, w, b, l), (x, b, l_out))
    assert torch.autograd.gradcheck(lambda x, b, l: peftops.ops.ia3_linear(x, w, b, l, feedforward=True), (x, b, l_in))
    assert torch.autograd.gradcheck(
        lambda x, bb, r: torch.ops.peftops.bias_dropout_add_forward(x, bb, r, 0.4, seed), (x, bb, r))
    assert torch.autograd.gradcheck(lambda x, r, b, l: peftops.ops.ia3_glu_linear(x, r, w, b, l), (x, r, b, l_in))


def test_saved_for_backward(device):
    x = torch.randn(256, 64, device=device, requires_grad=True)
    w = torch.randn(32, 64, device=device)
    b = torch.randn(32, device=device, requires_grad=True)
    with SavedTensors(exclude=(w, b)) as s:
        peftops.ops.bias_linear(x, w, b)
    assert s.nbytes == 0  # no activation, only the frozen weight
    res = torch.randn(256, 64, device=device, requires_grad=True)
    bb = torch.randn(64, device=device, requires_grad=True)
    with SavedTensors(exclude=(bb,)) as s:
        peftops.ops.bias_dropout_add(x, bb, res, 0.1)
    assert s.nbytes <= 8  # the seed only: no mask
    l = torch.ones(32, device=device, requires_grad=True)
    with SavedTensors(exclude=(w, b, l)) as s:
        y = peftops.ops.ia3_linear(x, w, b, l)
    assert s.nbytes == y.numel() * 4  # narrowing (out <= in): the base output, smaller than x, kept, not recomputed
    w_wide, b_wide, l_wide = torch.randn(80, 64, device=device), None, torch.ones(80, device=device, requires_grad=True)
    with SavedTensors(exclude=(w_wide, l_wide)) as s:
        peftops.ops.ia3_linear(x, w_wide, b_wide, l_wide)
    assert s.nbytes == x.untyped_storage().nbytes()  # widening: x only, the base output recomputed in backward
    l_in = torch.ones(64, device=device, requires_grad=True)
    with SavedTensors(exclude=(w, l_in)) as s:
        peftops.ops.ia3_linear(x, w, None, l_in, feedforward=True)
    assert s.nbytes == x.untyped_storage().nbytes()  # input scaling: x only


def test_bias_dropout_add_reproduces_and_checkpoints(device):
    from torch.utils.checkpoint import checkpoint
    x = torch.randn(16, 24, device=device, requires_grad=True)
    b = torch.randn(24, device=device, requires_grad=True)
    r = torch.randn(16, 24, device=device)
    f = lambda x: peftops.ops.bias_dropout_add(x, b, r, 0.5).square().sum()  # noqa: E731
    torch.manual_seed(1)
    g1 = torch.autograd.grad(f(x), (x, b))
    torch.manual_seed(1)
    g2 = torch.autograd.grad(checkpoint(f, x, use_reentrant=False), (x, b))
    assert all(torch.equal(a, c) for a, c in zip(g1, g2))
    y_eval = peftops.ops.bias_dropout_add(x, b, r, 0.5, training=False)
    assert torch.equal(y_eval, r + (x + b))


def test_opcheck(device):
    x = torch.randn(3, 5, 8, device=device, requires_grad=True)
    w = torch.randn(6, 8, device=device)
    b = torch.randn(6, device=device, requires_grad=True)
    r = torch.randn(3, 5, 8, device=device, requires_grad=True)
    bb = torch.randn(8, device=device, requires_grad=True)
    l = torch.randn(6, device=device, requires_grad=True)
    seed = torch.tensor(3, device=device)
    torch.library.opcheck(torch.ops.peftops.bias_linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.peftops.bias_dropout_add_forward.default, (x, bb, r, 0.2, seed))
    torch.library.opcheck(torch.ops.peftops.ia3_linear_forward.default, (x, w, b, l, False))
    torch.library.opcheck(torch.ops.peftops.ia3_linear_forward.default, (x, w, None, bb, True))
    torch.library.opcheck(torch.ops.peftops.ia3_glu_linear_forward.default, (x, r, w, b, bb))
    torch.library.opcheck(torch.ops.peftops.ia3_glu_linear_forward.default, (x, r, w, None, bb))


def test_compile_fullgraph(device):
    torch._dynamo.reset()
    x = torch.randn(4, 8, device=device, requires_grad=True)
    w = torch.randn(6, 8, device=device)
    b = torch.randn(6, device=device, requires_grad=True)
    l = torch.randn(8, device=device, requires_grad=True)
    r = torch.randn(4, 6, device=device)

    def block(x, b, l):
        h = peftops.ops.ia3_linear(x, w, None, l, feedforward=True) + peftops.ops.ia3_glu_linear(x, x.sin(), w, None, l)
        return peftops.ops.bias_dropout_add(peftops.ops.bias_linear(x, w, b), b, h + r, 0.0).square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(block(x, b, l), (x, b, l))
    grads_c = torch.autograd.grad(compiled(x, b, l), (x, b, l))
    for g, gc in zip(grads, grads_c):
        assert_close(gc, g, torch.float32, "compiled grad")


@pytest.mark.parametrize("call,match,exc", [
    (lambda: peftops.ops.bias_linear(torch.randn(4, 5), torch.randn(6, 8), torch.randn(6)), "x has 5 input", ValueError),
    (lambda: peftops.ops.bias_linear(torch.randn(4, 8), torch.randn(6, 8), torch.randn(5)), "bias must be", ValueError),
    (lambda: peftops.ops.bias_linear(torch.randn(4, 8), torch.randn(6, 8).double(), torch.randn(6)), "weight has dtype",
     TypeError),
    (lambda: peftops.ops.bias_dropout_add(torch.randn(4, 8), torch.randn(8), torch.randn(4, 7)), "residual must",
     ValueError),
    (lambda: peftops.ops.bias_dropout_add(torch.randn(4, 8), torch.randn(3), torch.randn(4, 8)), "bias must be",
     ValueError),
    (lambda: peftops.ops.bias_dropout_add(torch.randn(4, 8), torch.randn(8), torch.randn(4, 8), 1.0), "p must be in",
     ValueError),
    (lambda: peftops.ops.ia3_linear(torch.randn(4, 8), torch.randn(6, 8), None, torch.randn(8)), "ia3_scale must have 6",
     ValueError),
    (lambda: peftops.ops.ia3_linear(torch.randn(4, 8), torch.randn(6, 8), None, torch.randn(6), feedforward=True),
     "ia3_scale must have 8", ValueError),
    (lambda: peftops.ops.ia3_linear(torch.randint(0, 2, (4, 8)), torch.randn(6, 8), None, torch.randn(6)),
     "x must be float32", TypeError),
    (lambda: peftops.ops.ia3_glu_linear(torch.randn(4, 8), torch.randn(4, 7), torch.randn(6, 8), None, torch.randn(8)),
     "up has shape", ValueError),
    (lambda: peftops.ops.ia3_glu_linear(torch.randn(4, 8), torch.randn(4, 8).double(), torch.randn(6, 8), None,
                                        torch.randn(8)), "up has dtype", TypeError),
    (lambda: peftops.ops.ia3_glu_linear(torch.randn(4, 5), torch.randn(4, 5), torch.randn(6, 8), None, torch.randn(8)),
     "gate has 5 input features", ValueError),
    (lambda: peftops.ops.ia3_glu_linear(torch.randn(4, 8), torch.randn(4, 8), torch.randn(6, 8), None, torch.randn(6)),
     "ia3_scale must have 8", ValueError),
])
def test_bad_input_names_the_argument(call, match, exc):
    with pytest.raises(exc, match=match):
        call()
