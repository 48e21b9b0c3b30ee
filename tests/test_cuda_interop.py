"""cupy arrays pass through the ops by DLPack (zero copy) with the same results as torch tensors.
Runs only on a CUDA machine with cupy (benches/gpu_check.sh); skipped elsewhere."""
import pytest
import torch

import peftops

try:
    import cupy
    HAVE_CUPY_GPU = bool(cupy.is_available())
except Exception:  # not installed, or no driver: cupy's calls raise then
    HAVE_CUPY_GPU = False

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (HAVE_CUPY_GPU and torch.cuda.is_available()), reason="needs cupy and a CUDA GPU"),
]


def _cupy_arrays(dtype, tokens=33, d_in=64, d_out=48, r=4):
    """x, weight, bias, lora_a, lora_b, grad_out as cupy arrays (cupy has float16 and float32, no bfloat16)."""
    rs = cupy.random.RandomState(0)
    shapes = [((tokens, d_in), 1.0), ((d_out, d_in), d_in**-0.5), ((d_out,), 1.0), ((r, d_in), d_in**-0.5),
              ((d_out, r), 1.0), ((tokens, d_out), 1.0)]
    return [(rs.standard_normal(shape, dtype=cupy.float32) * s).astype(dtype) for shape, s in shapes]


def _run(x, w, bias, a, b, gy, dropout):
    x, a, b = (t.detach().clone().requires_grad_() for t in (x, a, b))
    torch.manual_seed(1234)  # the same dropout mask in both runs
    y = peftops.ops.lora_linear(x, w, bias, a, b, 2.0, dropout, training=True)
    y.backward(gy)
    return y.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_cupy_dlpack_matches_torch(dtype, dropout):
    if "cuda" not in peftops.backends()["compiled"]:
        pytest.skip("peftops was built without CUDA kernels")
    arrays = _cupy_arrays(getattr(cupy, dtype))
    shared = [torch.from_dlpack(t) for t in arrays]  # zero copy: same memory as the cupy arrays
    assert shared[0].device.type == "cuda" and shared[0].data_ptr() == arrays[0].data.ptr
    # results go back to cupy by DLPack, and are compared as torch tensors again
    via_cupy = [torch.from_dlpack(cupy.from_dlpack(t)) for t in _run(*shared, dropout)]
    native = [torch.tensor(cupy.asnumpy(t), device="cuda") for t in arrays]  # torch's own allocations
    want = _run(*native, dropout)
    torch.cuda.synchronize()
    for got, ref, name in zip(via_cupy, want, ("y", "dx", "da", "db")):
        torch.testing.assert_close(got, ref, msg=lambda m, n=name: f"{n} differs between cupy and torch inputs: {m}")
