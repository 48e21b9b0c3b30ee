"""Helpers of the benches: saved-for-backward bytes and the extra_info every bench records
(tools/plot_benchmarks.py and tools/bench_table.py read it, so keep the keys stable)."""
import torch


def saved_bytes(fn, exclude=()):
    """Bytes that autograd keeps for backward while `fn()` runs its forward: unique storages, minus those of
    `exclude` (the parameters: they are alive anyway). Returns (fn's result, bytes)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in excluded:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def record(benchmark, *, family, impl, device, dtype, saved, **shape):
    """The extra_info every bench writes: what ran (family, impl, device, dtype, shape) and what it kept."""
    benchmark.extra_info.update(family=family, impl=impl, device=device, dtype=str(dtype).replace("torch.", ""),
                                saved_bytes=int(saved), **shape)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()
