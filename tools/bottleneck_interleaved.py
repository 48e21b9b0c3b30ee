"""Bottleneck adapters on bench_bottleneck.py's small Llama: the fused op against the same placement with the adapter
in plain PyTorch (bench_bottleneck._plain), training steps timed round-robin in one process.

    python tools/bottleneck_interleaved.py --rounds 12
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benches")]  # this checkout (built in place) and the bench helpers
from bench_bottleneck import _model_step, small_llama_with_adapters  # noqa: E402
from interleave import interleaved  # noqa: E402


def step(placement, activation, impl):
    torch.manual_seed(0)
    model = small_llama_with_adapters(placement, activation, impl)
    ids = torch.randint(model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    return _model_step(model, ids)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    cases = {f"{p} {impl}": step(p, act, impl) for p, act in (("pfeiffer", "relu"), ("houlsby", "silu"))
             for impl in ("peftops", "torch")}
    times = interleaved(cases, args.rounds)
    for p in ("pfeiffer", "houlsby"):
        ours, plain = times[f"{p} peftops"], times[f"{p} torch"]
        print(f"  {p:9s} peftops {ours * 1e3:6.1f} ms, plain PyTorch {plain * 1e3:6.1f} ms, ratio {ours / plain:.3f}")


if __name__ == "__main__":
    main()
