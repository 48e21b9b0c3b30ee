"""Bottleneck adapter files, in peftops' own format (own_format.py, docs/formats.md): `bottleneck_config.json`
({"format": "peftops-bottleneck", "version": 1, "bottleneck", "placement", "activation", "scale", ...}) and the four
tensors of every adapter keyed by their state-dict names (`model.layers.0.mlp.bottleneck_adapter.down`)."""
from ..patch.bottleneck import adapter_parameters
from .own_format import load_own, save_own

CONFIG_NAME = "bottleneck_config.json"
FORMAT, VERSION = "peftops-bottleneck", 1


def _header(state) -> dict:
    c = state.config
    return {"format": FORMAT, "version": VERSION, "bottleneck": c.bottleneck, "placement": c.placement,
            "activation": c.activation, "scale": float(c.scale)}


def save_bottleneck(model, state, path: str):
    save_own(model, path, CONFIG_NAME, _header(state), adapter_parameters(model, state))


def load_bottleneck(model, state, path: str):
    return load_own(model, path, CONFIG_NAME, _header(state), adapter_parameters(model, state), "bottleneck")
