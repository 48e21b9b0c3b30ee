"""Bottleneck adapters on SmolLM2-135M (the demo's cache), peftops against AdapterHub (`adapters` 1.x, which pins
transformers 4.57) and the frozen model: a training step (forward, backward, AdamW), timed round-robin in one process
so that every model sees the same machine state, plus saved-for-backward bytes, and with `--peak` each model's peak
memory (the max RSS of a fresh process that loads only that model and runs three steps). Prints medians and ratios.

    python tools/adapterhub_interleaved.py --rounds 6        # in a venv with transformers 4.57 and adapters 1.3
    python tools/adapterhub_interleaved.py --placements pfeiffer --peak   # one placement: three models round-robin
"""
import argparse
import os
import sys

import adapters
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benches")]  # this checkout (built in place) and the bench helpers
import peftops  # noqa: E402
from benchutil import adapterhub_bottleneck, frozen_baseline, load_smollm2, saved_bytes, training_step  # noqa: E402
from interleave import interleaved, max_rss_mib, peak_rss_mib  # noqa: E402

ACTIVATION = {"pfeiffer": "relu", "houlsby": "silu"}  # AdapterHub's defaults for seq_bn and double_seq_bn


def build(impl, placement):
    model = load_smollm2().train()
    if impl == "frozen":
        return frozen_baseline(model)
    if impl == "adapterhub":
        return adapterhub_bottleneck(model, placement, ACTIVATION[placement], adapters)
    return peftops.patch(model, peftops.AdapterConfig(bottleneck=model.config.hidden_size // 16, placement=placement,
                                                      activation=ACTIVATION[placement]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--placements", nargs="+", choices=list(ACTIVATION), default=list(ACTIVATION))
    ap.add_argument("--peak", action="store_true", help="also each model's peak RSS, in a process of its own")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # the child of --peak: "frozen" or "<placement> <impl>"
    args = ap.parse_args()
    ids = torch.randint(49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    names = ["frozen"] + [f"{placement} {impl}" for placement in args.placements for impl in ("peftops", "adapterhub")]
    # first, while this process is small (see peak_rss_mib)
    argv = [a for a in sys.argv[1:] if a != "--peak"]
    peak = {k: peak_rss_mib(__file__, argv, k) for k in names} if args.peak and not args.only else {}

    def built(name):
        placement, _, impl = name.rpartition(" ")
        return build(impl or name, placement or None)

    def forward(model):
        return model(input_ids=ids).logits.float().square().mean()

    def stepper(model):
        return training_step(model, lambda: forward(model))

    if args.only:
        step = stepper(built(args.only))
        for _ in range(3):
            step()
        print(max_rss_mib())
        return
    cases = {k: built(k) for k in names}
    saved = {k: saved_bytes(lambda: forward(m), exclude=list(m.parameters()))[1] for k, m in cases.items()}
    times = interleaved({k: stepper(m) for k, m in cases.items()}, args.rounds)
    frozen_t, frozen_s = times["frozen"], saved["frozen"]
    print(f"SmolLM2-135M fp32 batch={args.batch} seq={args.seq} rounds={args.rounds} threads={torch.get_num_threads()}")
    for k in cases:
        t = times[k]
        print(f"  {k:20s} {t * 1e3:8.0f} ms  {t / frozen_t:.3f}x frozen   saved {saved[k] / 2**20:7.1f} MiB "
              f"({(saved[k] - frozen_s) / 2**20:+.1f})" + (f"   peak RSS {peak[k]:7.0f} MiB" if peak else ""))


if __name__ == "__main__":
    main()
