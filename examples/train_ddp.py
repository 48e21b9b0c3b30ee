"""LoRA fine-tuning of a Llama with peftops under torchrun: DDP (default) or FSDP2, optionally compiled per block
and with activation checkpointing. Synthetic tokens and a small random Llama, so it runs anywhere:

    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py                 # DDP, 2 processes
    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py --fsdp          # FSDP2
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 --rdzv-id job1 examples/train_ddp.py     # 2 machines (run on each)

Backend: nccl when CUDA is available (one GPU per process), else gloo on CPU. For a real model, replace
`build_model` with `AutoModelForCausalLM.from_pretrained(...)` and the synthetic batches with your data loader
(with a DistributedSampler): the peftops and wrapping lines stay as they are."""
import argparse
import os
import time

import torch
import torch.distributed as dist

import peftops

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard per decoder layer, then the root)")
    p.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) on each decoder layer")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of each decoder layer")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="global batch (split across processes)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--save", default=None, help="folder for the trained adapter (peft's format)")
    return p.parse_args()


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)  # every rank builds the same model (DDP also broadcasts rank 0's at wrapping)
    cfg = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max(args.seq, 64))
    model = LlamaForCausalLM(cfg)
    return peftops.patch(model, peftops.LoraConfig(r=8, alpha=16, dropout=args.dropout, target_modules=TARGETS))


def wrap(model, args, device):
    if args.checkpointing:  # before compile/wrapping: transformers sets it on the decoder layers
        # activation_checkpointing_enable is the name from transformers 5.2x on; the old one still works there.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    if args.compile:
        for layer in model.model.layers:
            layer.compile(fullgraph=True)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        # One unit per decoder layer, then the root: each layer's weights are gathered only while it runs. Frozen
        # base weights and LoRA factors share a unit; FSDP2 shards each parameter separately and gives gradients
        # (sharded, reduce-scattered) only to the LoRA factors.
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    # DDP builds gradient buckets only for parameters that require grad: frozen weights are never all-reduced.
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def save(model, args, rank):
    if args.fsdp:  # gather every sharded parameter (collective: all ranks take part), then save from rank 0
        from torch.distributed.fsdp import FSDPModule
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in units:
            m.unshard()
        if rank == 0:
            peftops.save_adapter(model, args.save)
        for m in units:
            m.reshard()
    elif rank == 0:
        peftops.save_adapter(model, args.save)
    dist.barrier()


def main():
    args = parse()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {world} processes")

    model = build_model(args).to(device).train()
    trainable, total = peftops.trainable_parameters(model)
    wrapped = wrap(model, args, device)
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(1000 + rank)  # each rank its own dropout masks (peftops draws seeds from this generator)
    data = torch.Generator().manual_seed(1)
    if rank == 0:
        mode = "FSDP2" if args.fsdp else "DDP"
        print(f"{mode} on {world} x {device.type}; trainable {trainable:,} of {total:,} parameters", flush=True)

    start = None
    for step in range(args.steps):
        if step == 1:
            start = time.perf_counter()  # step 0 pays for compilation and allocator warm-up
        ids = torch.randint(256, (args.batch, args.seq), generator=data).chunk(world)[rank].to(device)
        loss = wrapped(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
    if rank == 0 and args.steps > 1:
        print(f"{(args.steps - 1) / (time.perf_counter() - start):.2f} steps/s (global batch {args.batch})")
    if args.save:
        save(model, args, rank)
        if rank == 0:
            print(f"adapter saved to {args.save}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
