"""Which modules a config targets, matched as peft matches them."""
import re
import warnings

from torch import nn

from ..layers.wrapped import is_supported

# Used only when peft is not installed; peft's own mapping covers many more families.
_DEFAULT_LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}
_DEFAULT_IA3_TARGETS = {"llama": ["k_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"],
                        "bert": ["key", "value", "output.dense"]}
_DEFAULT_IA3_FEEDFORWARD = {"llama": ["down_proj"], "gpt2": ["mlp.c_proj"], "bert": ["output.dense"]}


def _family_default(model: nn.Module, mapping: dict, field: str) -> list:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in mapping:
        raise ValueError(f"{field}=None, but there is no default for model type {model_type!r} "
                         f"({type(model).__name__}): name the modules in {field}")
    return list(mapping[model_type])


def default_lora_targets(model: nn.Module) -> list:
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:
        mapping = _DEFAULT_LORA_TARGETS
    return _family_default(model, mapping, "target_modules")


def default_ia3_modules(model: nn.Module, target_modules, feedforward_modules) -> tuple:
    """(target_modules, feedforward_modules) with each None replaced by peft's default for the model family."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as ff_mapping
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as mapping
    except ImportError:
        mapping, ff_mapping = _DEFAULT_IA3_TARGETS, _DEFAULT_IA3_FEEDFORWARD
    if target_modules is None:
        target_modules = _family_default(model, mapping, "target_modules")
    if feedforward_modules is None:
        feedforward_modules = _family_default(model, ff_mapping, "feedforward_modules")
    return target_modules, feedforward_modules


def is_feedforward(feedforward_modules, name: str) -> bool:
    """peft's IA3 rule, which differs from target matching: a list entry need only be a suffix of the name."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(t) for t in feedforward_modules)


def matches(targets, name: str) -> bool:
    """peft's rule: a regex string must match the whole name; a list entry must equal it or be a `.`-suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def layer_index(name: str, layers_pattern=None) -> "int | None":
    """The layer index peft reads from a module name for layers_to_transform: the first number segment that follows
    another segment, or follows one of `layers_pattern` when given; None when there is none."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    match = next((m for m in (re.match(r, name) for r in regexes) if m is not None), None)
    return int(match.group("idx")) if match else None


def in_layers(name: str, layers_to_transform, layers_pattern=None) -> bool:
    """Whether a module is in the layers that layers_to_transform picks (every module when it is None or [])."""
    if layers_to_transform is None or layers_to_transform == []:
        return True
    index = layer_index(name, layers_pattern)
    wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    return index is not None and index in wanted


ALL_LINEAR = "all-linear"


def _read_directly(model: nn.Module) -> set:
    """The linear layers whose owner never calls them: nn.MultiheadAttention reads its out_proj's weight and bias
    itself, so a layer wrapped there would never run."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def all_linear_names(model: nn.Module) -> list:
    """peft's "all-linear": every nn.Linear / Conv1D module except the model's output layer (its LM head), and
    except those their owner never calls (nn.MultiheadAttention's out_proj)."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    skip = _read_directly(model)
    return [n for n, m in model.named_modules() if n and is_supported(m) and m is not output and id(m) not in skip]


def find_targets(model: nn.Module, targets, explicit: bool, technique: str = "LoRA", exclude=None,
                 layers=(None, None)) -> list:
    """(name, module) for every module `targets` names and `exclude` (matched as peft matches exclude_modules, by the
    same rule as targets) does not, in the `layers` (layers_to_transform, layers_pattern) picked; ValueError naming
    what matches nothing or is unsupported."""
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = all_linear_names(model)
        if not targets:
            raise ValueError(f"target_modules='all-linear' found no linear layer in {type(model).__name__}")
        fused = [n for n, p in model.named_parameters() if p.dim() == 3 and ".experts." in f".{n}"]
        if fused:
            warnings.warn(f"peftops: target_modules='all-linear' adapts nn.Linear and Conv1D modules only: the fused "
                          f"MoE expert weights ({fused[0]}, ...) stay frozen (peft's LoRA adapts those of some models "
                          f"through target_parameters)", stacklevel=4)
    named = [(n, m) for n, m in model.named_modules() if n and matches(targets, n)]
    if explicit and not isinstance(targets, str):
        unmatched = [t for t in targets if not any(matches([t], n) for n, _ in named)]
        if unmatched:
            raise ValueError(f"target_modules {unmatched} match no module of {type(model).__name__}")
    if exclude and not any(matches(exclude, n) for n, _ in model.named_modules() if n):
        warnings.warn(f"peftops: exclude_modules {exclude!r} match no module of {type(model).__name__} (as peft "
                      f"warns)", stacklevel=4)
    found = [(n, m) for n, m in named if not (exclude and matches(exclude, n)) and in_layers(n, *layers)]
    if not found:
        limits = ([f"exclude_modules {exclude!r}"] if exclude else []) + \
                 ([f"layers_to_transform {layers[0]!r}"] if layers[0] not in (None, []) else [])
        left = f" that {' and '.join(limits)} leave" if named else ""
        raise ValueError(f"target_modules {targets!r} match no module{left} of {type(model).__name__}")
    unsupported = [f"{n} ({type(m).__name__})" for n, m in found if not is_supported(m)]
    if unsupported:
        raise ValueError(f"target_modules {targets!r} name modules {technique} cannot adapt (it adapts nn.Linear and "
                         f"transformers' Conv1D): {unsupported}")
    read_directly = _read_directly(model)
    never_called = [n for n, m in found if id(m) in read_directly]
    if never_called:
        raise ValueError(f"target_modules {targets!r} name the out_proj of an nn.MultiheadAttention, which reads its "
                         f"weight directly and never calls it, so {technique} there would have no effect: "
                         f"{never_called}")
    non_float = [f"{n} ({m.weight.dtype})" for n, m in found if not m.weight.is_floating_point()]
    if non_float:
        raise ValueError(f"{technique} needs floating-point base weights; these modules have none: {non_float}")
    return found
