"""lora_linear, peft's LoRA layer and the frozen nn.Linear, forward+backward, timed round-robin in one process so
that every implementation sees the same machine state (pytest-benchmark runs cases one after another, and on
this CPU oneDNN/AMX warm-up and other jobs move whole cases). Prints medians and ratios to the frozen layer.

    python tools/lora_interleaved.py --dtype float32 --tokens 2048 --features 2048 --rounds 8
"""
import argparse
import os
import sys

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout, built in place
import peftops  # noqa: E402
from interleave import interleaved  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    dt, n, d, r = getattr(torch, args.dtype), args.tokens, args.features, args.rank
    torch.manual_seed(0)
    base = torch.nn.Linear(d, d, dtype=dt).requires_grad_(False)
    x = torch.randn(n, d, dtype=dt, requires_grad=True)
    grad = torch.randn(n, d, dtype=dt)
    a = (torch.randn(r, d) / d**0.5).to(dt).requires_grad_()
    b = (torch.randn(d, r) / r**0.5).to(dt).requires_grad_()

    def peft_layer(p):
        layer = PeftLoraLinear(base, "default", config=LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p), r=r,
                               lora_alpha=2 * r, lora_dropout=p)
        return layer.to(dt).train()

    peft0, peft1 = peft_layer(0.0), peft_layer(0.1)
    cases = {
        "frozen": lambda: base(x).backward(grad),
        "peftops p=0": lambda: peftops.ops.lora_linear(x, base.weight, base.bias, a, b, 2.0, 0.0).backward(grad),
        "peft p=0": lambda: peft0(x).backward(grad),
        "peftops p=0.1": lambda: peftops.ops.lora_linear(x, base.weight, base.bias, a, b, 2.0, 0.1).backward(grad),
        "peft p=0.1": lambda: peft1(x).backward(grad),
    }
    for f in cases.values():
        f()  # a second warm-up (oneDNN primitive creation, allocator); interleaved runs one more
    times = interleaved(cases, args.rounds)
    frozen = times["frozen"]
    print(f"{args.dtype} tokens={n} in=out={d} r={r} threads={torch.get_num_threads()}")
    for k, v in times.items():
        print(f"  {k:14s} {v * 1e3:8.1f} ms  {v / frozen:.3f}x frozen")


if __name__ == "__main__":
    main()
