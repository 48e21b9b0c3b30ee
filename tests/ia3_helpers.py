"""Helpers of the IA3 tests: random IA3 vectors, peft's config for a peftops IA3Config, and paired models."""
import copy

import torch

import peftops


def randomize_ia3(model, seed=2):
    """IA3 vectors away from their init of ones (which would make every comparison a base-model comparison)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))


def peft_ia3_config(config=None, **kwargs):
    import peft
    config = config or peftops.IA3Config()
    return peft.IA3Config(target_modules=config.target_modules, feedforward_modules=config.feedforward_modules,
                          exclude_modules=config.exclude_modules, **kwargs)


def ours_to_peft_name(name):
    """`model.layers.0.self_attn.k_proj.ia3_l` -> `base_model.model.model.layers.0.self_attn.k_proj.ia3_l.default`."""
    return "base_model.model." + name + (".default" if name.endswith(".ia3_l") else "")


def ia3_pair(builder, config=None, seed=2):
    """(ours in adapter mode, peft's IA3) on the same base weights, with the same random IA3 vectors."""
    import peft
    base = builder()
    ref = peft.get_peft_model(copy.deepcopy(base), peft_ia3_config(config))
    ours = peftops.patch(base, config or peftops.IA3Config())
    randomize_ia3(ours, seed)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "ia3_l" in name:
                ref_params[ours_to_peft_name(name)].copy_(p)
    return ours, ref


def with_random_biases(builder, seed=3):
    """A builder whose biases are random (transformers initialises them to zero, hiding bias handling)."""
    def build():
        model = builder()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
        return model
    return build
