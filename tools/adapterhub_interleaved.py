"""Bottleneck adapters on SmolLM2-135M (the demo's cache), peftops against AdapterHub (`adapters` 1.x, which pins
transformers 4.57) and the frozen model: forward+backward of a training step, timed round-robin in one process so that
every model sees the same machine state, plus saved-for-backward bytes. Prints medians and ratios.

    python tools/adapterhub_interleaved.py --rounds 6        # in a venv with transformers 4.57 and adapters 1.3
"""
import argparse
import os
import sys

import adapters
import torch
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benches")]  # this checkout (built in place) and the bench helpers
import peftops  # noqa: E402
from benchutil import saved_bytes  # noqa: E402
from interleave import interleaved  # noqa: E402

AH = {"pfeiffer": (adapters.SeqBnConfig, "relu"), "houlsby": (adapters.DoubleSeqBnConfig, "swish")}
OURS_ACT = {"relu": "relu", "swish": "silu"}


def build(impl, placement):
    model = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, "demo", ".cache", "smollm2-135m")).train()
    if impl == "frozen":  # something must need a gradient: the input embeddings (their backward runs everywhere)
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
        return model
    cls, act = AH[placement]
    if impl == "adapterhub":
        adapters.init(model)
        model.add_adapter("a", config=cls(reduction_factor=16, non_linearity=act))
        model.train_adapter("a")
        return model
    return peftops.patch(model, peftops.AdapterConfig(bottleneck=model.config.hidden_size // 16, placement=placement,
                                                      activation=OURS_ACT[act]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    ids = torch.randint(49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    cases = {"frozen": build("frozen", None)}
    for placement in AH:
        for impl in ("peftops", "adapterhub"):
            cases[f"{placement} {impl}"] = build(impl, placement)

    def forward(model):
        return model(input_ids=ids).logits.float().square().mean()

    def step(model):
        model.zero_grad(set_to_none=True)
        forward(model).backward()

    saved = {k: saved_bytes(lambda: forward(m), exclude=list(m.parameters()))[1] for k, m in cases.items()}
    times = interleaved({k: (lambda m=m: step(m)) for k, m in cases.items()}, args.rounds)
    frozen_t, frozen_s = times["frozen"], saved["frozen"]
    print(f"SmolLM2-135M fp32 batch={args.batch} seq={args.seq} rounds={args.rounds} threads={torch.get_num_threads()}")
    for k in cases:
        t = times[k]
        print(f"  {k:20s} {t * 1e3:8.0f} ms  {t / frozen_t:.3f}x frozen   saved {saved[k] / 2**20:7.1f} MiB "
              f"({(saved[k] - frozen_s) / 2**20:+.1f})")


if __name__ == "__main__":
    main()
