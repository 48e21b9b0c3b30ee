"""Prefix-tuning adapter files in peft's format: `adapter_config.json` (a peft PrefixTuningConfig) and
`adapter_model.safetensors` holding `prompt_embeddings` [P, layers * 2 * Hkv * D] (peft's layout, see
peftops.patch.prefix) and, for a classification model, its head (peft's modules_to_save, which peft needs there).
With `prefix_projection` peft saves the MLP's output, not the MLP, and so do we: such a file loads onto a model patched
without projection (as peft loads it in inference mode)."""
import json
import os

import torch

from ..patch import prefix
from .peft_format import CONFIG_NAME, head_task, head_tensors, read_checked, read_config, write_weights

KEY = "prompt_embeddings"
_PREFIX = "base_model."  # peft's key prefix of a prompt-learning model's own modules (its classification head)


def _task_type(model):
    """peft's task type: peft builds the PeftModel subclass from it, and a plain PeftModel (no task type) ignores a
    prefix. A classification model's task also makes peft expect its head in the file; any other model that takes
    `past_key_values` (a bare transformer) is FEATURE_EXTRACTION."""
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    return head_task(model)[0] or "FEATURE_EXTRACTION"


def _fields(model, state) -> dict:
    """What fixes the file's shape and meaning, under peft's names."""
    layers = len(state.attention_names)
    return {"num_virtual_tokens": state.config.num_virtual_tokens, "num_layers": layers,
            "num_attention_heads": state.num_kv_heads, "token_dim": state.token_dim, "num_transformer_submodules": 1}


def save_prefix(model, state, path: str):
    with torch.no_grad():
        embeddings = prefix.to_peft_layout(prefix.prefixes(model, state))
    write_weights(path, {KEY: embeddings, **head_tensors(model, _PREFIX)})
    cfg = state.config
    config = {"peft_type": "PREFIX_TUNING", "task_type": _task_type(model), "inference_mode": True,
              "base_model_name_or_path": getattr(model.config, "name_or_path", None) or None, "revision": None,
              "modules_to_save": head_task(model)[1] or None, "prefix_projection": cfg.prefix_projection,
              "encoder_hidden_size": cfg.encoder_hidden_size or state.token_dim, **_fields(model, state)}
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_prefix(model, state, path: str):
    """Everything is validated before any parameter changes, so a mismatch leaves the model as it was."""
    file = os.path.join(path, CONFIG_NAME)
    if os.path.isfile(file):
        saved = read_config(file)
        if saved.get("peft_type") != "PREFIX_TUNING":
            raise ValueError(f"{file} is a {saved.get('peft_type')} adapter, but the model is patched with "
                             "PREFIX_TUNING")
        wrong = [f"{k}: file {saved.get(k)!r}, model {v!r}" for k, v in _fields(model, state).items()
                 if saved.get(k, v) != v]
        if wrong:
            raise ValueError(f"adapter in {path} does not fit the patched model's config: {wrong}")
    if state.config.prefix_projection:
        raise ValueError("a prefix-tuning file holds the prefixes, not the projection MLP that made them (as in peft): "
                         "patch with PrefixConfig(prefix_projection=False) to load it")
    P, layers = state.config.num_virtual_tokens, len(state.attention_names)
    loaded = read_checked(path, {KEY: torch.empty(P, layers * 2 * state.token_dim, device="meta")},
                          head_tensors(model, _PREFIX))
    values = prefix.from_peft_layout(loaded[KEY], layers, state.num_kv_heads)
    with torch.no_grad():
        for (k, v), (lk, lv) in zip(prefix.prefixes(model, state), values):
            k.copy_(lk)
            v.copy_(lv)
    return model
