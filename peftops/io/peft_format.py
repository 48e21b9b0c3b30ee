"""LoRA adapter files in peft's format: `adapter_config.json` (a peft LoraConfig) and `adapter_model.safetensors`
with peft's keys (`base_model.model.<module>.lora_A.weight`, no adapter name). Files are data, never code."""
import json
import os
import pickle

import torch

from ..layers.lora import conv1d_class
from ..patch import adapter, backend
from ..patch.targets import default_lora_targets

CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
_PREFIX = "base_model.model."


def adapter_tensors(model, state) -> dict:
    """File key -> live parameter, for what an adapter file holds (biases as peft selects them for `bias`)."""
    out = {}
    for name in state.layer_names:
        layer = model.get_submodule(name)
        out[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A
        out[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B
    if state.config.bias == "all":
        out.update({_PREFIX + n: p for n, p in model.named_parameters() if n == "bias" or n.endswith(".bias")})
    elif state.config.bias == "lora_only":
        for name in state.layer_names:
            bias = model.get_submodule(name).base_layer.bias
            if bias is not None:
                out[f"{_PREFIX}{name}.base_layer.bias"] = bias
    return out


def _peft_config_dict(model, state) -> dict:
    cfg = state.config
    targets = cfg.target_modules if cfg.target_modules is not None else default_lora_targets(model)
    conv1d = conv1d_class()
    fan_in_fan_out = conv1d is not None and any(isinstance(model.get_submodule(n).base_layer, conv1d)
                                                for n in state.layer_names)
    return {"peft_type": "LORA", "task_type": None,
            "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
            "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": targets,
            "bias": cfg.bias, "use_rslora": cfg.use_rslora, "use_dora": False, "fan_in_fan_out": fan_in_fan_out,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


def read_weights(path: str) -> dict:
    """The tensors of an adapter folder: safetensors, or a legacy .bin read only as plain data (weights_only)."""
    st, legacy = os.path.join(path, SAFETENSORS_NAME), os.path.join(path, BIN_NAME)
    if os.path.isfile(st):
        from safetensors.torch import load_file
        return load_file(st, device="cpu")
    if os.path.isfile(legacy):
        try:
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"refusing {legacy}: it is not plain tensor data and loading it would run code ({e})") \
                from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise ValueError(f"{legacy} does not hold a dict of tensors")
        return tensors
    raise FileNotFoundError(f"no {SAFETENSORS_NAME} or {BIN_NAME} in {path}")


def _check_config(path: str, expected: dict):
    """Compare the fields of adapter_config.json that change results against the patched model's."""
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        return
    with open(file) as f:
        saved = json.load(f)
    if saved.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file} is a {saved.get('peft_type')} adapter, not LoRA")
    defaults = {"use_rslora": False, "use_dora": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {}}
    wrong = [f"{k}: file {saved.get(k, defaults.get(k))!r}, model {v!r}"
             for k, v in expected.items() if saved.get(k, defaults.get(k)) != v]
    if wrong:
        raise ValueError(f"adapter in {path} does not fit the patched model's config: {wrong}")


def _check_tensors(path: str, expected: dict, loaded: dict):
    missing = sorted(set(expected) - set(loaded))
    extra = sorted(set(loaded) - set(expected))
    shapes = [f"{k}: file {tuple(loaded[k].shape)}, model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(loaded)) if loaded[k].shape != expected[k].shape]
    if missing or extra or shapes:
        raise ValueError(f"adapter in {path} does not fit the model: missing keys {missing}, unexpected keys "
                         f"{extra}, wrong shapes {shapes}")


def save_adapter(model, path: str):
    """Write the adapter's trainable parameters in peft's format (backend mode: peft's own save_pretrained)."""
    if backend.is_peft_model(model):
        model.save_pretrained(path)
        return
    state = adapter.get_state(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by peftops: there is no adapter to save")
    if any(model.get_submodule(n).merged for n in state.layer_names):
        raise ValueError("the adapter is merged into the base weights; save it before merging")
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    tensors = {k: p.detach().contiguous().cpu() for k, p in adapter_tensors(model, state).items()}
    save_file(tensors, os.path.join(path, SAFETENSORS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(_peft_config_dict(model, state), f, indent=2, sort_keys=True)


def load_adapter(model, path: str):
    """Load an adapter saved by peftops or peft onto a model patched with the same config. Everything is validated
    before any parameter changes, so a mismatch leaves the model as it was."""
    if backend.is_peft_model(model):
        return _load_into_peft(model, path)
    state = adapter.get_state(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by peftops: patch it with the adapter's config first")
    cfg = state.config
    _check_config(path, {"r": cfg.r, "lora_alpha": cfg.alpha, "use_rslora": cfg.use_rslora, "bias": cfg.bias,
                         "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}})
    expected = adapter_tensors(model, state)
    loaded = read_weights(path)
    _check_tensors(path, expected, loaded)
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(loaded[key])
    return model


def _load_into_peft(model, path: str):
    """Into the active adapter of a peft model, through peft's own state dict functions."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    name = model.active_adapter
    cfg = model.peft_config[name]
    _check_config(path, {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "use_rslora": cfg.use_rslora, "bias": cfg.bias,
                         "use_dora": cfg.use_dora})
    loaded = read_weights(path)
    _check_tensors(path, get_peft_model_state_dict(model, adapter_name=name), loaded)
    set_peft_model_state_dict(model, loaded, adapter_name=name)
    return model
