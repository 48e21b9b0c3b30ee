"""Edges every op family shares: empty inputs, zero-width layers, second derivatives, arguments on the wrong
device (meta included), peft's vector shapes for IA3, and torch.compile with dynamic shapes."""
import numpy as np
import pytest
import torch

from peftops import _extension, ops
from peftops.ops import reference


def _lora(x):
    return ops.lora_linear(x, torch.randn(6, 8), torch.randn(6), torch.randn(2, 8, requires_grad=True),
                           torch.randn(6, 2, requires_grad=True), 1.5)


def _dora(x):
    return ops.dora_linear(x, torch.randn(6, 8), None, torch.randn(2, 8), torch.randn(6, 2), torch.rand(6) + 0.5, 1.5)


def _multi_lora(x):
    return ops.multi_lora_linear(x, torch.randn(6, 8), None, torch.randn(2, 2, 8), torch.randn(2, 6, 2),
                                 torch.ones(2), torch.tensor([0, 1, -1, 0]))


def _bottleneck(x):
    return ops.adapter_bottleneck(x, torch.randn(3, 8), torch.randn(3), torch.randn(8, 3), torch.randn(8),
                                  activation="gelu")


def _bias_linear(x):
    return ops.bias_linear(x, torch.randn(6, 8), torch.randn(6, requires_grad=True))


def _bias_dropout_add(x):
    return ops.bias_dropout_add(x, torch.randn(8, requires_grad=True), torch.randn(4, 8), 0.0)


def _ia3(x):
    return ops.ia3_linear(x, torch.randn(6, 8), None, torch.rand(1, 8, requires_grad=True), feedforward=True)


def _ia3_glu(x):
    return ops.ia3_glu_linear(x, x.detach().cos(), torch.randn(6, 8), None, torch.rand(8, requires_grad=True))


def _prefix(x):
    q = x.view(1, 2, 2, 8)
    k = torch.randn(1, 2, 3, 8)
    return ops.prefix_attention(q, k, k, torch.randn(2, 4, 8), torch.randn(2, 4, 8), is_causal=True)


OPS = {"lora": _lora, "dora": _dora, "multi_lora": _multi_lora, "bottleneck": _bottleneck,
       "bias_linear": _bias_linear, "bias_dropout_add": _bias_dropout_add, "ia3": _ia3, "ia3_glu": _ia3_glu,
       "prefix": _prefix}


@pytest.mark.parametrize("op", OPS)
def test_second_derivative_is_an_error_not_zero(op):
    x = torch.randn(4, 8, dtype=torch.float64).float().requires_grad_()
    y = OPS[op](x)
    (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)  # first order works
    assert g.shape == x.shape and torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(g.sum(), x)


@pytest.mark.parametrize("shape", [(1, 2, 0, 8), (0, 2, 3, 8)])
def test_prefix_attention_empty_queries(device, shape):
    # no query rows (or no batch rows): an empty output, and gradients of the right shapes
    q = torch.randn(shape, device=device, requires_grad=True)
    k = torch.randn(shape[0], 2, 5, 8, device=device, requires_grad=True)
    pk, pv = (torch.randn(2, 4, 8, device=device, requires_grad=True) for _ in range(2))
    out = ops.prefix_attention(q, k, k, pk, pv, is_causal=True)
    assert out.shape == shape
    out.sum().backward()
    assert torch.equal(pk.grad, torch.zeros_like(pk)) and torch.equal(k.grad, torch.zeros_like(k))


def test_prefix_attention_rejects_a_non_finite_scale():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.prefix_attention(q, q, q, torch.randn(2, 4, 8), torch.randn(2, 4, 8), scale=float("nan"))


@pytest.mark.parametrize("call,match", [
    (lambda: ops.lora_linear(torch.randn(3, 0), torch.randn(5, 0), None, torch.randn(2, 0), torch.randn(5, 2), 1.0),
     "lora_linear: weight must be 2-D"),
    (lambda: ops.dora_linear(torch.randn(3, 8), torch.randn(0, 8), None, torch.randn(2, 8), torch.randn(0, 2),
                             torch.ones(0), 1.0), "dora_linear: weight"),
    (lambda: ops.multi_lora_linear(torch.randn(3, 0), torch.randn(5, 0), None, torch.randn(1, 2, 0),
                                   torch.randn(1, 5, 2), torch.ones(1), torch.zeros(3, dtype=torch.long)),
     "multi_lora_linear: weight"),
    (lambda: ops.bias_linear(torch.randn(3, 4), torch.randn(0, 4), torch.randn(0)), "bias_linear: weight"),
    (lambda: ops.ia3_linear(torch.randn(3, 0), torch.randn(5, 0), None, torch.ones(5)), "ia3_linear: weight"),
    (lambda: ops.adapter_bottleneck(torch.randn(3, 0), torch.randn(2, 0), None, torch.randn(0, 2), None),
     "adapter_bottleneck: h"),
])
def test_zero_width_layers_are_named_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_dora_errors_name_dora():
    with pytest.raises(ValueError, match="dora_linear: x has 7 input features"):
        ops.dora_linear(torch.randn(3, 7), torch.randn(5, 8), None, torch.randn(2, 8), torch.randn(5, 2), torch.ones(5),
                        1.0)


@pytest.mark.parametrize("call,match", [
    (lambda h: ops.adapter_bottleneck(h, torch.randn(2, 8, device="meta"), None, torch.randn(8, 2), None), "w_down"),
    (lambda h: ops.adapter_bottleneck(h, torch.randn(2, 8), None, torch.randn(8, 2), None,
                                      residual=torch.randn(3, 8, device="meta")), "residual"),
    (lambda h: ops.multi_lora_linear(h, torch.randn(5, 8), None, torch.randn(2, 2, 8), torch.randn(2, 5, 2),
                                     torch.ones(2, device="meta"), torch.tensor([0, 1, -1])), "scales"),
    (lambda h: ops.multi_lora_linear(h, torch.randn(5, 8), None, torch.randn(2, 2, 8), torch.randn(2, 5, 2),
                                     torch.ones(2), torch.tensor([0, 1, -1], device="meta")), "adapter_index"),
])
def test_an_argument_on_another_device_is_named(call, match):
    # a meta argument must not send the call to the fake kernel (uninitialised output)
    with pytest.raises(ValueError, match=match):
        call(torch.randn(3, 8))


def test_ia3_scale_takes_peft_shapes_and_nothing_else():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    ref = ops.ia3_linear(x, w, None, torch.arange(5.0))
    assert torch.equal(ops.ia3_linear(x, w, None, torch.arange(5.0).view(5, 1)), ref)  # peft's [out, 1]
    ref_ff = ops.ia3_linear(x, w, None, torch.arange(8.0), feedforward=True)
    assert torch.equal(ops.ia3_linear(x, w, None, torch.arange(8.0).view(1, 8), feedforward=True), ref_ff)
    for bad, ff in ((torch.ones(1, 5), False), (torch.ones(1, 5, 1), False), (torch.ones(8, 1), True)):
        with pytest.raises(ValueError, match="ia3_scale must be 1-D or peft's"):
            ops.ia3_linear(x, w, None, bad, feedforward=ff)
    with pytest.raises(ValueError, match="ia3_glu_linear: ia3_scale"):
        ops.ia3_glu_linear(x, x, w, None, torch.ones(8, 1))


def test_multi_lora_linear_compiles_with_dynamic_shapes():
    w, a, b, s = torch.randn(6, 8), torch.randn(3, 2, 8), torch.randn(3, 6, 2), torch.rand(3)
    f = torch.compile(ops.multi_lora_linear, fullgraph=True, dynamic=True, backend="aot_eager")
    for tokens in (5, 9):
        x, idx = torch.randn(tokens, 8), torch.randint(-1, 3, (tokens,))
        torch.testing.assert_close(f(x, w, None, a, b, s, idx), ops.multi_lora_linear(x, w, None, a, b, s, idx))


_DW, _DB, _DA, _DBB = torch.randn(6, 8), torch.randn(6), torch.randn(2, 8), torch.randn(6, 2)
_DYNAMIC_CASES = {
    "lora_linear": lambda x: ops.lora_linear(x, _DW, _DB, _DA, _DBB, 0.5, 0.1),
    "dora_linear": lambda x: ops.dora_linear(x, _DW, _DB, _DA, _DBB, torch.ones(6), 0.5),
    "multi_lora_linear": lambda x: ops.multi_lora_linear(x, _DW, _DB, _DA[None], _DBB[None], torch.ones(1),
                                                         torch.zeros(x.shape[:-1].numel(), dtype=torch.long)),
    "ia3_linear": lambda x: ops.ia3_linear(x, _DW, _DB, torch.ones(6)),
    "ia3_glu_linear": lambda x: ops.ia3_glu_linear(x, x, _DW, _DB, torch.ones(8)),
    "adapter_bottleneck": lambda x: ops.adapter_bottleneck(x, _DA, None, _DA.T, None),
    "adapter_bottleneck_save_output": lambda x: ops.adapter_bottleneck(x, _DA, None, _DA.T, None, save_output=True),
    "bias_linear": lambda x: ops.bias_linear(x, _DW, _DB),
    "bias_dropout_add": lambda x: ops.bias_dropout_add(x, torch.ones(8), x, 0.1),
    "prefix_attention": lambda x: ops.prefix_attention(*(x.view(2, 1, -1, 8),) * 3, *(_DA.view(1, 2, 8),) * 2,
                                                       is_causal=True),
}


def test_the_internal_dropout_ops_trace_and_refuse_a_gradient_they_cannot_give():
    seed = torch.tensor(3)
    torch.library.opcheck(torch.ops.peftops.dropout_keep_mask.default, ([3, 5], 0.5, seed))
    f = torch.compile(lambda s: torch.ops.peftops.dropout_keep_mask([3, 5], 0.5, s), fullgraph=True, backend="eager")
    assert torch.equal(f(seed), torch.ops.peftops.dropout_keep_mask([3, 5], 0.5, seed))
    x = torch.randn(3, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="not implemented"):  # rather than x.grad silently None
        torch.ops.peftops.dropout(x, 0.5, seed).sum().backward()


@pytest.mark.parametrize("name", _DYNAMIC_CASES)
def test_ops_keep_dynamic_shapes_symbolic(name):
    # one graph for every sequence length (as F.linear and SDPA): an op that reads a concrete size pins it, and a
    # training loop over varying lengths recompiles until fullgraph=True fails at dynamo's recompile limit
    # (aot_eager traces the backward too, where the autograd functions read sizes)
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(_DYNAMIC_CASES[name], fullgraph=True, dynamic=True, backend=counter)
    for length in (3, 5, 7, 9):
        x = torch.randn(2, length, 8, requires_grad=True)
        f(x).sum().backward()
    assert counter.frame_count <= 2  # (dynamo may specialise a float argument once; pinned sizes would give 4)
    torch._dynamo.reset()


@pytest.mark.skipif("cuda" not in _extension.COMPILED, reason="built without CUDA kernels")
def test_the_device_check_traces_for_cuda():
    # the ops ask whether CUDA kernels were built; under torch.compile that must not call an op returning a string
    f = torch.compile(lambda x: x * 2 if _extension.use_kernels(torch.device("cuda")) else x, fullgraph=True,
                      backend="eager")
    assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))


@pytest.mark.parametrize("call,match", [
    (lambda x: ops.lora_linear(x.tolist(), torch.randn(5, 8), None, torch.randn(2, 8), torch.randn(5, 2), 1.0),
     "lora_linear: x must be a torch.Tensor, got list"),
    (lambda x: ops.bias_linear(x, torch.randn(5, 8), None), "bias_linear: bias must be a torch.Tensor, got NoneType"),
    (lambda x: ops.bias_dropout_add(x, None, x), "bias_dropout_add: bias must be"),
    (lambda x: ops.ia3_linear(x, torch.randn(5, 8), None, None), "ia3_linear: ia3_scale must be"),
    (lambda x: ops.multi_lora_linear(x, torch.randn(5, 8), None, torch.randn(2, 2, 8), torch.randn(2, 5, 2),
                                     torch.ones(2), None), "multi_lora_linear: adapter_index must be"),
    (lambda x: ops.prefix_attention(x.view(1, 1, 3, 8), None, None, torch.randn(1, 2, 8), torch.randn(1, 2, 8)),
     "prefix_attention: k must be"),
    (lambda x: ops.lora_linear(x.to_sparse(), torch.randn(5, 8), None, torch.randn(2, 8), torch.randn(5, 2), 1.0),
     "lora_linear: x must be a dense \\(strided\\) tensor, got layout torch.sparse_coo"),
    (lambda x: ops.bias_linear(x, torch.randn(5, 8).to_sparse_csr(), None), "bias_linear: weight must be a dense"),
    (lambda x: ops.lora_linear(x, torch.randn(5, 8), None, torch.randn(2, 8), torch.randn(5, 2), 1.0,
                               training=np.bool_(True)), "lora_linear: training must be a bool, got numpy.bool"),
    (lambda x: ops.lora_linear(x, torch.randn(5, 8), None, torch.randn(2, 8), torch.randn(5, 2), "1.0"),
     "lora_linear: scale must be a real number, got str"),
])
def test_a_missing_tensor_or_a_wrong_type_is_named(call, match):
    with pytest.raises(TypeError, match=match):
        call(torch.randn(3, 8))


@pytest.mark.parametrize("fn", ["patch", "unpatch", "merge", "trainable_parameters", "save_adapter", "load_adapter"])
def test_model_functions_need_a_module(fn, tmp_path):
    import peftops
    args = {"patch": ("not a model", peftops.LoraConfig()), "save_adapter": (None, str(tmp_path)),
            "load_adapter": (None, str(tmp_path))}.get(fn, (None,))
    with pytest.raises(TypeError, match=f"{fn}: model must be a torch.nn.Module"):
        getattr(peftops, fn)(*args)


def _prefix_reference(q, k, v, pk, pv, is_causal):
    """Softmax over the materialised concatenation, masked with masked_fill as SDPA's math path (a hidden NaN score
    is hidden)."""
    L, S, P = q.shape[2], k.shape[2], pk.shape[1]
    keys, values = (torch.cat([p.expand(q.shape[0], -1, -1, -1), t], 2) for p, t in ((pk, k), (pv, v)))
    z = (q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if is_causal:
        ones = lambda n: torch.ones(L, n, dtype=torch.bool, device=q.device)  # noqa: E731
        visible = torch.cat([ones(P), ones(S).tril(S - L)], 1)
        z = z.masked_fill(~visible, float("-inf"))
    return z.softmax(-1) @ values


@pytest.mark.parametrize("dense", ["0", "1"])
@pytest.mark.parametrize("where,L,S,P,causal", [("q", 2, 3, 2, False), ("prefix_k", 2, 3, 1, False),
                                                ("k", 2, 1, 2, False), ("k", 2, 1, 2, True), ("k", 3, 4, 2, True),
                                                ("v", 2, 3, 2, False), ("v", 3, 2, 2, True)])
def test_prefix_attention_propagates_nan_as_softmax(monkeypatch, device, dense, where, L, S, P, causal):
    # A NaN score makes its row NaN, as softmax does (ATen's CPU flash kernel, which the op ran on before, took such a
    # row for a fully masked one: output 0). Keys that a row cannot see (causal) leave it alone. The device's kernel
    # and the dense path alike.
    monkeypatch.setenv("PEFTOPS_PREFIX_DENSE", dense)
    g = torch.Generator().manual_seed(L * 100 + S * 10 + P)
    t = {"q": torch.randn(1, 1, L, 16, generator=g), "k": torch.randn(1, 1, S, 16, generator=g),
         "v": torch.randn(1, 1, S, 16, generator=g), "prefix_k": torch.randn(1, P, 16, generator=g),
         "prefix_v": torch.randn(1, P, 16, generator=g)}
    index = (0, 0, 0) if where == "prefix_k" else (0, 0, 0, 0)
    t[where][index] = float("nan")
    args = [t[n].to(device).requires_grad_() for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    out = ops.prefix_attention(*args, is_causal=causal)
    expected = _prefix_reference(*args, causal)
    assert expected.isnan().any()
    torch.testing.assert_close(out, expected, equal_nan=True)
    grad = torch.randn_like(out)
    for g, g_ref, name in zip(torch.autograd.grad(out, args, grad), torch.autograd.grad(expected, args, grad),
                              ("q", "k", "v", "prefix_k", "prefix_v")):
        torch.testing.assert_close(g, g_ref, equal_nan=True, msg=lambda m: f"grad {name}: {m}")


def test_lora_linear_under_autocast_takes_float32_adapters_over_a_bfloat16_base():
    # As F.linear: autocast casts the operands (here a bf16 base with fp32 adapters and bias, peft's layout).
    x, w, b, a, bb = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5), torch.randn(2, 8), torch.randn(5, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.lora_linear(x.bfloat16(), w.bfloat16(), b, a, bb, 0.5)
    assert y.dtype == torch.bfloat16
    expected = x @ w.T + b + 0.5 * x @ a.T @ bb.T
    torch.testing.assert_close(y.float(), expected, rtol=0.05, atol=0.1)
    with pytest.raises(TypeError, match="weight has dtype"):  # outside autocast the dtypes must agree
        ops.lora_linear(x.bfloat16(), w, b, a, bb, 0.5)


_X, _W = torch.randn(3, 4), torch.randn(5, 4)


@pytest.mark.parametrize("call,match", [
    (lambda v: ops.lora_linear(_X, _W, None, torch.randn(2, 4), torch.randn(5, 2), v), "lora_linear: scale"),
    (lambda v: ops.lora_linear(_X, _W, None, torch.randn(2, 4), torch.randn(5, 2), 1.0, v), "lora_linear: dropout_p"),
    (lambda v: ops.dora_linear(_X, _W, None, torch.randn(2, 4), torch.randn(5, 2), torch.ones(5), v),
     "dora_linear: scale"),
    (lambda v: ops.bias_dropout_add(_X, torch.randn(4), _X, v), "bias_dropout_add: p"),
    (lambda v: ops.adapter_bottleneck(_X, torch.randn(2, 4), None, torch.randn(4, 2), None, scale=v),
     "adapter_bottleneck: scale"),
    (lambda v: ops.prefix_attention(*(torch.randn(1, 1, 2, 4),) * 3, *(torch.randn(1, 1, 4),) * 2, scale=v),
     "prefix_attention: scale")])
@pytest.mark.parametrize("value,error", [(None, TypeError), ("0.5", TypeError), (torch.ones(2), ValueError),
                                         (torch.tensor(0.5, requires_grad=True), ValueError)])
def test_number_arguments_are_named(call, error, match, value):
    if value is None and "prefix_attention" in match:
        return  # scale=None is prefix_attention's default (1 / sqrt(D))
    with pytest.raises(error, match=match):
        call(value)


@pytest.mark.parametrize("call,match", [
    (lambda: ops.lora_linear(_X, _W, None, torch.randn(2, 4), torch.randn(5, 2), 1.0, training=None),
     "lora_linear: training"),
    (lambda: ops.prefix_attention(*(torch.randn(1, 1, 2, 4),) * 3, *(torch.randn(1, 1, 4),) * 2, is_causal=None),
     "prefix_attention: is_causal"),
    (lambda: ops.ia3_linear(_X, _W, None, torch.ones(5), feedforward=1), "ia3_linear: feedforward")])
def test_flags_must_be_bools(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def _autocast_cases():
    g = torch.Generator().manual_seed(7)

    def r(*shape, grad=False):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    x, w, b, a, bb = r(6, 8, grad=True), r(5, 8), r(5, grad=True), r(2, 8, grad=True), r(5, 2, grad=True)
    q, k, v = (r(2, 2, 4, 8, grad=True) for _ in range(3))
    return {
        "lora_linear": lambda: ops.lora_linear(x, w, b, a, bb, 0.5),
        "dora_linear": lambda: ops.dora_linear(x, w, b, a, bb, torch.rand(5, generator=g) + 0.5, 0.5),
        "multi_lora_linear": lambda: ops.multi_lora_linear(x, w, b, r(2, 2, 8, grad=True), r(2, 5, 2), torch.ones(2),
                                                           torch.tensor([0, 1, -1, 0, 1, 0])),
        "bias_linear": lambda: ops.bias_linear(x, w, b),
        "ia3_linear": lambda: ops.ia3_linear(x, w, b, r(5, grad=True)),
        "ia3_linear widening": lambda: ops.ia3_linear(r(6, 3, grad=True), r(9, 3), None, r(9, grad=True)),
        "ia3_glu_linear": lambda: ops.ia3_glu_linear(x, x * 2, w, b, r(8, grad=True)),
        "adapter_bottleneck": lambda: ops.adapter_bottleneck(x, r(3, 8, grad=True), r(3), r(8, 3, grad=True), r(8)),
        "prefix_attention": lambda: ops.prefix_attention(q, k, v, r(2, 3, 8, grad=True), r(2, 3, 8), is_causal=True),
        # a bf16 sublayer output with a float32 bias and residual (mixed: an error outside autocast)
        "bias_dropout_add": lambda: ops.bias_dropout_add(x.bfloat16() if torch.is_autocast_enabled("cpu") else
                                                         x.bfloat16().float(), b.new_ones(8), x, 0.0),
    }


@pytest.mark.parametrize("backward_inside", [False, True])
@pytest.mark.parametrize("name", list(_autocast_cases()))
def test_every_op_under_cpu_autocast(name, backward_inside):
    # As nn.Linear and SDPA: the linear and attention ops run in the autocast dtype (their operands cast once), the
    # elementwise bias_dropout_add and the residual-adding adapter_bottleneck promote (float32 operands stay float32);
    # the kernels' own products are not cast again, in forward or in a backward run inside the autocast region;
    # gradients reach the float32 leaves in float32.
    torch.manual_seed(0)
    expected = _autocast_cases()[name]()
    torch.manual_seed(0)
    call = _autocast_cases()[name]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = call()
        if backward_inside:
            y.float().square().sum().backward()
    if not backward_inside:
        y.float().square().sum().backward()
    assert y.dtype == (torch.float32 if name in ("bias_dropout_add", "adapter_bottleneck") else torch.bfloat16)
    torch.testing.assert_close(y.float(), expected.float(), rtol=0.05, atol=0.05 * expected.abs().max().item())


def test_a_tensor_number_under_compile_is_a_named_error():
    # eagerly a one-element tensor is read as the number; a traced tensor has no value, and the ops' schemas take
    # floats: the error names the argument
    f = torch.compile(lambda s: ops.lora_linear(_X, _W, None, torch.randn(2, 4), torch.randn(5, 2), s), fullgraph=True,
                      backend="eager")
    with pytest.raises(Exception) as raised:
        f(torch.tensor(0.5))
    named = "lora_linear: scale must be a Python number under torch.compile" in str(raised.value)
    # torch 2.6's dynamo reports an exception raised in traced code as "Observed exception", without its message
    assert named or (torch.__version__ < "2.14" and "Observed exception" in str(raised.value)), raised.value


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
def test_bottleneck_activations_propagate_nan(activation):
    h = torch.randn(3, 8)
    h[1, 2] = float("nan")
    h.requires_grad_()
    args = [torch.randn(s, requires_grad=True) for s in ((4, 8), (4,), (8, 4), (8,))]
    out = ops.adapter_bottleneck(h, *args, activation=activation)
    from peftops.ops import reference
    expected = reference.adapter_bottleneck(h, *args, activation=activation)
    assert expected[1].isnan().all() and not expected[0].isnan().any()
    torch.testing.assert_close(out, expected, equal_nan=True)
    g = torch.randn_like(out)
    for ours, theirs in zip(torch.autograd.grad(out, [h, *args], g), torch.autograd.grad(expected, [h, *args], g)):
        torch.testing.assert_close(ours, theirs, equal_nan=True)  # relu's gradient passes at NaN, as torch's


def test_bottleneck_residual_must_be_hs_shape():
    h = torch.randn(2, 3, 8)
    args = (torch.randn(4, 8), None, torch.randn(8, 4), None)
    with pytest.raises(ValueError, match="residual must be h's shape"):
        ops.adapter_bottleneck(h, *args, residual=torch.randn(3, 2, 8))  # as many rows, in another shape


@pytest.mark.parametrize("where", ["lora_a", "lora_b"])
def test_a_zero_scale_keeps_nan_in_the_adapter(where):
    # peft computes B(A x) * scale: with scale 0 a NaN (or inf) in the adapter still reaches the output; the
    # vendor GEMM's alpha = 0 would skip the product and hide it
    x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
    factors = {"lora_a": torch.randn(2, 4), "lora_b": torch.randn(5, 2)}
    factors[where][0, 1] = float("nan") if where == "lora_a" else float("inf")
    a, bb = factors["lora_a"], factors["lora_b"]
    for out in (ops.lora_linear(x, w, b, a, bb, 0.0),
                ops.dora_linear(x, w, b, a, bb, torch.ones(5), 0.0, 0.3),
                ops.multi_lora_linear(x, w, b, a[None], bb[None], torch.zeros(1), torch.tensor([0, -1, 0]))):
        assert out.isnan().any()


def test_a_zero_scale_keeps_nan_in_bottleneck_and_dense_prefix(monkeypatch):
    h, wd, wu = torch.randn(6, 8), torch.randn(3, 8), torch.randn(8, 3)
    wu[2, 1] = float("nan")
    assert ops.adapter_bottleneck(h, wd, None, wu, None, scale=0.0).isnan().any()
    monkeypatch.setenv("PEFTOPS_PREFIX_DENSE", "1")  # CUDA's path for float64 and huge grids
    q, pk = torch.randn(2, 2, 5, 4, requires_grad=True), torch.randn(2, 3, 4, requires_grad=True)
    with torch.no_grad():
        pk[1, 2, 0] = float("nan")
    out = ops.prefix_attention(q, q, q, pk, pk, scale=0.0)
    assert out.isnan().any()
    out.sum().backward()
    assert q.grad.isnan().any() and pk.grad.isnan().any()


@pytest.mark.parametrize("in_features,eps", [(1, None), (16, 1e-3), (16, 1e-2)])
def test_dora_norm_survives_an_adapter_that_nearly_cancels_its_row(in_features, eps):
    # ||W_i + s (B A)_i|| from the identity ||W||^2 + 2s (W A^T).B + s^2 B^T A A^T B cancels when the adapter nearly
    # undoes a row (random weights with few input features, or W = -s B A + eps R): those rows are redone exactly
    g = torch.Generator().manual_seed(1)
    out, r, s = 129, 4, 0.5
    a, b = torch.randn(r, in_features, generator=g), torch.randn(out, r, generator=g)
    w = torch.randn(out, in_features, generator=g) if eps is None else \
        -s * b @ a + eps * torch.randn(out, in_features, generator=g)
    x, m = torch.randn(7, in_features, generator=g), torch.rand(out, generator=g) + 0.5
    norm = torch.ops.peftops.dora_linear_forward(x, w, None, a, b, m, s, 0.0, None)[3]
    exact = torch.linalg.norm(w.double() + s * b.double() @ a.double(), dim=1)
    # (recomputed in float32, a cancelled row keeps W + s B A's own rounding, as peft's: 1e-7 of |s B A| over its norm)
    torch.testing.assert_close(norm.double(), exact, rtol=1e-5 if eps is None else 2e-4, atol=0)
    if eps is None:  # (with W = -s B A + eps R, x W^T + s x A^T B^T itself cancels in float32, in peft's too)
        expected = reference.dora_composed(*(t.double() for t in (x, w)), None, a.double(), b.double(), m.double(), s)
        torch.testing.assert_close(ops.dora_linear(x, w, None, a, b, m, s).double(), expected, rtol=1e-4, atol=1e-5)
    lo = ops.dora_linear(x.bfloat16(), w.bfloat16(), None, a.bfloat16(), b.bfloat16(), m.bfloat16(), s)
    assert lo.isfinite().all()


def test_dora_norm_with_a_nearly_rank_one_adapter_and_a_float16_overflow():
    g = torch.Generator().manual_seed(4)
    # A nearly rank one (trained factors often are), B rows summing to zero, small W rows: the identity's A A^T term
    # cancels inside itself, below any comparison of its three terms
    a = torch.randn(64, generator=g) + 1e-3 * torch.randn(8, 64, generator=g)
    b = torch.randn(256, 8, generator=g)
    b -= b.mean(1, keepdim=True)
    w = 1e-3 * torch.randn(256, 64, generator=g)
    x, m = torch.randn(3, 64, generator=g), torch.ones(256)
    norm = torch.ops.peftops.dora_linear_forward(x, w, None, a, b, m, 1.0, 0.0, None)[3]
    torch.testing.assert_close(norm.double(), torch.linalg.norm(w.double() + b.double() @ a.double(), dim=1),
                               rtol=1e-4, atol=0)
    # float16: W A^T overflows to inf (not NaN) where W + s B A and its norm (346) are finite
    w, a, b = torch.full((4, 128), 30.0).half(), torch.full((2, 128), 30.0).half(), torch.full((4, 2), 0.01).half()
    x, m = torch.randn(3, 128).half(), torch.ones(4).half()
    expected = reference.dora_composed(*(t.double() for t in (x, w)), None, a.double(), b.double(), m.double(), 1.0)
    torch.testing.assert_close(ops.dora_linear(x, w, None, a, b, m, 1.0).double(), expected, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("scale", [0.25, 0.0])
def test_float16_lora_backward_scales_before_it_can_overflow(scale):
    # peft's gradient is (scale dy) B: a loss-scaled float16 dy whose dy B passes 65504 must stay finite for scale < 1
    # (at scale 0 too: dy B * 0 would be inf * 0)
    x = torch.randn(4, 16).half().requires_grad_()
    w, a = (torch.randn(64, 16) / 4).half(), (torch.randn(4, 16) / 4).half().requires_grad_()
    b = torch.full((64, 4), 0.5).half().requires_grad_()
    dy = torch.full((4, 64), 4000.0).half()  # dy @ b = 128000
    calls = [lambda: ops.lora_linear(x, w, None, a, b, scale),
             lambda: ops.multi_lora_linear(x, w, None, a[None], b[None], torch.tensor([scale]), torch.zeros(4).long()),
             lambda: ops.dora_linear(x, w, None, a, b, torch.ones(64).half(), scale)]
    expected = torch.autograd.grad(reference.lora_linear(x, w, None, a, b, scale), (x, a, b), dy)
    assert expected[0].isfinite().all()  # (dA = (s dy B)^T x overflows in peft's arithmetic too)
    for call in calls:
        grads = torch.autograd.grad(call(), (x, a, b), dy)
        assert all(torch.equal(g.isfinite(), e.isfinite()) for g, e in zip(grads, expected))


@pytest.mark.parametrize("scale", [0.25, 0.0])
def test_float16_bottleneck_backward_scales_before_it_can_overflow(scale):
    # PyTorch's autograd of residual + s * up(...) scales dy first: dy^T [f(a) | 1] and dy Wu that pass 65504 must
    # stay finite where s brings them back
    h = torch.ones(400, 8).half().requires_grad_()
    w_down, w_up = torch.full((4, 8), 0.1).half().requires_grad_(), torch.full((8, 4), 0.1).half().requires_grad_()
    b_up = torch.zeros(8).half().requires_grad_()
    dy = torch.full((400, 8), 200.0).half()  # column sums 80000
    got = torch.autograd.grad(ops.adapter_bottleneck(h, w_down, None, w_up, b_up, scale=scale),
                              (h, w_down, w_up, b_up), dy)
    expected = torch.autograd.grad(reference.adapter_bottleneck(h, w_down, None, w_up, b_up, scale=scale),
                                   (h, w_down, w_up, b_up), dy)
    for g, e in zip(got, expected):
        assert g.isfinite().all()
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-3, atol=1e-3)
    assert torch.equal(got[3], b_up.new_full((8,), 80000.0 * scale))


def test_the_multi_lora_fallback_keeps_a_nan_row_in_its_adapter(monkeypatch):
    x = torch.randn(4, 8)
    x[0, 3] = float("nan")  # a row of adapter 0
    a, b = torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 5, 3, requires_grad=True)
    index = torch.tensor([0, 1, 1, -1])
    reference.multi_lora_linear(x, torch.randn(5, 8), None, a, b, torch.ones(2), index).sum().backward()
    assert a.grad[1].isfinite().all() and b.grad[1].isfinite().all() and b.grad[0].isnan().any()


def test_relu_bottleneck_gives_an_unused_unit_no_gradient_even_from_a_nan_weight():
    # torch's relu backward selects (threshold_backward): a unit that is off passes no gradient, whatever w_up holds
    h = (torch.rand(5, 8) + 0.1).requires_grad_()
    w_down, w_up = torch.randn(4, 8), torch.randn(8, 4)
    w_down[2] = -1.0  # unit 2 is off for every row (h > 0)
    w_up[3, 2] = float("nan")
    args = [t.requires_grad_() for t in (w_down, torch.zeros(4), w_up, torch.zeros(8))]
    from peftops.ops import reference
    out, expected = ops.adapter_bottleneck(h, *args), reference.adapter_bottleneck(h, *args, activation="relu")
    torch.testing.assert_close(out, expected, equal_nan=True)
    g = torch.randn_like(out)
    ours, theirs = torch.autograd.grad(out, [h, *args], g), torch.autograd.grad(expected, [h, *args], g)
    assert not theirs[0].isnan().any()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, equal_nan=True)


_FALLBACK_BAD_INPUT = [  # (call, message): inputs the kernels refuse, which the reference alone would take
    (lambda: ops.ia3_linear(torch.randn(3, 8), torch.randn(5, 8), None, torch.ones(1)), "ia3_linear: ia3_scale"),
    (lambda: ops.lora_linear(torch.randn(3, 8), torch.randn(5, 8), None, torch.randn(0, 8), torch.randn(5, 0), 1.0),
     "lora_linear: lora_a"),
    (lambda: ops.bias_dropout_add(torch.randn(3, 8), torch.randn(8), torch.randn(8)), "bias_dropout_add: residual"),
    (lambda: ops.adapter_bottleneck(torch.randn(3, 8), torch.randn(2, 8), None, torch.randn(8, 2), None,
                                    residual=torch.randn(3, 8), save_output=True), "adapter_bottleneck: save_output"),
    (lambda: ops.prefix_attention(*(torch.randn(1, 1, 2, 300),) * 3, *(torch.randn(1, 1, 300),) * 2),
     "prefix_attention: head dim"),
    (lambda: ops.dora_linear(torch.randn(3, 8), torch.randn(5, 8), None, torch.randn(2, 8), torch.randn(4, 2),
                             torch.ones(5), 1.0), "dora_linear: lora_b"),
]


@pytest.mark.parametrize("call,match", _FALLBACK_BAD_INPUT)
def test_the_fallback_refuses_what_the_kernels_refuse(monkeypatch, call, match):
    # A device with no compiled kernel runs the plain-PyTorch reference (PEFTOPS_FALLBACK=1): the kernels' own
    # argument checks run first, on meta copies of the inputs, so both paths raise the same clear errors.
    with pytest.raises(ValueError, match=match):
        call()
    monkeypatch.setattr(_extension, "use_kernels", lambda device: False)
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("fallback", [False, True])
def test_dropout_p_of_one_is_taken_in_eval_only(monkeypatch, fallback):
    # nn.Dropout(p=1) is the identity in eval (a BERT with hidden_dropout_prob=1.0 evaluates); in training it is refused
    if fallback:
        monkeypatch.setattr(_extension, "use_kernels", lambda device: False)
    x, w, b, a, bb = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5), torch.randn(2, 8), torch.randn(5, 2)
    calls = {"lora_linear": lambda p, t: ops.lora_linear(x, w, b, a, bb, 0.5, p, training=t),
             "dora_linear": lambda p, t: ops.dora_linear(x, w, b, a, bb, torch.ones(5), 0.5, p, training=t),
             "bias_dropout_add": lambda p, t: ops.bias_dropout_add(x, x[0], x, p, training=t)}
    for name, call in calls.items():
        torch.testing.assert_close(call(1.0, False), call(0.0, False))
        with pytest.raises(ValueError, match=rf"{name}: (dropout_)?p must be in \[0, 1\), got 1"):
            call(1.0, True)
        with pytest.raises(ValueError, match=r"must be in \[0, 1\) \(or 1 in eval\), got 1.5"):
            call(1.5, False)


def test_the_fallback_under_autocast_takes_what_the_kernels_take(monkeypatch):
    # autocast casts the operands before the kernels' checks; meta copies would skip that cast, so the fallback
    # leaves its checks to the reference there
    x, w, b, a, bb = torch.randn(3, 8).bfloat16(), torch.randn(5, 8), torch.randn(5), torch.randn(2, 8), torch.randn(5, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ops.lora_linear(x, w, b, a, bb, 0.5)
        monkeypatch.setattr(_extension, "use_kernels", lambda device: False)
        out = ops.lora_linear(x, w, b, a, bb, 0.5)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0.02, atol=0.05)


def test_internal_ops_check_what_they_index():
    # reachable as torch.ops.peftops.*: arguments that do not fit are refused, never read out of bounds
    q = torch.randn(1, 1, 4, 8)
    pk = torch.randn(1, 2, 8)
    out, lse = torch.ops.peftops.prefix_attention_forward(q, q, q, pk, pk, None, False, None, 0.0, None)
    flags = (None, False, None, 0.0, None)  # attn_mask, is_causal, scale, dropout_p, seed
    with pytest.raises(ValueError, match="lse must be"):
        torch.ops.peftops.prefix_attention_backward(out, q, q, q, pk, pk, out, lse[..., :2], *flags)
    with pytest.raises(ValueError, match="grad_out and out must have q's shape"):
        torch.ops.peftops.prefix_attention_backward(out[:, :, :2], q, q, q, pk, pk, out, lse, *flags)
    with pytest.raises(ValueError, match="dropout seed must be one int64"):
        torch.ops.peftops.prefix_attention_forward(q, q, q, pk, pk, None, False, None, 0.5, torch.tensor(1.0))
    with pytest.raises(ValueError, match="activation code"):
        torch.ops.peftops.bottleneck_activation(torch.randn(3, 4), 7, False)
    with pytest.raises(ValueError, match="grad must have a's shape"):
        torch.ops.peftops.bottleneck_activation_backward(torch.randn(2, 4), torch.randn(3, 4), 0, 1.0)
    with pytest.raises(ValueError, match="seed must be one CPU int64"):  # not a float truncated to an int
        torch.ops.peftops.dropout(torch.randn(3, 4), 0.5, torch.tensor(7.9))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: x on the GPU, its scales on the CPU")
def test_multi_lora_scales_on_the_cpu_get_their_gradient_there():
    # scales may stay on the CPU for an x on the GPU: their gradient must come back there
    x = torch.randn(3, 8, device="cuda", requires_grad=True)
    a, b = torch.randn(2, 2, 8, device="cuda"), torch.randn(2, 5, 2, device="cuda")
    scales = torch.tensor([0.5, 2.0], requires_grad=True)
    index = torch.tensor([0, 1, -1])
    w = torch.randn(5, 8, device="cuda")
    ops.multi_lora_linear(x, w, None, a, b, scales, index).sum().backward()
    expected = torch.autograd.grad(reference.multi_lora_linear(x.detach().cpu(), w.cpu(), None, a.cpu(), b.cpu(),
                                                               scales, index).sum(), scales)[0]
    assert scales.grad.device.type == "cpu"
    torch.testing.assert_close(scales.grad, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="grad must have a's shape .* and device"):  # the CUDA kernel would read it
        torch.ops.peftops.bottleneck_activation_backward(torch.randn(3, 4), torch.randn(3, 4, device="cuda"), 0, 1.0)


def test_one_column_views_of_any_stride_take_dropout():
    # torch calls an [N, 1] view contiguous whatever its column stride; the row passes must take it as it is
    x = torch.randn(1, 5).t()  # [5, 1], strides (1, 5)
    assert x.is_contiguous() and x.stride(1) != 1
    seed = torch.tensor(3)
    dense = x.clone(memory_format=torch.contiguous_format)
    assert dense.stride(1) == 1
    torch.testing.assert_close(torch.ops.peftops.dropout(x, 0.5, seed), torch.ops.peftops.dropout(dense, 0.5, seed))
    w, a, b, m = torch.randn(4, 1), torch.randn(2, 1), torch.randn(4, 2), torch.rand(4) + 0.5
    for op, args in ((ops.dora_linear, (w, None, a, b, m, 0.5)), (ops.lora_linear, (w, None, a, b, 0.5))):
        torch.manual_seed(0)
        out = op(x, *args, dropout_p=0.5, training=True)
        torch.manual_seed(0)
        torch.testing.assert_close(out, op(dense, *args, dropout_p=0.5, training=True))


def test_a_scale_beyond_float32_is_named():
    # 1e39 is a finite double but no float: refused by name where the kernels compute in float32, taken in float64
    x, w, a, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
    calls = {"lora_linear": lambda x, w, a, b, s: ops.lora_linear(x, w, None, a, b, s),
             "adapter_bottleneck": lambda x, w, a, b, s: ops.adapter_bottleneck(x, a, None, a.T, None, scale=s),
             "prefix_attention": lambda x, w, a, b, s: ops.prefix_attention(*(x.view(1, 1, 3, 4),) * 3,
                                                                            *(a.view(1, 2, 4),) * 2, scale=s)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"{name}: scale must be finite"):
            call(x, w, a, b, 1e39)
        assert call(x.double(), w.double(), a.double(), b.double(), 1e39).dtype == torch.float64
