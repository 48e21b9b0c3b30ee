"""What autograd keeps for backward: the measure the tests, benches and demo report as saved-for-backward memory.

    with SavedTensors(exclude=model.parameters()) as saved:
        loss = model(ids).loss
    print(saved.nbytes)        # unique storages packed for backward, parameters left out (they are alive anyway)
"""
import torch


class SavedTensors:
    """Counts the bytes autograd packs for backward inside the block, once per storage, leaving out `exclude`."""

    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages = {}

    def _pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def saved_bytes(fn, exclude=()):
    """(fn(), the bytes autograd keeps for backward while fn runs)."""
    with SavedTensors(exclude) as saved:
        out = fn()
    return out, saved.nbytes
