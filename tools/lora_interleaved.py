"""lora_linear, peft's LoRA layer and the frozen nn.Linear, forward+backward, timed round-robin in one process so
that every implementation sees the same machine state (pytest-benchmark runs cases one after another, and on
this CPU oneDNN/AMX warm-up and other jobs move whole cases). Prints medians and ratios to the frozen layer;
`--json PATH` also adds the cases, with what each keeps for backward, to a file in pytest-benchmark's layout (created,
or appended to), which tools/plot_benchmarks.py draws:

    python tools/lora_interleaved.py --dtype float32 --tokens 2048 --features 2048 --rounds 8
    python tools/lora_interleaved.py --dtype bfloat16 --rounds 12 --json bench-results/lora-interleaved.json
"""
import argparse
import json
import os
import platform
import sys

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout, built in place
import peftops  # noqa: E402
from interleave import interleaved  # noqa: E402
from peftops.profiling import saved_bytes  # noqa: E402


def write_json(path, args, times, saved):
    """Adds the cases to `path` as pytest-benchmark records (medians only) with the extra_info the benches write."""
    data = {"machine_info": {"cpu": {"brand_raw": platform.processor() or platform.machine(), "count": os.cpu_count()},
                             "python_version": platform.python_version()}, "benchmarks": []}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    for case, median in times.items():
        impl, _, p = case.partition(" p=")
        data["benchmarks"].append({
            "name": f"{case} {args.dtype} t{args.tokens} d{args.features} (interleaved)", "stats": {"median": median},
            "extra_info": dict(family="lora_linear", impl=impl, device="cpu", dtype=args.dtype,
                               saved_bytes=saved[case], tokens=args.tokens, in_features=args.features,
                               out_features=args.features, r=args.rank, dropout=float(p) if p else None)})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--json", help="add the results to this pytest-benchmark-style file")
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
    forwards = {
        "frozen": lambda: base(x),
        "peftops p=0": lambda: peftops.ops.lora_linear(x, base.weight, base.bias, a, b, 2.0, 0.0),
        "peft p=0": lambda: peft0(x),
        "peftops p=0.1": lambda: peftops.ops.lora_linear(x, base.weight, base.bias, a, b, 2.0, 0.1),
        "peft p=0.1": lambda: peft1(x),
    }
    cases = {k: (lambda f=f: f().backward(grad)) for k, f in forwards.items()}
    for f in cases.values():
        f()  # a second warm-up (oneDNN primitive creation, allocator); interleaved runs one more
    times = interleaved(cases, args.rounds)
    if args.json:
        weights = [a, b, base.weight, base.bias, *peft0.parameters(), *peft1.parameters()]
        write_json(args.json, args, times, {k: saved_bytes(f, exclude=weights)[1] for k, f in forwards.items()})
    frozen = times["frozen"]
    print(f"{args.dtype} tokens={n} in=out={d} r={r} threads={torch.get_num_threads()}")
    for k, v in times.items():
        print(f"  {k:14s} {v * 1e3:8.1f} ms  {v / frozen:.3f}x frozen")


if __name__ == "__main__":
    main()
