"""Shared helpers of the op tests: tolerances per dtype, fresh random operands, and saved-tensor accounting."""
import torch

from peftops.profiling import SavedTensors  # noqa: F401  (the op tests import it from here)

# (rtol, atol) against the float64 reference computed from the same low-precision inputs.
TOL = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-10, 1e-10),
       torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


def random_shapes(count, seed, draw):
    """`count` shapes from `draw(randint)` (randint(lo, hi) inclusive), with a fixed seed: random sizes that are the
    same in every run, so that a failure reproduces from its test id."""
    gen = torch.Generator().manual_seed(seed)
    return [draw(lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=gen))) for _ in range(count)]


def batch_dims(randint):
    """One to three leading dimensions of a random token batch."""
    return tuple(randint(1, 12) for _ in range(randint(1, 3)))


def assert_close(actual, expected, dtype, what):
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    rtol, atol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")
