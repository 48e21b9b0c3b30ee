"""LoRA and IA3 adapter files in peft's format: `adapter_config.json` (a peft LoraConfig / IA3Config) and
`adapter_model.safetensors` with peft's keys, without the adapter name (`base_model.model.<module>.lora_A.weight`,
`base_model.model.<module>.ia3_l`). One code path saves, checks and loads both; a `_Technique` says what differs
(which tensors, which config fields must agree). Files are data, never code."""
import json
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import IA3Config, LoraConfig
from ..layers.wrapped import conv1d_class
from ..patch import adapter
from ..patch.targets import default_lora_targets, is_feedforward

CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class _Technique:
    peft_type: str
    tensors: Callable  # (model, state) -> {file key: live parameter}
    config_fields: Callable  # (model, state) -> the technique's fields of adapter_config.json
    expected: Callable  # (model, state) -> what `disagreements` compares the file against, in adapter mode
    disagreements: Callable  # (saved adapter_config dict, expected) -> ["field: file x, model y"]
    peft_expected: Callable  # (peft model, adapter name) -> what `disagreements` compares the file against


def _fields_differ(saved: dict, expected: dict) -> list:
    defaults = {"use_rslora": False, "use_dora": False, "bias": "none"}
    return [f"{k}: file {saved.get(k, defaults.get(k))!r}, model {v!r}"
            for k, v in expected.items() if saved.get(k, defaults.get(k)) != v]


def _uses_conv1d(model, state) -> bool:
    conv1d = conv1d_class()
    return conv1d is not None and any(isinstance(model.get_submodule(n).base_layer, conv1d) for n in state.layer_names)


# LoRA -------------------------------------------------------------------------------------------------------------
def _lora_tensors(model, state) -> dict:
    """Biases travel as peft selects them for `bias`."""
    out = {}
    for name in state.layer_names:
        layer = model.get_submodule(name)
        out[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A
        out[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B
        if layer.use_dora:  # peft's file key drops the adapter name and the DoraLinearLayer's `.weight`
            out[f"{_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    if state.config.bias == "all":
        out.update({_PREFIX + n: p for n, p in model.named_parameters() if n == "bias" or n.endswith(".bias")})
    elif state.config.bias == "lora_only":
        for name in state.layer_names:
            bias = model.get_submodule(name).base_layer.bias
            if bias is not None:
                out[f"{_PREFIX}{name}.base_layer.bias"] = bias
    return out


def _lora_fields(model, state) -> dict:
    cfg = state.config
    targets = cfg.target_modules if cfg.target_modules is not None else default_lora_targets(model)
    return {"r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": targets,
            "bias": cfg.bias, "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora, "init_lora_weights": True,
            "rank_pattern": cfg.rank_pattern, "alpha_pattern": cfg.alpha_pattern,
            "layers_to_transform": cfg.layers_to_transform, "layers_pattern": cfg.layers_pattern,
            "exclude_modules": cfg.exclude_modules}


def _lora_expected(model, state) -> tuple:
    """What changes results, as the patched model has it: (config fields, {layer: (r, scaling)})."""
    cfg = state.config
    layers = {n: (model.get_submodule(n).r, model.get_submodule(n).scaling) for n in state.layer_names}
    return {"use_rslora": cfg.use_rslora, "bias": cfg.bias, "use_dora": cfg.use_dora}, layers


def _lora_peft_expected(model, name) -> tuple:
    from peft.tuners.lora import LoraLayer
    cfg = model.peft_config[name]
    layers = {n: (m.r[name], m.scaling[name]) for n, m in model.base_model.model.named_modules()
              if isinstance(m, LoraLayer) and name in m.lora_A}
    return {"use_rslora": cfg.use_rslora, "bias": cfg.bias, "use_dora": cfg.use_dora}, layers


def _lora_disagreements(saved: dict, expected: tuple) -> list:
    """The fields that differ, then the layers whose rank or scaling under the file's r, lora_alpha, rank_pattern and
    alpha_pattern (in the file's order: the first matching pattern wins) differ from the model's."""
    fields, layers = expected
    try:
        config = LoraConfig(r=saved.get("r", 8), alpha=saved.get("lora_alpha", 8),
                            use_rslora=saved.get("use_rslora", False), rank_pattern=saved.get("rank_pattern") or {},
                            alpha_pattern=saved.get("alpha_pattern") or {})
    except ValueError as e:
        return [f"unreadable LoRA fields ({e})"]
    differ = [f"{n}: file r={r} scaling={s:g}, model r={layer[0]} scaling={layer[1]:g}"
              for n, layer in layers.items() for r, s in [config.rank_and_scaling(n)] if (r, s) != layer]
    shown = differ[:4] + ([f"... {len(differ) - 4} more layers"] if len(differ) > 4 else [])
    return _fields_differ(saved, fields) + shown


# IA3 --------------------------------------------------------------------------------------------------------------
def _ia3_tensors(model, state) -> dict:
    return {f"{_PREFIX}{name}.ia3_l": model.get_submodule(name).ia3_l for name in state.layer_names}


def _ia3_fields(model, state) -> dict:
    targets, feedforward = adapter.ia3_modules(model, state.config)
    return {"target_modules": targets, "feedforward_modules": feedforward, "init_ia3_weights": True,
            "exclude_modules": state.config.exclude_modules}


def _ia3_expected(model, state) -> dict:
    """Which layers scale their input: square layers take vectors of the same shape either way, so the key set and
    shapes alone cannot tell a feed-forward layer from an output-scaled one."""
    return {name: model.get_submodule(name).feedforward for name in state.layer_names}


def _ia3_peft_expected(model, adapter_name) -> dict:
    from peft.tuners.ia3.layer import IA3Layer
    base = model.base_model.model
    return {n: m.is_feedforward for n, m in base.named_modules() if isinstance(m, IA3Layer) and adapter_name in m.ia3_l}


def _ia3_disagreements(saved: dict, layers: dict) -> list:
    feedforward = saved.get("feedforward_modules")
    if feedforward is None:
        return []
    kind = {True: "feed-forward (input scaling)", False: "output scaling"}
    return [f"{n}: file {kind[is_feedforward(feedforward, n)]}, model {kind[ff]}"
            for n, ff in layers.items() if is_feedforward(feedforward, n) != ff]


_TECHNIQUES = {
    LoraConfig: _Technique("LORA", _lora_tensors, _lora_fields, _lora_expected, _lora_disagreements,
                           _lora_peft_expected),
    IA3Config: _Technique("IA3", _ia3_tensors, _ia3_fields, _ia3_expected, _ia3_disagreements, _ia3_peft_expected)}


def adapter_tensors(model, state) -> dict:
    """File key -> live parameter, for what an adapter file of this patched model holds."""
    return _TECHNIQUES[type(state.config)].tensors(model, state)


def _peft_config_dict(model, state) -> dict:
    technique = _TECHNIQUES[type(state.config)]
    task, heads = head_task(model)
    return {"peft_type": technique.peft_type, "task_type": task,
            "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
            "fan_in_fan_out": _uses_conv1d(model, state), "inference_mode": True, "modules_to_save": heads or None,
            "revision": None,
            **technique.config_fields(model, state)}


# Classification heads: for these task types peft trains the head as a whole module (its modules_to_save) and its
# files carry it next to the adapter, under `<format prefix><head>.<parameter>`; peft needs it to load such a file.
_HEAD_TASKS = (("ForSequenceClassification", "SEQ_CLS", ("classifier", "score")),
               ("ForTokenClassification", "TOKEN_CLS", ("classifier", "score")),
               ("ForQuestionAnswering", "QUESTION_ANS", ("qa_outputs",)))


def head_task(model) -> tuple:
    """(peft's task type, the head modules' names) of a model with a classification head, else (None, []). A head that
    an adapter wraps ("all-linear" reaches it) is saved as that adapter, so the model counts as one without a head."""
    from ..layers import Ia3Linear, LoraLinear
    for suffix, task, heads in _HEAD_TASKS:
        if type(model).__name__.endswith(suffix):
            # peft saves every module whose name ends with a head's name (DistilBERT's pre_classifier too)
            found = [n for n, m in model.named_modules() if any(n.endswith(h) for h in heads)]
            if any(isinstance(model.get_submodule(h), (LoraLinear, Ia3Linear)) for h in found):
                return None, []
            return task, found
    return None, []


def head_tensors(model, prefix: str, heads=None) -> dict:
    """File key -> live parameter of the model's classification head (peft's key layout under `prefix`); `heads`:
    head_task's names where the caller has them."""
    return {f"{prefix}{h}.{n}": p for h in (head_task(model)[1] if heads is None else heads)
            for n, p in model.get_submodule(h).named_parameters()}


def _without_head_wrapper_copies(loaded: dict, heads: list) -> dict:
    """A peft file's tensors less the copies inside its head wrapper (`<head>.original_module.*`,
    `<head>.modules_to_save.*`), which peft's bias="all" rule saves beside the head; peft's loader ignores them."""
    wrappers = tuple(f"{_PREFIX}{h}.{part}." for h in heads for part in ("original_module", "modules_to_save"))
    return {k: v for k, v in loaded.items() if not k.startswith(wrappers)} if wrappers else loaded


def _without_unsaved_lora_only_biases(path: str, expected: dict, loaded: dict, bias: str) -> dict:
    """`expected` less the base-layer biases of `bias="lora_only"` when the file holds none of them: peft before 0.21
    saved none (its key rule missed `base_layer.bias`) and loads such a file keeping the model's biases, as here."""
    biases = {k for k in expected if k.endswith(".base_layer.bias")} if bias == "lora_only" else set()
    if not biases or biases & loaded.keys():
        return expected
    warnings.warn(f"peftops: {path} holds no biases for bias='lora_only' (peft before 0.21 did not save them): "
                  f"the model keeps its own, as peft loads it")
    return {k: v for k, v in expected.items() if k not in biases}


def read_checked(path: str, expected: dict, heads: dict, loaded: dict | None = None) -> dict:
    """An adapter file's tensors (`loaded`, read here unless given), checked to be exactly `expected` (file key -> a
    tensor of the right shape) plus, optionally, the classification head that a peft file of a classification model
    carries (`heads`: file key -> live parameter), which is copied in after every check; the caller copies the rest
    (what the file has). A mismatch changes nothing."""
    loaded = read_weights(path) if loaded is None else loaded
    # a head tensor that the adapter carries itself (a bias under bias="all") is the adapter's, whether or not the
    # file holds the rest of the head
    heads = {k: p for k, p in heads.items() if k not in expected}
    # a head module counts when the file has any of its tensors (then it must have them all): files differ in which
    # modules they carry (peftops' before it followed peft's suffix rule: classifier without pre_classifier)
    carried = {k.rsplit(".", 1)[0] for k in heads if k in loaded}
    with_head = {**expected, **{k: p for k, p in heads.items() if k.rsplit(".", 1)[0] in carried}}
    check_tensors(path, with_head, loaded)
    with torch.no_grad():
        for key in with_head.keys() & heads.keys():
            heads[key].copy_(loaded[key])
    return loaded


def read_config(file: str) -> dict:
    """A JSON config file's object; ValueError naming the file when it is not one."""
    try:
        with open(file) as f:
            saved = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{file} does not hold a JSON object (a config), but {type(saved).__name__}")
    return saved


def read_weights(path: str) -> dict:
    """The tensors of an adapter folder: safetensors, or a legacy .bin read only as plain data (weights_only)."""
    st, legacy = os.path.join(path, SAFETENSORS_NAME), os.path.join(path, BIN_NAME)
    if os.path.isfile(st):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(st, device="cpu")
        except SafetensorError as e:
            raise ValueError(f"{st} is not a readable safetensors file ({e})") from None
    if os.path.isfile(legacy):
        try:
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"refusing {legacy}: it is not plain tensor data (it is corrupt, or loading it would run "
                             f"code): {e}") from None
        except (RuntimeError, EOFError) as e:
            raise ValueError(f"{legacy} is not a readable torch file ({e})") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise ValueError(f"{legacy} does not hold a dict of tensors")
        return tensors
    raise FileNotFoundError(f"no {SAFETENSORS_NAME} or {BIN_NAME} in {path}")


def _check_config(path: str, technique: _Technique, expected):
    """Compare what adapter_config.json says against the patched model: the adapter type, then what changes results."""
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        return
    saved = read_config(file)
    if saved.get("peft_type", "LORA") != technique.peft_type:
        raise ValueError(f"{file} is a {saved.get('peft_type')} adapter, but the model is patched with "
                         f"{technique.peft_type}")
    wrong = technique.disagreements(saved, expected)
    if wrong:
        raise ValueError(f"adapter in {path} does not fit the patched model's config: {wrong}")


def check_tensors(path: str, expected: dict, loaded: dict):
    missing = sorted(set(expected) - set(loaded))
    extra = sorted(set(loaded) - set(expected))
    shapes = [f"{k}: file {tuple(loaded[k].shape)}, model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(loaded)) if loaded[k].shape != expected[k].shape]
    if missing or extra or shapes:
        raise ValueError(f"adapter in {path} does not fit the model: missing keys {missing}, unexpected keys "
                         f"{extra}, wrong shapes {shapes}")


def write_weights(path: str, tensors: dict):
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    save_file({k: p.detach().contiguous().cpu() for k, p in tensors.items()}, os.path.join(path, SAFETENSORS_NAME),
              metadata={"format": "pt"})


def save_peft_format(model, state, path: str):
    """Write an adapter-mode LoRA / IA3 model's adapter in peft's format; a classification model's head goes with
    it, as in peft's files of that task (a head that a transformers model builds at random must travel with it)."""
    if any(model.get_submodule(n).merged for n in state.layer_names):
        raise ValueError("the adapter is merged into the base weights; save it before merging")
    write_weights(path, {**adapter_tensors(model, state), **head_tensors(model, _PREFIX)})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        # fields sorted as peft writes them, patterns in their own order (the first that matches a layer wins)
        json.dump(dict(sorted(_peft_config_dict(model, state).items())), f, indent=2)


def load_peft_format(model, state, path: str):
    """Everything is validated before any parameter changes, so a mismatch leaves the model as it was."""
    technique = _TECHNIQUES[type(state.config)]
    _check_config(path, technique, technique.expected(model, state))
    heads = head_task(model)[1]
    loaded = _without_head_wrapper_copies(read_weights(path), heads)
    expected = _without_unsaved_lora_only_biases(path, adapter_tensors(model, state), loaded,
                                                 getattr(state.config, "bias", "none"))
    read_checked(path, expected, head_tensors(model, _PREFIX, heads), loaded)
    with torch.no_grad():
        for key, param in expected.items():
            if key in loaded:
                param.copy_(loaded[key])
    return model


def _peft_lora_only_biases(model, name: str) -> dict:
    """File key -> bias of the base layers that adapter `name` of a peft LoRA model wraps."""
    from peft.tuners.lora import LoraLayer
    return {f"{n}.base_layer.bias": m.get_base_layer().bias for n, m in model.named_modules()
            if isinstance(m, LoraLayer) and name in m.lora_A and m.get_base_layer().bias is not None}


def load_into_peft(model, path: str):
    """Into the active adapter of a peft model, through peft's own state dict functions."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    name = model.active_adapter
    kind = str(getattr(model.peft_config[name].peft_type, "value", model.peft_config[name].peft_type))
    technique = next((t for t in _TECHNIQUES.values() if t.peft_type == kind), None)
    if technique is None:
        raise ValueError(f"peftops.load_adapter loads LoRA or IA3 adapters into peft models, not {kind}")
    _check_config(path, technique, technique.peft_expected(model, name))
    expected = get_peft_model_state_dict(model, adapter_name=name)
    bias = getattr(model.peft_config[name], "bias", "none")
    if bias == "lora_only":  # peft before 0.21 leaves them out of its state dict, but loads them
        expected.update(_peft_lora_only_biases(model, name))
    # a file saved from a classification model carries its head; a peft model without that task keeps the head in
    # its base model, where it goes (as for adapter mode)
    heads = {k: p for k, p in head_tensors(model.get_base_model(), _PREFIX).items() if k not in expected}
    loaded = read_weights(path)
    read_checked(path, _without_unsaved_lora_only_biases(path, expected, loaded, bias), heads, loaded)
    set_peft_model_state_dict(model, {k: v for k, v in loaded.items() if k not in heads}, adapter_name=name)
    return model
