"""Helpers of the benches (and of tools/*_interleaved.py): saved-for-backward bytes, the peak of a CUDA step, the
models the model-level cases share, and the extra_info every bench records (tools/plot_benchmarks.py and
tools/bench_table.py read it, so keep the keys stable)."""
import os

import torch

SMOLLM2_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", ".cache",
                             "smollm2-135m")

from peftops.profiling import saved_bytes  # noqa: F401  (the benches import it from here)


def record(benchmark, *, family, impl, device, dtype, saved, **shape):
    """The extra_info every bench writes: what ran (family, impl, device, dtype, shape) and what it kept."""
    benchmark.extra_info.update(family=family, impl=impl, device=device, dtype=str(dtype).replace("torch.", ""),
                                saved_bytes=int(saved), **shape)


def training_step(model, loss, lr=1e-4):
    """A training step of `model` on `loss()`: AdamW over its trainable parameters (zero_grad, backward, step)."""
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step():
        optim.zero_grad(set_to_none=True)
        loss().backward()
        optim.step()
    return step


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def cuda_step_peak(step):
    """Bytes a CUDA step allocates at its peak above what is resident, after one step to warm the allocator."""
    step()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    step()
    return torch.cuda.max_memory_allocated() - resident


def load_smollm2():
    """The pretrained SmolLM2-135M from the demo's cache (no tokenizer: one saved by transformers 5 does not load in
    4.57). FileNotFoundError when the cache is missing (python demo/model_cache.py builds it)."""
    if not os.path.isdir(SMOLLM2_CACHE):
        raise FileNotFoundError(f"no SmolLM2-135M cache at {SMOLLM2_CACHE} (python demo/model_cache.py builds it)")
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(SMOLLM2_CACHE)


def frozen_baseline(model):
    """The frozen model as the baseline of time and saved bytes: something must need a gradient, so the input
    embeddings train (their backward runs through every layer, as an adapter in the first layer's does)."""
    model.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)
    return model


def adapterhub_bottleneck(model, placement, activation, adapters):
    """AdapterHub's seq_bn (Pfeiffer) or double_seq_bn (Houlsby) at reduction factor 16 on `model`, the only thing
    that trains; `activation` in peftops' names (silu is AdapterHub's swish)."""
    cls = {"pfeiffer": adapters.SeqBnConfig, "houlsby": adapters.DoubleSeqBnConfig}[placement]
    adapters.init(model)
    model.add_adapter("a", config=cls(reduction_factor=16, non_linearity="swish" if activation == "silu" else activation))
    model.train_adapter("a")
    return model
