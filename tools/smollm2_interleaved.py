"""peftops against peft on SmolLM2-135M (the demo's cache) for one technique, timed round-robin in one process so that
every model sees the same machine state. For ia3, prefix and dora: a training step (forward, backward, AdamW) and
saved-for-backward bytes against the frozen model (which trains only the input embeddings, so its backward runs
through every layer); for multi: a mixed-adapter batch's forward (inference, `adapter_names=`), peft's against the
same peft model in backend mode. `--peak` adds each model's peak memory: the max RSS of a fresh process that loads
only that model and runs three steps.

    python tools/smollm2_interleaved.py ia3 --rounds 8
    python tools/smollm2_interleaved.py prefix --prefix 20 --rounds 6
    python tools/smollm2_interleaved.py prefix --prefix 128 --batch 8 --rounds 4
    python tools/smollm2_interleaved.py dora --rounds 4 --peak
    python tools/smollm2_interleaved.py multi --adapters 4 --rounds 6
"""
import argparse
import os
import sys

import peft
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benches")]  # this checkout (built in place) and the bench helpers
import peftops  # noqa: E402
from benchutil import frozen_baseline, load_smollm2, saved_bytes, training_step  # noqa: E402
from interleave import interleaved, max_rss_mib, peak_rss_mib  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # the demo's targets


def peft_multi(model, n):
    """A peft LoRA model with n adapters (random B, so each changes the output) on every projection."""
    g = torch.Generator().manual_seed(0)
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS)
    model = peft.get_peft_model(model, config, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return model.eval()


def build(impl, args):
    model = load_smollm2().train()
    if impl == "frozen":
        return frozen_baseline(model)
    if args.technique == "multi":
        model = peft_multi(model, args.adapters)
        return peftops.patch(model) if impl == "peftops" else model
    if args.technique == "ia3":
        if impl == "peftops":
            return peftops.patch(model, peftops.IA3Config())
        return peft.get_peft_model(model, peft.IA3Config(target_modules=None, feedforward_modules=None))
    if args.technique == "dora":
        if impl == "peftops":
            return peftops.patch(model, peftops.LoraConfig(r=16, alpha=32, use_dora=True, target_modules=PROJECTIONS))
        return peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, use_dora=True,
                                                          target_modules=PROJECTIONS))
    if impl == "peftops":
        return peftops.patch(model, peftops.PrefixConfig(args.prefix))
    return peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.prefix))


def stepper(model, args):
    """(one step, the loss of a forward for saved bytes or None)."""
    ids = torch.randint(49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    if args.technique == "multi":  # the rows take the adapters in turn
        names = [f"a{i % args.adapters}" for i in range(args.batch)]

        def forward():
            with torch.no_grad():
                model(input_ids=ids, adapter_names=names)
        return forward, None

    def loss():
        return model(input_ids=ids, labels=ids).loss
    return training_step(model, loss), loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("technique", choices=["ia3", "prefix", "dora", "multi"])
    ap.add_argument("--prefix", type=int, default=20)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--peak", action="store_true", help="also each model's peak RSS, in a process of its own")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # the child of --peak
    args = ap.parse_args()
    if args.only:
        step, _ = stepper(build(args.only, args), args)
        for _ in range(3):
            step()
        print(max_rss_mib())
        return
    impls = ("peftops", "peft") if args.technique == "multi" else ("frozen", "peftops", "peft")
    # first, while this process is small: Linux carries a process's max RSS over into the program it execs
    argv = [a for a in sys.argv[1:] if a != "--peak"]
    peak = {k: peak_rss_mib(__file__, argv, k) for k in impls} if args.peak else {}
    models = {impl: build(impl, args) for impl in impls}
    steps = {k: stepper(m, args) for k, m in models.items()}
    saved = {k: saved_bytes(loss, exclude=list(models[k].parameters()))[1] if loss else None
             for k, (_, loss) in steps.items()}
    med = interleaved({k: s for k, (s, _) in steps.items()}, args.rounds)
    what = {"prefix": f"prefix P={args.prefix}", "multi": f"mixed batch of {args.adapters} LoRA adapters, forward"}
    print(f"SmolLM2-135M {what.get(args.technique, args.technique)} fp32 batch={args.batch} seq={args.seq} "
          f"rounds={args.rounds} threads={torch.get_num_threads()}")
    for k in impls:
        line = f"  {k:8s} {med[k] * 1e3:8.0f} ms  {med[k] / med['peft']:.3f}x peft"
        if "frozen" in med:
            line += f"  {med[k] / med['frozen']:.3f}x frozen"
        if saved[k] is not None:
            line += f"   saved {saved[k] / 2**20:7.1f} MiB ({(saved[k] - saved['frozen']) / 2**20:+.1f} over frozen)"
        if peak:
            line += f"   peak RSS {peak[k]:7.0f} MiB"
        print(line)


if __name__ == "__main__":
    main()
