"""bias_linear and bias_dropout_add forward+backward against their plain-PyTorch compositions (benches/bench_bitfit_ia3.py's
shapes: tokens 4096, 2048 wide, fp32), timed round-robin in one process.

    python tools/bitfit_interleaved.py --rounds 12
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benches")]  # this checkout (built in place) and the bench helpers
import peftops  # noqa: E402
from bench_bitfit_ia3 import DROPOUT, TOKENS, WIDTH  # noqa: E402
from interleave import interleaved  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    w = torch.randn(WIDTH, WIDTH) / WIDTH**0.5
    x, r = torch.randn(TOKENS, WIDTH, requires_grad=True), torch.randn(TOKENS, WIDTH, requires_grad=True)
    b, g = torch.zeros(WIDTH, requires_grad=True), torch.randn(TOKENS, WIDTH)

    def step(forward):
        def run():
            x.grad = r.grad = b.grad = None
            forward().backward(g)
        return run

    cases = {
        "bias_linear": {"peftops": step(lambda: peftops.ops.bias_linear(x, w, b)), "torch": step(lambda: F.linear(x, w, b))},
        "bias_dropout_add": {"peftops": step(lambda: peftops.ops.bias_dropout_add(x, b, r, DROPOUT)),
                             "torch": step(lambda: r + F.dropout(x + b, DROPOUT))},
    }
    print(f"fp32 tokens={TOKENS} width={WIDTH} threads={torch.get_num_threads()} rounds={args.rounds}")
    for name, steps in cases.items():
        m = interleaved(steps, args.rounds)
        print(f"  {name:17s} peftops {m['peftops'] * 1e3:7.1f} ms  torch {m['torch'] * 1e3:7.1f} ms  "
              f"ratio {m['peftops'] / m['torch']:.3f}")


if __name__ == "__main__":
    main()
