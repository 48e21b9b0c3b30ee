"""Helpers of the benches: saved-for-backward bytes and the extra_info every bench records
(tools/plot_benchmarks.py and tools/bench_table.py read it, so keep the keys stable)."""
import torch

from peftops.profiling import saved_bytes  # noqa: F401  (the benches import it from here)


def record(benchmark, *, family, impl, device, dtype, saved, **shape):
    """The extra_info every bench writes: what ran (family, impl, device, dtype, shape) and what it kept."""
    benchmark.extra_info.update(family=family, impl=impl, device=device, dtype=str(dtype).replace("torch.", ""),
                                saved_bytes=int(saved), **shape)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()
