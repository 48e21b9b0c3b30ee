"""BitFit adapter files, in peftops' own format (own_format.py, docs/formats.md): `bitfit_config.json`
({"format": "peftops-bitfit", "version": 1, "train_norm_bias": bool, ...}) and one tensor per trained bias, keyed by
the model's own parameter name (`encoder.layer.0.attention.self.query.bias`)."""
from .own_format import load_own, save_own

CONFIG_NAME = "bitfit_config.json"
FORMAT, VERSION = "peftops-bitfit", 1


def _header(state) -> dict:
    return {"format": FORMAT, "version": VERSION, "train_norm_bias": state.config.train_norm_bias}


def _trained(model, state) -> dict:
    params = dict(model.named_parameters())
    return {n: params[n] for n in state.trainable}


def save_bitfit(model, state, path: str):
    save_own(model, path, CONFIG_NAME, _header(state), _trained(model, state))


def load_bitfit(model, state, path: str):
    return load_own(model, path, CONFIG_NAME, _header(state), _trained(model, state), "BitFit")
