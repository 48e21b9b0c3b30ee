"""Technique configs (../shared/SPEC.md): dataclasses validated on construction, errors naming the field."""
import math
import re
from dataclasses import dataclass, field

_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _positive_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_regex(name, value: str):
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"{name}: {value!r} is not a valid regular expression ({e})") from None


def _patterns(name, value, check) -> dict:
    """peft's rank_pattern / alpha_pattern: {module-name pattern: value}, each value passing `check`."""
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict of module-name patterns, got {type(value).__name__}")
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name}: keys must be non-empty module-name patterns, got {key!r}")
        _check_regex(name, key)
        check(f"{name}[{key!r}]", v)
    return dict(value)


def matches_pattern(pattern: str, module_name: str) -> bool:
    r"""Whether a rank_pattern / alpha_pattern key matches the end of `module_name` at a dot boundary (peft's
    get_pattern_key: `(.*\.)?(pattern)$`)."""
    return re.match(rf"(.*\.)?({pattern})$", module_name) is not None


def pattern_value(patterns: dict, module_name: str, default):
    """The value of the first pattern in `patterns` that matches `module_name`, else `default` (as peft)."""
    return next((value for key, value in patterns.items() if matches_pattern(key, module_name)), default)


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _module_names(name, value, allow_empty=False):
    """None, a regex string (full match, as peft) or a non-empty list of module-name suffixes; returns it normalised.
    `allow_empty`: an empty list is meaningful (IA3's feedforward_modules=[]: no layer scales its input)."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name} must not be an empty string")
        _check_regex(name, value)
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        if (not items and not allow_empty) or not all(isinstance(v, str) and v for v in items):
            raise ValueError(f"{name} must be a non-empty list of module names, got {value!r}")
        return items
    raise ValueError(f"{name} must be None, a regex string or a list of module names, got {type(value).__name__}")


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: "list[str] | str | None" = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    # as peft's: {module-name pattern: r or alpha} for the layers whose names end with a match (the first that
    # matches wins); other layers take r and alpha
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    exclude_modules: "list[str] | str | None" = None  # as peft's: matched as target_modules, never adapted
    # as peft's: only the layers with these indices (read from module names, after one of `layers_pattern` if given);
    # with target_modules a list or None
    layers_to_transform: "int | list[int] | None" = None
    layers_pattern: "str | list[str] | None" = None

    def __post_init__(self):
        _positive_int("r", self.r)
        _positive_number("alpha", self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self.target_modules = _module_names("target_modules", self.target_modules)
        self.exclude_modules = _module_names("exclude_modules", self.exclude_modules, allow_empty=True)
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be a bool, got {self.use_rslora!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora must be a bool, got {self.use_dora!r}")
        self.rank_pattern = _patterns("rank_pattern", self.rank_pattern, _positive_int)
        self.alpha_pattern = _patterns("alpha_pattern", self.alpha_pattern, _positive_number)
        self._check_layers()

    def _check_layers(self):
        """peft's rules and types for layers_to_transform and layers_pattern."""
        indices, pattern = self.layers_to_transform, self.layers_pattern
        if indices is not None and not (_is_index(indices) or (isinstance(indices, (list, tuple))
                                                                and all(_is_index(i) for i in indices))):
            raise ValueError(f"layers_to_transform must be None, a layer index or a list of them, got {indices!r}")
        if pattern is not None and not (isinstance(pattern, str) or (isinstance(pattern, (list, tuple))
                                                                     and all(isinstance(p, str) for p in pattern))):
            raise ValueError(f"layers_pattern must be None, a string or a list of strings, got {pattern!r}")
        if isinstance(self.target_modules, str) and (indices is not None or pattern is not None):
            raise ValueError("layers_to_transform and layers_pattern cannot be used when target_modules is a string "
                             "(a regex or 'all-linear'), as in peft")
        if pattern and indices is None:
            raise ValueError("layers_pattern needs layers_to_transform, as in peft")
        self.layers_to_transform = list(indices) if isinstance(indices, tuple) else indices
        self.layers_pattern = list(pattern) if isinstance(pattern, tuple) else pattern

    @property
    def scaling(self) -> float:
        """The scaling of layers that no pattern matches."""
        return self._scaling(self.r, self.alpha)

    def rank_and_scaling(self, module_name: str) -> tuple:
        """(r, scaling) of the layer named `module_name` (its name in the model), patterns applied as peft does."""
        r = pattern_value(self.rank_pattern, module_name, self.r)
        return r, self._scaling(r, pattern_value(self.alpha_pattern, module_name, self.alpha))

    def _scaling(self, r, alpha) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = 20
    prefix_projection: bool = False  # as peft: prefixes come out of a two-layer MLP (tanh) over virtual tokens
    encoder_hidden_size: "int | None" = None  # that MLP's hidden size; None: the prefix width per layer (peft's)
    # A layer that trains with attention dropout (GPT-2, BERT): False runs SDPA over the concatenated prefix and keys
    # with torch's dropout, as peft does (its numbers under one seed); True drops inside ops.prefix_attention with the
    # counter-based mask (no concatenation, less memory; other masks than torch's)
    fused_attention_dropout: bool = False

    def __post_init__(self):
        _positive_int("num_virtual_tokens", self.num_virtual_tokens)
        for name in ("prefix_projection", "fused_attention_dropout"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.encoder_hidden_size is not None:
            _positive_int("encoder_hidden_size", self.encoder_hidden_size)


@dataclass
class AdapterConfig:
    bottleneck: int = 64
    placement: str = "pfeiffer"
    activation: str = "relu"
    scale: float = 1.0

    def __post_init__(self):
        _positive_int("bottleneck", self.bottleneck)
        if self.placement not in ("pfeiffer", "houlsby", "parallel"):
            raise ValueError(f"placement must be 'pfeiffer', 'houlsby' or 'parallel', got {self.placement!r}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number, got {self.scale!r}")


@dataclass
class BitFitConfig:
    train_norm_bias: bool = True

    def __post_init__(self):
        if not isinstance(self.train_norm_bias, bool):
            raise ValueError(f"train_norm_bias must be a bool, got {self.train_norm_bias!r}")


@dataclass
class IA3Config:
    target_modules: "list[str] | str | None" = None
    feedforward_modules: "list[str] | str | None" = None
    exclude_modules: "list[str] | str | None" = None  # as peft's: matched as target_modules, never adapted

    def __post_init__(self):
        self.target_modules = _module_names("target_modules", self.target_modules)
        self.exclude_modules = _module_names("exclude_modules", self.exclude_modules, allow_empty=True)
        self.feedforward_modules = _module_names("feedforward_modules", self.feedforward_modules, allow_empty=True)
        # As peft: with explicit lists, feed-forward modules must be among the targets.
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"feedforward_modules {extra} are not in target_modules")
