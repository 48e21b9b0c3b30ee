"""Shared helpers of the op tests: tolerances per dtype, fresh random operands, and saved-tensor accounting."""
import torch

from peftops.profiling import SavedTensors  # noqa: F401  (the op tests import it from here)

# (rtol, atol) against the float64 reference computed from the same low-precision inputs.
TOL = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-10, 1e-10),
       torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


def assert_close(actual, expected, dtype, what):
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    rtol, atol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")
