"""A few AdamW steps of a patched tiny Llama (LoRA with dropout, or another technique: see TECHNIQUES), shared by the distributed, compile and
checkpointing tests, and the one-process reference that distributed runs must reproduce.

Seeds: `lora_linear` draws one dropout seed per call from torch's default generator, so rank r, seeded with
SEED + r, draws its own masks. The reference replays them: it runs the full batch as one micro-batch per rank,
each under that rank's generator state, and accumulates the gradient (the mean of the halves' mean losses is the
full batch's mean loss). Without dropout no state is involved and the reference is one full-batch forward; the
techniques other than LoRA run without dropout (DoRA takes LoRA's dropout, but the tests keep it at 0; IA3, prefix
tuning and bottleneck adapters have none). BitFit does not apply to Llama (no biases)."""
import math

import torch

import peftops
from tiny_models import VOCAB, randomize_lora, tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED, STEPS, BATCH, SEQ = 1234, 3, 4, 8


TECHNIQUES = ("lora", "dora", "ia3", "prefix", "adapter")


def _config(technique, dropout):
    if technique in ("lora", "dora"):
        return peftops.LoraConfig(r=8, alpha=16, dropout=dropout, target_modules=TARGETS, use_dora=technique == "dora")
    assert dropout == 0.0, f"{technique} has no dropout"
    if technique == "ia3":
        return peftops.IA3Config()  # k_proj, v_proj, down_proj
    if technique == "prefix":
        return peftops.PrefixConfig(num_virtual_tokens=4)  # per-layer key/value prefixes, already random at init
    if technique == "adapter":
        return peftops.AdapterConfig(bottleneck=8, placement="houlsby")
    raise ValueError(technique)


def patched_llama(dropout=0.1, technique="lora"):
    model = peftops.patch(tiny_llama(), _config(technique, dropout))
    randomize_lora(model)  # lora_B starts at zero: without this, lora_A's first gradient would be exactly zero
    # Likewise: ia3 vectors start at ones (identity) and an adapter's up-projection at zero (its down-projection
    # would get no gradient).
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".ia3_l"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("bottleneck_adapter.up"):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model.train()


def batches(steps=STEPS, batch=BATCH):
    return torch.randint(VOCAB, (steps, batch, SEQ), generator=torch.Generator().manual_seed(3))


def optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def reference(dropout, world=2, seeds=None, technique="lora"):
    """One process over the full batch; returns the trained model (the global generator is left as it was).
    `seeds[r]` seeds micro-batch r (default SEED + r, as rank r)."""
    saved = torch.get_rng_state()
    model = patched_llama(dropout, technique)
    opt = optimizer(model)
    states = []
    for seed in seeds or [SEED + r for r in range(world)]:
        torch.manual_seed(seed)
        states.append(torch.get_rng_state())
    for ids in batches():
        if dropout == 0.0:
            lm_loss(model, ids).backward()
        else:
            for r, part in enumerate(ids.chunk(world)):
                torch.set_rng_state(states[r])
                (lm_loss(model, part) / world).backward()
                states[r] = torch.get_rng_state()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.set_rng_state(saved)
    return model


def full_state(model):
    """name -> detached full tensor, whether the parameters are plain or FSDP2's sharded DTensors."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}
