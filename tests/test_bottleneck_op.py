"""adapter_bottleneck against its plain-PyTorch reference: forward and all gradients, every activation,
residual given and defaulted, saved tensors, gradcheck, opcheck, compile, bad input."""
import pytest
import torch

import peftops
from peftops.ops import reference as ref
from op_helpers import SavedTensors, assert_close, batch_dims, random_shapes

DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float32, torch.bfloat16, torch.float16]}
ACTS = ["relu", "gelu", "gelu_tanh", "silu"]


def operands(device, dtype, batch, d, m, d_out=None, biases=True, gen=None):
    d_out = d if d_out is None else d_out
    r = lambda *s, sc=1.0: (torch.randn(*s, generator=gen) * sc).to(device, dtype).requires_grad_()  # noqa: E731
    return (r(*batch, d), r(m, d, sc=d ** -0.5), r(m) if biases else None, r(d_out, m, sc=m ** -0.5),
            r(d_out) if biases else None)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("shape", [((5,), 12, 3), ((2, 9), 40, 16), ((3, 4, 5), 33, 7)]
                         + random_shapes(3, 3, lambda ri: (batch_dims(ri), ri(1, 200), ri(1, 64))))
@pytest.mark.parametrize("residual,save_output", [(False, False), (True, False), (False, True)])
def test_matches_reference(device, activation, shape, residual, save_output):
    batch, d, m = shape
    for dtype in DTYPES[device]:
        gen = torch.Generator().manual_seed(d * m)
        args = operands(device, dtype, batch, d, m, d_out=d + 3 if residual else d, gen=gen)
        res = torch.randn(*batch, d + 3, generator=gen).to(device, dtype).requires_grad_() if residual else None
        y = peftops.ops.adapter_bottleneck(*args, activation=activation, scale=0.7, residual=res,
                                           save_output=save_output)
        inputs = [t for t in (*args, res) if t is not None]
        dbl = [t.detach().double().requires_grad_() for t in inputs]
        it = iter(dbl)
        args_d = [next(it) if t is not None else None for t in args]
        y_ref = ref.adapter_bottleneck(*args_d, activation, 0.7, next(it) if residual else None)
        assert_close(y, y_ref, dtype, "out")
        g = torch.randn_like(y)
        for i, (u, v) in enumerate(zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(y_ref, dbl, g.double()))):
            assert u.shape == inputs[i].shape
            assert_close(u, v, dtype, f"grad {i}")


def test_without_biases_and_empty(device):
    h, wd, _, wu, _ = operands(device, torch.float32, (6,), 10, 4, biases=False)
    y = peftops.ops.adapter_bottleneck(h, wd, None, wu, None, activation="silu")
    assert_close(y, ref.adapter_bottleneck(h, wd, None, wu, None, "silu"), torch.float32, "no biases")
    e = torch.randn(0, 10, device=device, requires_grad=True)
    peftops.ops.adapter_bottleneck(e, wd, None, wu, None).sum().backward()
    assert e.grad.shape == (0, 10) and torch.equal(wd.grad, torch.zeros_like(wd))


def test_saves_only_input_and_pre_activation(device):
    h, wd, bd, wu, bu = operands(device, torch.float32, (128,), 64, 8)
    with SavedTensors(exclude=(wd, bd, wu, bu)) as s:
        peftops.ops.adapter_bottleneck(h, wd, bd, wu, bu, activation="gelu")
    assert s.nbytes == (128 * 64 + 128 * 8) * 4  # h and the [tokens, m] pre-activation
    with SavedTensors(exclude=(wd, bd, wu, bu)) as s:
        y = peftops.ops.adapter_bottleneck(h, wd, bd, wu, bu, activation="gelu", save_output=True)
    # the output in place of h (a caller's next layer keeps it anyway), and the pre-activation
    assert y.untyped_storage().data_ptr() in s.storages and h.untyped_storage().data_ptr() not in s.storages
    assert s.nbytes == (128 * 64 + 128 * 8) * 4
    with pytest.raises(ValueError, match=r"save_output=True .* \(residual=None\)"):
        peftops.ops.adapter_bottleneck(h, wd, bd, wu, bu, residual=h * 2, save_output=True)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    for act in ACTS:
        args = operands("cpu", torch.float64, (4,), 6, 3, gen=gen)
        res = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda *a: peftops.ops.adapter_bottleneck(*a, activation=act, scale=1.3), args)
        assert torch.autograd.gradcheck(
            lambda *a: peftops.ops.adapter_bottleneck(*a[:5], activation=act, residual=a[5]), (*args, res))
        assert torch.autograd.gradcheck(lambda *a: peftops.ops.adapter_bottleneck(*a, activation=act, scale=0.6,
                                                                                    save_output=True), args)


def test_opcheck_and_compile(device):
    h, wd, bd, wu, bu = operands(device, torch.float32, (2, 3), 8, 4)
    forward = torch.ops.peftops.adapter_bottleneck_forward.default
    torch.library.opcheck(forward, (h, wd, bd, wu, bu, 1, 0.5, None, False))
    torch.library.opcheck(forward, (h, wd, None, wu, None, 3, 2.0, (h * 2).detach().requires_grad_(), False))
    torch.library.opcheck(forward, (h, wd, bd, wu, bu, 2, 0.5, None, True))
    torch._dynamo.reset()
    f = lambda h: peftops.ops.adapter_bottleneck(h, wd, bd, wu, bu, activation="gelu_tanh").square().sum()  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for u, v in zip(torch.autograd.grad(f(h), (h, wd, bu)), torch.autograd.grad(compiled(h), (h, wd, bu))):
        assert_close(v, u, torch.float32, "compiled grad")


@pytest.mark.parametrize("kwargs,match,exc", [
    (dict(activation="tanh"), "activation must be one of", ValueError),
    (dict(w_down=torch.randn(4, 7)), "w_down must be", ValueError),
    (dict(w_up=torch.randn(8, 5)), "w_up must be", ValueError),
    (dict(w_up=torch.randn(9, 4), b_up=torch.randn(9)), "default residual h has 8", ValueError),
    (dict(b_down=torch.randn(5)), "b_down must be", ValueError),
    (dict(residual=torch.randn(3, 7)), "residual must be", ValueError),
    (dict(w_up=torch.randn(8, 4, dtype=torch.float64)), "w_up has dtype", TypeError),
])
def test_bad_input_names_the_argument(kwargs, match, exc):
    args = dict(h=torch.randn(3, 8), w_down=torch.randn(4, 8), b_down=torch.randn(4), w_up=torch.randn(8, 4),
                b_up=torch.randn(8))
    extra = {k: kwargs.pop(k) for k in ("activation", "residual") if k in kwargs}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        peftops.ops.adapter_bottleneck(*args.values(), **extra)
