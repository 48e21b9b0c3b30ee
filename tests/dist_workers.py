"""What each spawned rank runs in test_distributed.py (module level, so that spawn can import it). Every rank
trains on its slice of the global batch, seeded SEED + rank (see lora_training.py), and saves what the test
checks to `out/<kind>-rank<r>.pt`, keyed by case `(technique, dropout)`: every case runs in the same spawned
ranks, one after the other (one spawn per kind). The assertions run in the test process, with the one-process
reference."""
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lora_training import SEED, batches, full_state, lm_loss, optimizer, patched_llama


def _train(model, params, rank, world):
    """The usual loop; returns, after the last backward, {name: elements of its gradient held on this rank} for
    the parameters that have a gradient (FSDP2's are DTensor shards)."""
    opt = optimizer(model)
    torch.manual_seed(SEED + rank)
    for ids in batches():
        lm_loss(model, ids.chunk(world)[rank]).backward()
        grads = {n: (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).numel()
                 for n, p in params if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
    return grads


def ddp(rank, world, out, cases):
    result = {}
    for technique, dropout in cases:
        model = patched_llama(dropout, technique)
        ddp_model = DDP(model)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        # What the reducer all-reduces: the parameters it was built over, and the bytes of its buckets.
        reducer_params, _ = ddp_model._build_params_for_reducer()
        logging = ddp_model._get_ddp_logging_data()
        grads = _train(ddp_model, list(model.named_parameters()), rank, world)
        result[technique, dropout] = dict(state=full_state(model), trainable=trainable, with_grad=sorted(grads),
                               reducer_numel=sum(p.numel() for p in reducer_params),
                               reducer_count=len(reducer_params),
                               bucket_bytes=logging.get("total_parameter_size_bytes"))
    torch.save(result, os.path.join(out, f"ddp-rank{rank}.pt"))


def _fully_shard(model, **kwargs):
    from torch.distributed.fsdp import fully_shard
    # One FSDP unit per decoder layer, then the root (embeddings, final norm, lm_head). Frozen and LoRA weights
    # share a unit: FSDP2 shards each parameter on its own, and gives gradients only to requires_grad ones.
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def fsdp2(rank, world, out, cases):
    from torch.distributed.fsdp import MixedPrecisionPolicy
    result = {}
    for technique, dropout in cases:
        model = patched_llama(dropout, technique)
        _fully_shard(model)
        params = list(model.named_parameters())
        grads = _train(model, params, rank, world)
        result[technique, dropout] = dict(state=full_state(model), with_grad=sorted(grads), local_numel=grads,
                               full_numel={n: p.numel() for n, p in params},
                               is_dtensor=all(type(p).__name__ == "DTensor" for _, p in params))
    # bf16 compute (FSDP2 casts the gathered parameters; gradients reduced in float32): the ops take bf16 as given.
    model = patched_llama(max(d for t, d in cases if t == "lora"))
    _fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    _train(model, list(model.named_parameters()), rank, world)
    result["bf16"] = dict(state=full_state(model))
    dist.barrier()
    torch.save(result, os.path.join(out, f"fsdp2-rank{rank}.pt"))
