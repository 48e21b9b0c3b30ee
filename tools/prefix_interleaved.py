"""prefix_attention and prefix tuning against their peers, timed round-robin in one process (pytest-benchmark runs
cases one after another, which on this CPU moves whole cases by 10% and more):
- op level: forward+backward against SDPA over the materialised concatenation (benches/bench_prefix.py's shapes);
- model level: a training step (AdamW) of bench_prefix.py's small Llama with PrefixConfig against peft's prefix tuning.

    python tools/prefix_interleaved.py --rounds 8
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benches")]  # this checkout (built in place) and the bench helpers
from bench_prefix import B, D, H, L, _models, materialised, ours  # noqa: E402
from benchutil import training_step  # noqa: E402
from interleave import interleaved  # noqa: E402


def op_steps(prefix):
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    pk, pv = (torch.randn(H, prefix, D, requires_grad=True) for _ in range(2))
    grad = torch.randn(B, H, L, D)
    return {name: (lambda fn=fn: fn(q, k, v, pk, pv).backward(grad))
            for name, fn in (("peftops", ours), ("sdpa_concat", materialised))}


def model_steps(prefix, batch=4, seq=256):
    ids = torch.randint(256, (batch, seq), generator=torch.Generator().manual_seed(0))
    steps = {}
    for impl in ("peftops", "peft"):
        model = _models(impl, prefix).train()
        steps[impl] = training_step(model, lambda model=model: model(input_ids=ids, labels=ids).loss, lr=1e-3)
    return steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    print(f"threads={torch.get_num_threads()} rounds={args.rounds}, fp32; ratio = peftops / peer")
    for prefix in (20, 128):
        m = interleaved(op_steps(prefix), args.rounds)
        print(f"  prefix_attention B{B} H{H} L{L} D{D} causal P={prefix}: peftops {m['peftops'] * 1e3:.1f} ms, "
              f"SDPA over the concatenation {m['sdpa_concat'] * 1e3:.1f} ms, ratio {m['peftops'] / m['sdpa_concat']:.3f}")
    for prefix in (20, 128):
        m = interleaved(model_steps(prefix), args.rounds)
        print(f"  prefix tuning step, small Llama b4 s256 P={prefix}: peftops {m['peftops'] * 1e3:.1f} ms, "
              f"peft {m['peft'] * 1e3:.1f} ms, ratio {m['peftops'] / m['peft']:.3f}")


if __name__ == "__main__":
    main()
