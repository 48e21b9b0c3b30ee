"""BitFit adapter files, our own format (documented in docs/formats.md):

    <folder>/bitfit_config.json        {"format": "peftops-bitfit", "version": 1, "train_norm_bias": bool,
                                        "base_model_name_or_path": str | null, "model_type": str | null}
    <folder>/adapter_model.safetensors one tensor per trained bias, keyed by the model's own parameter name
                                        (`encoder.layer.0.attention.self.query.bias`), metadata {"format": "pt"}

Loading checks the config and that the keys and shapes are exactly those the patched model trains, before any
parameter changes. Files are data, never code."""
import json
import os

import torch

from .peft_format import SAFETENSORS_NAME, check_tensors, read_weights, write_weights

CONFIG_NAME = "bitfit_config.json"
FORMAT, VERSION = "peftops-bitfit", 1


def _model_info(model) -> dict:
    config = getattr(model, "config", None)
    return {"base_model_name_or_path": getattr(config, "name_or_path", None) or None,
            "model_type": getattr(config, "model_type", None)}


def save_bitfit(model, state, path: str):
    params = dict(model.named_parameters())
    write_weights(path, {n: params[n] for n in state.trainable})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "train_norm_bias": state.config.train_norm_bias,
                   **_model_info(model)}, f, indent=2, sort_keys=True)


def load_bitfit(model, state, path: str):
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not a peftops BitFit adapter")
    with open(file) as f:
        saved = json.load(f)
    if saved.get("format") != FORMAT or saved.get("version") != VERSION:
        raise ValueError(f"{file} is not a {FORMAT} version {VERSION} file (format {saved.get('format')!r}, "
                         f"version {saved.get('version')!r})")
    if saved.get("train_norm_bias") != state.config.train_norm_bias:
        raise ValueError(f"adapter in {path} has train_norm_bias={saved.get('train_norm_bias')!r}, the patched model "
                         f"{state.config.train_norm_bias!r}")
    model_type = _model_info(model)["model_type"]
    if saved.get("model_type") is not None and model_type is not None and saved["model_type"] != model_type:
        raise ValueError(f"adapter in {path} was saved from a {saved['model_type']} model, not {model_type}")
    params = dict(model.named_parameters())
    expected = {n: params[n] for n in state.trainable}
    loaded = read_weights(path) if os.path.isfile(os.path.join(path, SAFETENSORS_NAME)) else {}
    check_tensors(path, expected, loaded)
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(loaded[name])
    return model
