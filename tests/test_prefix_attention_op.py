"""prefix_attention against SDPA over the explicitly concatenated, batch-expanded prefix: output and all five
gradients, random sizes, left/right padding, causal and not, GQA, P = 1, L = 1 (decoding), bf16 loosely."""
import pytest
import torch

import peftops
from peftops.ops import reference as ref
from op_helpers import SavedTensors, assert_close, random_shapes

DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float32, torch.bfloat16, torch.float16]}
CASES = [  # B, Hq, Hkv, L, S, P, D
    (2, 4, 2, 5, 7, 3, 16), (3, 2, 2, 1, 9, 1, 8), (2, 6, 3, 8, 8, 20, 32), (1, 4, 1, 13, 17, 5, 64),
    (4, 2, 2, 3, 3, 128, 8), (2, 2, 1, 6, 9, 3, 200), (1, 2, 1, 5, 6, 4, 256),  # D past 128: CUDA's widest bucket
    *random_shapes(4, 2, lambda ri: (lambda hkv: (ri(1, 3), hkv * ri(1, 3), hkv, ri(1, 24), ri(1, 24), ri(1, 48),
                                                  ri(1, 256)))(ri(1, 2))),
]


def padding(kind, B, S, gen):
    if kind is None:
        return None
    lengths = torch.randint(1, S + 1, (B,), generator=gen)
    pos = torch.arange(S)
    keep = pos[None, :] < lengths[:, None]  # right padding
    return keep.flip(1) if kind == "left" else keep


def operands(device, dtype, case, per_row=False, gen=None):
    B, Hq, Hkv, L, S, P, D = case
    r = lambda *s: torch.randn(*s, generator=gen).to(device, dtype).requires_grad_()  # noqa: E731
    prefix_shape = (B, Hkv, P, D) if per_row else (Hkv, P, D)
    return r(B, Hq, L, D), r(B, Hkv, S, D), r(B, Hkv, S, D), r(*prefix_shape), r(*prefix_shape)


def compare(args, dtype, mask, causal, scale=None):
    y = peftops.ops.prefix_attention(*args, attn_mask=mask, is_causal=causal, scale=scale)
    dbl = [t.detach().double().requires_grad_() for t in args]
    y_ref = ref.prefix_attention(*dbl, mask, causal, scale)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, "out")
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, args, g)
    grads_ref = torch.autograd.grad(y_ref, dbl, g.double())
    for name, a, b in zip(["q", "k", "v", "prefix_k", "prefix_v"], grads, grads_ref):
        assert a.shape == b.shape
        assert_close(a, b, dtype, f"grad {name}")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pad", [None, "left", "right"])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_sdpa_over_the_concatenation(device, case, pad, causal):
    for dtype in DTYPES[device]:
        gen = torch.Generator().manual_seed(sum(case) + hash((pad, causal)) % 1000)
        args = operands(device, dtype, case, gen=gen)
        mask = padding(pad, case[0], case[4], gen)
        compare(args, dtype, None if mask is None else mask.to(device), causal)


@pytest.mark.parametrize("path", ["cpu_kernel", "dense", "dense_blocks"])
@pytest.mark.parametrize("case", CASES)
def test_cpu_paths_on_attentions_transposed_views(monkeypatch, path, case):
    """The CPU runs its blocked kernel; PEFTOPS_PREFIX_DENSE=1 runs the code that CUDA runs (its sequence segment in
    blocks of query rows: one block at these sizes, blocks of 3 rows with PEFTOPS_PREFIX_BLOCK_ROWS=3). All match
    the reference on the transposed views attention hands over, and write SDPA's output layout."""
    if path != "cpu_kernel":
        monkeypatch.setenv("PEFTOPS_PREFIX_DENSE", "1")
    if path == "dense_blocks":
        monkeypatch.setenv("PEFTOPS_PREFIX_BLOCK_ROWS", "3")
    B, Hq, Hkv, L, S, P, D = case
    gen = torch.Generator().manual_seed(sum(case))
    for dtype, pad, causal in ((torch.float32, "left", True), (torch.float32, None, False),
                               (torch.bfloat16, "right", True)):
        q, k, v = (torch.randn(B, n, H, D, generator=gen).to(dtype).requires_grad_().transpose(1, 2)
                   for n, H in ((L, Hq), (S, Hkv), (S, Hkv)))
        pk, pv = (torch.randn(Hkv, P, D, generator=gen).to(dtype).requires_grad_() for _ in range(2))
        mask = padding(pad, B, S, gen)
        compare((q, k, v, pk, pv), dtype, mask, causal)
        y = peftops.ops.prefix_attention(q, k, v, pk, pv, attn_mask=mask, is_causal=causal)
        assert y.transpose(1, 2).is_contiguous()  # [B, L, Hq, D] in memory: attention's reshape back is free


@pytest.mark.parametrize("case,pad", [
    ((2, 4, 2, 300, 300, 7, 16), "left"),   # three blocks of query rows (128 each), causal cuts at each
    ((1, 2, 1, 130, 390, 3, 8), "right"),   # decoding a chunk against a longer cache: causal aligned to the end
    ((2, 2, 2, 257, 200, 5, 8), None),      # more queries than keys: the first rows see only the prefix
    ((1, 3, 3, 129, 129, 1, 72), "left"),   # a block of one row, a head dim past the vector width
])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("blocks", ["kernel", "dense_blocks"])
def test_many_blocks_of_query_rows(monkeypatch, device, case, pad, causal, blocks):
    # the CPU kernel works in blocks of 128 query rows and cuts a causal block's keys at its last row's; the dense
    # path (CUDA's) does the same in blocks of 100 rows here
    if blocks == "dense_blocks":
        monkeypatch.setenv("PEFTOPS_PREFIX_DENSE", "1")
        monkeypatch.setenv("PEFTOPS_PREFIX_BLOCK_ROWS", "100")
    gen = torch.Generator().manual_seed(sum(case) + causal)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        args = operands(device, dtype, case, per_row=case[0] == 1, gen=gen)
        mask = padding(pad, case[0], case[4], gen)
        compare(args, dtype, None if mask is None else mask.to(device), causal)


@pytest.mark.parametrize("strided", ["prefix", "keys"])
def test_head_dims_that_are_not_contiguous(device, strided):
    # any strides are taken: a prefix or k/v whose head dim is not the last in memory (each key tensor read through
    # its own strides; CUDA's kernels stage the prefix and the row's keys into one tile)
    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, L, S, P, D = 2, 4, 2, 5, 7, 3, 16
    t = lambda *shape: torch.randn(*shape, generator=gen).to(device).transpose(-1, -2).requires_grad_()  # noqa: E731
    q = torch.randn(B, Hq, L, D, generator=gen).to(device).requires_grad_()
    k, v = (t(B, Hkv, D, S) if strided == "keys" else
            torch.randn(B, Hkv, S, D, generator=gen).to(device).requires_grad_() for _ in range(2))
    pk, pv = (t(Hkv, D, P) if strided == "prefix" else
              torch.randn(Hkv, P, D, generator=gen).to(device).requires_grad_() for _ in range(2))
    compare((q, k, v, pk, pv), torch.float32, padding("left", B, S, gen).to(device), True)


@pytest.mark.parametrize("causal", [False, True])
def test_per_row_prefix_and_custom_scale(device, causal):
    gen = torch.Generator().manual_seed(7)
    case = (3, 4, 2, 6, 5, 4, 16)
    args = operands(device, torch.float32, case, per_row=True, gen=gen)
    compare(args, torch.float32, padding("left", 3, 5, gen).to(device), causal, scale=0.3)


def test_rows_with_no_visible_sequence_key(device):
    # left padding and causal: the first queries of a short row see only the prefix
    gen = torch.Generator().manual_seed(3)
    args = operands(device, torch.float32, (2, 2, 2, 6, 6, 2, 8), gen=gen)
    mask = torch.tensor([[False] * 4 + [True] * 2, [True] * 6], device=device)
    compare(args, torch.float32, mask, causal=True)
    # and a row whose sequence keys are all masked
    mask = torch.tensor([[False] * 6, [True] * 6], device=device)
    compare(args, torch.float32, mask, causal=False)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    args = operands("cpu", torch.float64, (2, 4, 2, 3, 4, 2, 4), gen=gen)
    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])
    assert torch.autograd.gradcheck(
        lambda *a: peftops.ops.prefix_attention(*a, attn_mask=mask, is_causal=True), args)


@pytest.mark.parametrize("path", ["kernel", "dense", "dense_blocks"])
@pytest.mark.parametrize("case", CASES[:4])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_dropout_drops_the_reference_mask(monkeypatch, device, path, case, causal):
    # the probabilities [B, Hq, L, P + S] go through the shared Philox mask (KERNELS.md) on every path, forward and
    # every gradient: the same elements as the reference's mask from the op's own seed draw
    if path != "kernel":
        monkeypatch.setenv("PEFTOPS_PREFIX_DENSE", "1")
    if path == "dense_blocks":
        monkeypatch.setenv("PEFTOPS_PREFIX_BLOCK_ROWS", "2")
    for dtype in DTYPES[device]:
        gen = torch.Generator().manual_seed(sum(case) + causal)
        args = operands(device, dtype, case, gen=gen)
        mask = padding("left", case[0], case[4], gen).to(device)
        torch.manual_seed(7)
        y = peftops.ops.prefix_attention(*args, attn_mask=mask, is_causal=causal, dropout_p=0.25)
        torch.manual_seed(7)
        seed = torch.randint(2**63 - 1, (), device=device)  # the op's draw
        dbl = [t.detach().double().requires_grad_() for t in args]
        y_ref = ref.prefix_attention(*dbl, mask, causal, None, 0.25, seed)
        assert_close(y, y_ref, dtype, "out")
        g = torch.randn_like(y)
        for name, a, b in zip(["q", "k", "v", "prefix_k", "prefix_v"], torch.autograd.grad(y, args, g),
                              torch.autograd.grad(y_ref, dbl, g.double())):
            assert_close(a, b, dtype, f"grad {name}")
        undropped = peftops.ops.prefix_attention(*args, attn_mask=mask, is_causal=causal)
        assert not torch.allclose(y, undropped)


def test_attention_dropout_is_reproducible_off_in_eval_and_keeps_only_a_seed():
    gen = torch.Generator().manual_seed(4)
    args = operands("cpu", torch.float32, (2, 4, 2, 6, 6, 3, 8), gen=gen)
    plain = peftops.ops.prefix_attention(*args, is_causal=True)
    assert torch.equal(peftops.ops.prefix_attention(*args, is_causal=True, dropout_p=0.5, training=False), plain)
    assert torch.equal(peftops.ops.prefix_attention(*args, is_causal=True, dropout_p=1.0, training=False), plain)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        with SavedTensors() as saved:
            runs.append(peftops.ops.prefix_attention(*args, is_causal=True, dropout_p=0.5))
        runs.append(saved.nbytes)
    with SavedTensors() as saved_plain:
        peftops.ops.prefix_attention(*args, is_causal=True)
    assert torch.equal(runs[0], runs[2]) and not torch.equal(runs[0], plain)
    assert runs[1] == runs[3] == saved_plain.nbytes + 8  # the seed; never a mask or the probabilities
    with pytest.raises(ValueError, match="dropout_p must be in"):
        peftops.ops.prefix_attention(*args, dropout_p=1.0)


def test_gradcheck_float64_with_dropout():
    gen = torch.Generator().manual_seed(1)
    args = operands("cpu", torch.float64, (2, 4, 2, 3, 4, 2, 4), gen=gen)
    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])

    def dropped(*a):
        torch.manual_seed(11)  # one mask for every evaluation
        return peftops.ops.prefix_attention(*a, attn_mask=mask, is_causal=True, dropout_p=0.4)
    assert torch.autograd.gradcheck(dropped, args)


def test_no_batch_fold_prefix_copy_in_saved_tensors():
    """Saved for backward: q, k, v and the prefix themselves, the output and the LSE; nothing of size B * P."""
    saved = {}
    for B in (2, 8):
        args = operands("cpu", torch.float32, (B, 2, 2, 16, 16, 64, 8))
        with SavedTensors() as s:
            peftops.ops.prefix_attention(*args, is_causal=True)
        q, k, v, pk, pv = args
        expected = sum(t.untyped_storage().nbytes() for t in args) + q.numel() * 4 + B * 2 * 16 * 4  # + out + lse
        assert s.nbytes == expected
        saved[B] = s.nbytes - 2 * pk.untyped_storage().nbytes()
    assert saved[8] == 4 * saved[2]  # everything but the prefix scales with B; the prefix is saved once


def test_opcheck_and_compile(device):
    gen = torch.Generator().manual_seed(2)
    q, k, v, pk, pv = operands(device, torch.float32, (2, 4, 2, 3, 5, 2, 8), gen=gen)
    mask = torch.tensor([[True] * 5, [False, True, True, True, True]], device=device)
    seed = torch.tensor(123, device=device)
    forward = torch.ops.peftops.prefix_attention_forward.default
    torch.library.opcheck(forward, (q, k, v, pk, pv, mask, True, None, 0.0, None))
    torch.library.opcheck(forward, (q, k, v, pk, pv, None, False, 0.5, 0.0, None))
    torch.library.opcheck(forward, (q, k, v, pk, pv, mask, True, None, 0.3, seed))
    torch._dynamo.reset()
    f = lambda q, pk: peftops.ops.prefix_attention(q, k, v, pk, pv, attn_mask=mask, is_causal=True).square().sum()  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(torch.autograd.grad(f(q, pk), (q, pk)), torch.autograd.grad(compiled(q, pk), (q, pk))):
        assert_close(b, a, torch.float32, "compiled grad")


@pytest.mark.parametrize("change,match,exc", [
    (dict(q=torch.randn(2, 3, 4, 8)), "multiple of k's 2", ValueError),
    (dict(q=torch.randn(2, 4, 8)), "q must be", ValueError),
    (dict(k=torch.randn(2, 2, 5, 4), v=torch.randn(2, 2, 5, 4)), "k must be", ValueError),
    (dict(v=torch.randn(2, 2, 6, 8)), "v must have k's shape", ValueError),
    (dict(prefix_k=torch.randn(3, 2, 8), prefix_v=torch.randn(3, 2, 8)), "prefix_k must be", ValueError),
    (dict(prefix_v=torch.randn(2, 3, 8)), "prefix_v must have", ValueError),
    (dict(attn_mask=torch.ones(2, 4, dtype=torch.bool)), "attn_mask must be", ValueError),
    (dict(attn_mask=torch.ones(2, 5)), "attn_mask must be bool", TypeError),
    (dict(prefix_v=torch.randn(2, 2, 8, dtype=torch.float64)), "prefix_v has dtype", TypeError),
])
def test_bad_input_names_the_argument(change, match, exc):
    args = dict(q=torch.randn(2, 4, 3, 8), k=torch.randn(2, 2, 5, 8), v=torch.randn(2, 2, 5, 8),
                prefix_k=torch.randn(2, 2, 8), prefix_v=torch.randn(2, 2, 8), attn_mask=None)
    args.update(change)
    mask = args.pop("attn_mask")
    with pytest.raises(exc, match=match):
        peftops.ops.prefix_attention(*args.values(), attn_mask=mask)


def test_inference_mode_with_worker_threads():
    # The CPU kernel's GEMMs run on ATen's worker threads, which must see the caller's inference mode (writing into
    # an output made under it from a thread outside it is refused) and its below-autograd dispatch.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(9)
        args = [t.detach() for t in operands("cpu", torch.float32, (4, 2, 2, 9, 9, 3, 8), gen=gen)]
        expected = peftops.ops.prefix_attention(*args, is_causal=True)
        with torch.inference_mode():
            out = peftops.ops.prefix_attention(*args, is_causal=True)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)
