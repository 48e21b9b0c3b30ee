"""multi_lora_linear against peft's mixed-batch forward (adapter_names=) and one lora_linear over the same tokens, at
benches/bench_multi_dora.py's shapes (tokens 2048, 2048x2048, r=16, inference), timed round-robin in one process.

    python tools/multi_lora_interleaved.py --rounds 10
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benches")]  # this checkout (built in place) and the bench's setup
import bench_multi_dora as bench  # noqa: E402
from interleave import interleaved  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    args = ap.parse_args()
    x = torch.randn(bench.ROWS, bench.ROW_TOKENS, bench.FEATURES)
    forwards = {f"{impl} n={n}": bench._multi_forward(impl, n) for n in args.adapters for impl in ("peftops", "peft")}
    forwards["lora_linear"] = bench._multi_forward("lora_linear", 1)
    with torch.no_grad():
        times = interleaved({k: (lambda f=f: f(x)) for k, f in forwards.items()}, args.rounds)
    floor = times["lora_linear"]
    print(f"tokens={bench.ROWS * bench.ROW_TOKENS} in=out={bench.FEATURES} r={bench.RANK} "
          f"threads={torch.get_num_threads()}")
    for k, v in times.items():
        n = k.split("n=")[-1]
        vs_peft = f"  {v / times[f'peft n={n}']:.3f}x peft" if k.startswith("peftops") else ""
        print(f"  {k:12s} {v * 1e3:7.1f} ms  {v / floor:.3f}x lora_linear{vs_peft}")


if __name__ == "__main__":
    main()
