"""peftops against peft on SmolLM2-135M (the demo's cache) for one technique: a training step (forward, backward,
AdamW), timed round-robin in one process so that every model sees the same machine state, and saved-for-backward
bytes against the frozen model (which trains only the input embeddings, so its backward runs through every layer).

    python tools/smollm2_interleaved.py ia3 --rounds 8
    python tools/smollm2_interleaved.py prefix --prefix 20 --rounds 6
    python tools/smollm2_interleaved.py prefix --prefix 128 --batch 8 --rounds 4
"""
import argparse
import os
import sys

import peft
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benches")]  # this checkout (built in place) and the bench helpers
import peftops  # noqa: E402
from benchutil import frozen_baseline, load_smollm2, saved_bytes  # noqa: E402
from interleave import interleaved  # noqa: E402


def build(impl, args):
    model = load_smollm2().train()
    if impl == "frozen":
        return frozen_baseline(model)
    if args.technique == "ia3":
        if impl == "peftops":
            return peftops.patch(model, peftops.IA3Config())
        return peft.get_peft_model(model, peft.IA3Config(target_modules=None, feedforward_modules=None))
    if impl == "peftops":
        return peftops.patch(model, peftops.PrefixConfig(args.prefix))
    return peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.prefix))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("technique", choices=["ia3", "prefix"])
    ap.add_argument("--prefix", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    ids = torch.randint(49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    models = {impl: build(impl, args) for impl in ("frozen", "peftops", "peft")}
    optims = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}

    def loss(model):
        return model(input_ids=ids, labels=ids).loss

    def step(k):
        optims[k].zero_grad(set_to_none=True)
        loss(models[k]).backward()
        optims[k].step()

    saved = {k: saved_bytes(lambda: loss(m), exclude=list(m.parameters()))[1] for k, m in models.items()}
    med = interleaved({k: (lambda k=k: step(k)) for k in models}, args.rounds)
    what = args.technique + (f" P={args.prefix}" if args.technique == "prefix" else "")
    print(f"SmolLM2-135M {what} fp32 batch={args.batch} seq={args.seq} rounds={args.rounds} "
          f"threads={torch.get_num_threads()}")
    for k in models:
        print(f"  {k:8s} {med[k] * 1e3:8.0f} ms  {med[k] / med['peft']:.3f}x peft  {med[k] / med['frozen']:.3f}x "
              f"frozen   saved {saved[k] / 2**20:7.1f} MiB ({(saved[k] - saved['frozen']) / 2**20:+.1f} over frozen)")


if __name__ == "__main__":
    main()
