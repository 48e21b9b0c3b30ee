"""Fine-tunes the pretrained SmolLM2-135M with LoRA on every linear layer of its blocks, with peftops and with peft,
side by side: same initial LoRA weights, same batches, same optimiser; prints loss, step time and memory.

    python demo/finetune_smollm2.py                 # both, CPU, 30 steps, batch 2 x 128 tokens
    python demo/finetune_smollm2.py --steps 60 --device cuda --dtype bf16

Each implementation trains in its own child process so that its peak memory (max RSS on CPU,
torch.cuda.max_memory_allocated on CUDA) is its own. With dropout on, the two draw different masks, so their
losses agree in trend, not digit for digit (`--dropout 0` makes them agree to float rounding)."""
import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's peftops (an in-place build works uninstalled)

from corpus import TEXT  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--impl", choices=["both", "peftops", "peft"], default="both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--result", help=argparse.SUPPRESS)  # a child writes its summary here
    return ap.parse_args()


def _cuda_available():
    import torch
    return torch.cuda.is_available()


def batches(tokenizer, args):
    """The same `steps` batches for every run: seeded random windows over the tokenized built-in text."""
    import torch
    ids = torch.tensor(tokenizer(TEXT)["input_ids"], dtype=torch.long)
    if len(ids) <= args.seq:
        raise SystemExit(f"--seq {args.seq} is longer than the built-in text ({len(ids)} tokens)")
    g = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, len(ids) - args.seq, (args.steps, args.batch), generator=g)
    return [torch.stack([ids[s:s + args.seq] for s in row.tolist()]) for row in starts]


def adapt(model, impl, args):
    """LoRA on TARGETS; returns [(module name, A [r, in], B [out, r])] to initialise identically."""
    import torch
    if impl == "peftops":
        import peftops
        peftops.patch(model, peftops.LoraConfig(r=args.rank, alpha=args.alpha, dropout=args.dropout,
                                                target_modules=TARGETS))
        layers = [(n, m.lora_A, m.lora_B) for n, m in model.named_modules() if isinstance(m, peftops.layers.LoraLinear)]
        return model, layers
    import peft
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                                       target_modules=TARGETS))
    inner = model.base_model.model
    layers = [(n, m.lora_A["default"].weight, m.lora_B["default"].weight) for n, m in inner.named_modules()
              if isinstance(m, peft.tuners.lora.layer.Linear)]
    assert all(isinstance(a, torch.nn.Parameter) for _, a, _ in layers)
    return model, layers


def init_lora(layers, seed):
    """peft's initialisation (A Kaiming-uniform, B zero), drawn per module name from one seeded generator, so
    both runs start from the same LoRA weights."""
    import torch
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, a, b in sorted(layers, key=lambda t: t[0]):
            bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) on [r, in]
            a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=g))
            b.zero_()


def max_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def train(impl, args):
    """One implementation's run (in a child process); returns its summary."""
    import warnings

    import torch
    import transformers
    from tqdm import tqdm

    import model_cache
    transformers.utils.logging.disable_progress_bar()  # one progress bar: the training's
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes from peft/transformers internals
    torch.manual_seed(args.seed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    model, tokenizer = model_cache.load(dtype=dtype, device=device)
    data = batches(tokenizer, args)
    model, layers = adapt(model, impl, args)
    init_lora(layers, args.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    rss_loaded = max_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses, saved = [], [], 0
    bar = tqdm(data, desc=f"{impl:>7}", unit="step", dynamic_ncols=True)
    for step, ids in enumerate(bar):
        ids = ids.to(device)
        t0 = time.perf_counter()
        if step == 0:  # saved-for-backward is the same every step: count it once, outside the timed steps
            from peftops.profiling import saved_bytes
            out, saved = saved_bytes(lambda: model(input_ids=ids, labels=ids), list(model.parameters()))
        else:
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(out.loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    trainable = sum(p.numel() for p in params)
    return dict(impl=impl, first_loss=losses[0], last_loss=losses[-1],
                median_step_s=statistics.median(times[1:] or times), saved_bytes=saved,
                max_rss=max_rss_bytes(), rss_over_loaded=max_rss_bytes() - rss_loaded,
                cuda_peak=torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
                trainable=trainable, layers=len(layers))


def child(impl, args):
    """Runs `impl` in a fresh process (its own max RSS) and reads back its summary."""
    result = os.path.join(HERE, ".cache", f"result-{impl}.json")
    argv = [a for a in sys.argv[1:]]
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--impl", impl, "--result", result]
    subprocess.run(cmd, check=True)
    with open(result) as f:
        return json.load(f)


def report(results, args):
    mib = lambda b: "-" if b is None else f"{b / 2**20:,.0f} MiB"  # noqa: E731
    rows = [("LoRA layers", lambda r: str(r["layers"])), ("trainable params", lambda r: f"{r['trainable']:,}"),
            ("loss: first -> last", lambda r: f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"),
            ("median step time", lambda r: f"{r['median_step_s'] * 1e3:,.0f} ms"),
            ("saved for backward / step", lambda r: mib(r["saved_bytes"])),
            ("process max RSS", lambda r: mib(r["max_rss"])),
            ("max RSS over loaded model", lambda r: mib(r["rss_over_loaded"]))]
    if args.device.startswith("cuda"):
        rows.append(("CUDA max allocated", lambda r: mib(r["cuda_peak"])))
    print(f"\nSmolLM2-135M, LoRA r={args.rank} alpha={args.alpha:g} dropout={args.dropout:g} on {', '.join(TARGETS)}; "
          f"{args.steps} steps of {args.batch}x{args.seq} tokens, {args.device} {args.dtype}")
    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  " + "".join(f"{r['impl']:>22}" for r in results))
    for label, get in rows:
        print(f"{label:<{width}}  " + "".join(f"{get(r):>22}" for r in results))
    if len(results) == 2:
        a, b = results
        print(f"\n{a['impl']} / {b['impl']}: step time {a['median_step_s'] / b['median_step_s']:.2f}x, "
              f"saved for backward {a['saved_bytes'] / max(b['saved_bytes'], 1):.2f}x")


def main():
    args = parse_args()
    if args.result:  # a child: train one implementation, write its summary
        summary = train(args.impl, args)
        with open(args.result, "w") as f:
            json.dump(summary, f)
        return
    import model_cache
    model_cache.ensure_cache()  # convert the GGUF once, before the children need it
    impls = ["peftops", "peft"] if args.impl == "both" else [args.impl]
    report([child(i, args) for i in impls], args)


if __name__ == "__main__":
    main()
