"""Shared helpers of the op tests: tolerances per dtype, fresh random operands, and saved-tensor accounting."""
import torch

# (rtol, atol) against the float64 reference computed from the same low-precision inputs.
TOL = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-10, 1e-10),
       torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


def assert_close(actual, expected, dtype, what):
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    rtol, atol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


class SavedTensors:
    """Counts the bytes autograd saves for backward, by storage, leaving out the given parameters."""

    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages = {}

    def __enter__(self):
        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.exclude:
                self.storages[ptr] = t.untyped_storage().nbytes()
            return t
        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self):
        return sum(self.storages.values())
