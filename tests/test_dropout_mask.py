"""The counter-based dropout mask shared by every op: Philox KATs, C++ against the pure-Python Philox,
statistics, and CPU against CUDA."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import peftops  # noqa: F401  (loads the ops)
from peftops.ops import reference as ref


def test_philox_known_answers():
    # Random123's known-answer vectors for philox4x32-10.
    w = ref.philox4x32_10(np.array([0], dtype=np.uint64), 0, 0)
    assert [int(v[0]) for v in w] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    w = ref.philox4x32_10(np.array([0x85A308D3243F6A88], dtype=np.uint64), 0x0370734413198A2E, 0x299F31D0A4093822)
    assert [int(v[0]) for v in w] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("shape,p,seed,offset", [((7, 13), 0.1, 0, 0), ((3, 5, 11), 0.5, 2**62 + 12345, 0),
                                                 ((1,), 0.9, 7, 0), ((257, 33), 0.25, 99, 0), ((9, 301), 0.3, 5, 2**40 + 3)])
def test_kernel_mask_matches_python_philox(shape, p, seed, offset):
    # rows long enough for the vectorised generator (16 or 8 Philox blocks at a time) and its scalar tail
    got = torch.ops.peftops.dropout_keep_mask(list(shape), p, torch.tensor(seed), offset)
    assert torch.equal(got, ref.dropout_keep_mask(shape, p, seed, offset))


def test_avx2_path_gives_the_same_mask():
    # ATEN_CPU_CAPABILITY=avx2 turns the AVX-512 Philox off (as it does ATen's own kernels): the other path, same mask
    code = ("import torch, peftops; from peftops.ops import reference as ref; "
            "assert torch.equal(torch.ops.peftops.dropout_keep_mask([9, 301], 0.3, torch.tensor(5), 2**40 + 3), "
            "ref.dropout_keep_mask((9, 301), 0.3, 5, 2**40 + 3))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], env=env, cwd=root, check=True, timeout=300)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_mask_keeps_one_minus_p(p):
    mask = torch.ops.peftops.dropout_keep_mask([256, 1024], p, torch.tensor(1234))
    assert abs(mask.float().mean().item() - (1 - p)) < 0.01
    other = torch.ops.peftops.dropout_keep_mask([256, 1024], p, torch.tensor(1235))
    assert p == 0.0 or not torch.equal(mask, other)


def test_mask_rejects_bad_p():
    with pytest.raises(ValueError, match="p must be in"):
        torch.ops.peftops.dropout_keep_mask([4], 1.0, torch.tensor(0))


@pytest.mark.parametrize("shape", [(3, 0), (0, 5), (0,)])
def test_dropout_of_an_empty_input_is_empty(shape):
    x = torch.randn(shape)
    assert torch.ops.peftops.dropout(x, 0.5, torch.tensor(1)).shape == x.shape


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mask_equals_cpu_mask():
    seed = torch.tensor(987654321)
    cpu = torch.ops.peftops.dropout_keep_mask([333, 77], 0.3, seed)
    gpu = torch.ops.peftops.dropout_keep_mask([333, 77], 0.3, seed.cuda())
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_dropout_with_a_bad_seed_is_a_value_error():
    x = torch.randn(4, 8, device="cuda")
    for seed in (torch.tensor(7), torch.tensor(7.9, device="cuda")):  # on the CPU; not int64
        with pytest.raises(ValueError, match="seed must be one int64"):
            torch.ops.peftops.dropout(x, 0.5, seed)
