"""bias_linear and bias_dropout_add forward+backward against their plain-PyTorch compositions (benches/bench_bitfit_ia3.py's
shapes: tokens 4096, 2048 wide, fp32), and a BitFit training step (forward, backward) of a GPT-2 (4 layers, 768 wide,
dropout 0.1, batch 4, seq 256, random weights) against plain bias-only training: timed round-robin in one process,
with saved-for-backward bytes for the GPT-2 step.

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
from peftops.profiling import saved_bytes  # noqa: E402


def gpt2_steps():
    """{impl: step} and {impl: saved bytes} of BitFit on a GPT-2 against plain bias-only training, same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_embd=768, n_layer=4, n_head=12, vocab_size=8192, resid_pdrop=DROPOUT, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    ids = torch.randint(8192, (4, 256), generator=torch.Generator().manual_seed(0))
    base = GPT2LMHeadModel(config).train()
    plain = GPT2LMHeadModel(config).train()
    plain.load_state_dict(base.state_dict())
    for n, p in plain.named_parameters():
        p.requires_grad_(n.endswith("bias"))
    models = {"peftops": peftops.patch(base, peftops.BitFitConfig()), "torch": plain}

    def loss(model):
        return model(input_ids=ids).logits.float().square().mean()

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            loss(model).backward()
        return run

    saved = {k: saved_bytes(lambda: loss(m), m.parameters())[1] for k, m in models.items()}
    return {k: step(m) for k, m in models.items()}, saved


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
    steps, saved = gpt2_steps()
    m = interleaved(steps, args.rounds)
    print(f"  GPT-2 BitFit step peftops {m['peftops'] * 1e3:7.1f} ms  torch {m['torch'] * 1e3:7.1f} ms  "
          f"ratio {m['peftops'] / m['torch']:.3f}; saved {saved['peftops'] / 2**20:.1f} vs {saved['torch'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
