"""Which modules a config targets, matched as peft matches them."""
import re

from torch import nn

from ..layers.lora import is_supported

# Used only when peft is not installed; peft's own mapping covers many more families.
_DEFAULT_LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}


def default_lora_targets(model: nn.Module) -> list:
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:
        mapping = _DEFAULT_LORA_TARGETS
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in mapping:
        raise ValueError(f"target_modules=None, but there is no default for model type {model_type!r} "
                         f"({type(model).__name__}): name the modules to adapt in target_modules")
    return list(mapping[model_type])


def matches(targets, name: str) -> bool:
    """peft's rule: a regex string must match the whole name; a list entry must equal it or be a `.`-suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_lora_targets(model: nn.Module, targets, explicit: bool) -> list:
    """(name, module) for every module `targets` names; ValueError naming what matches nothing or is unsupported."""
    found = [(n, m) for n, m in model.named_modules() if n and matches(targets, n)]
    if not found:
        raise ValueError(f"target_modules {targets!r} match no module of {type(model).__name__}")
    if explicit and not isinstance(targets, str):
        unmatched = [t for t in targets if not any(matches([t], n) for n, _ in found)]
        if unmatched:
            raise ValueError(f"target_modules {unmatched} match no module of {type(model).__name__}")
    unsupported = [f"{n} ({type(m).__name__})" for n, m in found if not is_supported(m)]
    if unsupported:
        raise ValueError(f"target_modules {targets!r} name modules LoRA cannot adapt (it adapts nn.Linear and "
                         f"transformers' Conv1D): {unsupported}")
    non_float = [f"{n} ({m.weight.dtype})" for n, m in found if not m.weight.is_floating_point()]
    if non_float:
        raise ValueError(f"LoRA needs floating-point base weights; these modules have none: {non_float}")
    return found
