"""peftops' own adapter file format, shared by the techniques peft has no adapter type for (BitFit, bottleneck
adapters; documented in docs/formats.md):

    <folder>/<technique>_config.json   {"format": "peftops-<technique>", "version": int, <technique fields>,
                                        "base_model_name_or_path": str | null, "model_type": str | null}
    <folder>/adapter_model.safetensors one tensor per trained parameter, keyed by its name in the model's state dict,
                                        metadata {"format": "pt"}

Loading checks the format, the fields that change results, the model type, and that the keys and shapes are exactly
the parameters the patched model trains, before any parameter changes. Files are data, never code."""
import json
import os

import torch

from .peft_format import check_tensors, read_config, read_weights, write_weights


def model_info(model) -> dict:
    config = getattr(model, "config", None)
    return {"base_model_name_or_path": getattr(config, "name_or_path", None) or None,
            "model_type": getattr(config, "model_type", None)}


def save_own(model, path: str, config_name: str, header: dict, tensors: dict):
    """`header`: format, version and the technique's fields; `tensors`: state-dict name -> live parameter."""
    write_weights(path, tensors)
    with open(os.path.join(path, config_name), "w") as f:
        json.dump({**header, **model_info(model)}, f, indent=2, sort_keys=True)


def load_own(model, path: str, config_name: str, header: dict, expected: dict, what: str):
    """Load `expected` (name -> live parameter) from `path` if its config agrees with `header` on every field."""
    file = os.path.join(path, config_name)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {config_name} in {path}: not a peftops {what} adapter")
    saved = read_config(file)
    if saved.get("format") != header["format"] or saved.get("version") != header["version"]:
        raise ValueError(f"{file} is not a {header['format']} version {header['version']} file (format, version: "
                         f"{(saved.get('format'), saved.get('version'))!r})")
    for field, value in header.items():
        if saved.get(field) != value:
            raise ValueError(f"adapter in {path} has {field}={saved.get(field)!r}, the patched model {value!r}")
    model_type = model_info(model)["model_type"]
    if saved.get("model_type") is not None and model_type is not None and saved["model_type"] != model_type:
        raise ValueError(f"adapter in {path} was saved from a {saved['model_type']} model, not {model_type}")
    loaded = read_weights(path)  # safetensors, or a legacy .bin read only as plain data
    check_tensors(path, expected, loaded)
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(loaded[name])
    return model
