"""Adapter mode: peftops layers (LoRA, IA3) inserted in place of the targeted modules of a plain model."""
import functools
import inspect
import warnings
from dataclasses import dataclass, field

from torch import nn

from ..config import IA3Config, LoraConfig, matches_pattern
from ..layers.ia3 import Ia3Linear
from ..layers.lora import LoraLinear
from .backend import peft_layer_names
from .gated_mlp import fuse_gated_blocks, unfuse_gated_blocks
from .targets import default_ia3_modules, default_lora_targets, find_targets, is_feedforward

STATE_ATTR = "_peftops_patch"


@dataclass
class PatchState:
    """What unpatch needs: the replaced module names and every parameter's requires_grad before patching."""
    config: object  # LoraConfig | IA3Config
    adapter_name: str
    layer_names: list
    requires_grad: list  # freeze's [(name, parameter, flag)] before patching
    gated_blocks: list = field(default_factory=list)  # feed-forward blocks whose forward IA3 took over
    nested_tensor_flags: list = field(default_factory=list)  # [(nn.TransformerEncoder, use_nested_tensor before)]


def get_state(model: nn.Module):
    return model.__dict__.get(STATE_ATTR)


def _set_submodule(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def check_model(fn: str, model) -> None:
    """A TypeError naming `fn` unless `model` is an nn.Module (before any of its attributes is read)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")


def _listed(names: list) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def check_unpatched(model: nn.Module):
    """Refuse a model that peftops already patched or that holds peftops or peft layers: patching would stack."""
    state = get_state(model)
    if state is not None:
        name = type(state.config).__name__.replace("Config", "")
        raise ValueError(f"model is already patched by peftops ({name}, adapter {state.adapter_name!r}); "
                         "call peftops.unpatch(model) first")
    held = peft_layer_names(model)
    if held:
        raise ValueError(f"model holds peft adapter layers ({_listed(held)}); a config would stack adapters on them: "
                         "backend mode takes the peft.PeftModel itself (peftops.patch(peft_model)); or merge and "
                         "unload peft's adapters first")
    # a submodule patched on its own, or the parent of a patched model: every peftops change to a module is a layer
    # of its own or leaves a "_peftops..." entry in the module's __dict__ (a bottleneck adapter's holder: a replaced
    # forward; an adapter the user built into the model is not a patch)
    touched = [n or type(model).__name__ for n, m in model.named_modules()
               if isinstance(m, (LoraLinear, Ia3Linear)) or any(k.startswith("_peftops") for k in m.__dict__)]
    if touched:
        raise ValueError(f"model already holds modules that peftops patched ({_listed(touched)}); patching again "
                         "would stack adapters: unpatch first")


def _no_op(module, args):
    return None


def _keep_off_fast_paths(model: nn.Module, names: list) -> list:
    """torch's TransformerEncoderLayer has an inference fast path that reads its linear layers' weights itself, which
    would bypass an adapter; it stands aside when any module in the layer carries a forward hook, so adapters there
    carry a no-op one. TransformerEncoder's own fast path turns padded batches into nested tensors, which the ops do
    not take: it is switched off (use_nested_tensor) where an adapter sits below; returns the flags to restore."""
    wrapped = {id(model.get_submodule(n)) for n in names}
    for name in names:
        if isinstance(model.get_submodule(name.rpartition(".")[0]), nn.TransformerEncoderLayer):
            model.get_submodule(name).register_forward_pre_hook(_no_op)
    flags = []
    for encoder in model.modules():
        if isinstance(encoder, nn.TransformerEncoder) and getattr(encoder, "use_nested_tensor", False) and \
                any(id(m) in wrapped for m in encoder.modules()):
            flags.append((encoder, encoder.use_nested_tensor))
            encoder.use_nested_tensor = False
    return flags


# transformers' method that turns checkpointing on: 5.x's name, or 4.x's (which 5.x keeps, deprecated, calling 5.x's)
_ENABLE_CHECKPOINTING = ("activation_checkpointing_enable", "gradient_checkpointing_enable")


def freeze(model: nn.Module) -> list:
    """Freezes every parameter; returns [(name, parameter, requires_grad before)] for restore_flags. With transformers'
    checkpointing on, the embeddings' output is made to require grad: reentrant checkpointing (4.x's default) would
    otherwise pass no gradient to the adapters. peft does so when it wraps a model whose checkpointing is on already;
    checkpointing turned on later (the Trainer's `gradient_checkpointing=True`) does it too while the model is patched,
    as AdapterHub's models do."""
    flags = [(n, p, p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)]
    for p in model.parameters():
        p.requires_grad_(False)
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # 5.x's name; 4.x's warns on 5.x
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        _embeddings_require_grad(model)
    for name in _ENABLE_CHECKPOINTING:  # the first the model has: 5.x's (its deprecated alias calls it), or 4.x's
        if callable(getattr(type(model), name, None)):
            if name not in model.__dict__:
                switch = functools.partial(_enable_checkpointing, name, model)
                switch.__signature__ = inspect.signature(getattr(model, name))  # (peft inspects its keywords)
                setattr(model, name, switch)
            break
    return flags


def _enable_checkpointing(name: str, model: nn.Module, *args, **kwargs):
    """The model's own checkpointing switch, then the embeddings' hook (see freeze); a partial in the instance's
    __dict__ while patched (it pickles)."""
    result = getattr(type(model), name)(model, *args, **kwargs)
    _embeddings_require_grad(model)
    return result


def _embeddings_require_grad(model: nn.Module) -> None:
    embeddings = _input_embeddings(model)
    if embeddings is not None and not any(
            getattr(h, "__name__", None) in ("make_inputs_require_grads", _outputs_require_grad.__name__)
            for h in embeddings._forward_hooks.values()):  # transformers' own may be there already
        embeddings.register_forward_hook(_outputs_require_grad)


def _outputs_require_grad(module, inputs, output):
    """The embeddings' hook of transformers' enable_input_require_grads, as a module-level function (it pickles)."""
    output.requires_grad_(True)


def _input_embeddings(model: nn.Module):
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # no transformers model, or one without token embeddings
        return None


def restore_flags(model: nn.Module, flags: list):
    """After unpatching has put every module back where it was: by name, so that parameters replaced since
    (model.to("meta"), load_state_dict(assign=True)) get their flags back too, else (a module the user replaced or
    wrapped since) by the parameter itself. freeze's embeddings hook and checkpointing switches go too."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, param, flag in flags:
        params.get(name, param).requires_grad_(flag)
    for name in _ENABLE_CHECKPOINTING:
        switch = model.__dict__.get(name)
        if isinstance(switch, functools.partial) and switch.func is _enable_checkpointing:
            del model.__dict__[name]
    embeddings = _input_embeddings(model)
    if embeddings is not None:
        for key in [k for k, h in embeddings._forward_hooks.items() if h is _outputs_require_grad]:
            del embeddings._forward_hooks[key]


def _insert(model: nn.Module, config, adapter_name: str, layers: dict) -> list:
    """Freeze every parameter, put `layers` in place and record the state; returns the layers."""
    flags = freeze(model)
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    _declare_ties(model, layers)
    model.__dict__[STATE_ATTR] = PatchState(config, adapter_name, list(layers), flags,
                                            nested_tensor_flags=_keep_off_fast_paths(model, list(layers)))
    return list(layers.values())


def _declare_ties(model: nn.Module, layers: dict) -> None:
    """A wrapped layer whose weight is another module's too (an LM head tied to the input embeddings) declares the
    tie under its new name, as transformers' models declare theirs, so that save_pretrained keeps one copy. Merging
    into a tied weight changes both modules, as in peft, which warns about it as this does."""
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    for name, layer in layers.items():
        tied = [n for n in names.get(id(getattr(layer.base_layer, "weight", None)), []) if not n.startswith(name + ".")]
        if tied:
            layer._tied_weights_keys = {"base_layer.weight": tied[0]}
            warnings.warn(f"peftops: {name}'s weight is tied to {tied[0]}; merging the adapter into it would change "
                          f"{tied[0]} too", stacklevel=5)


def patch_lora(model: nn.Module, config: LoraConfig, adapter_name: str) -> nn.Module:
    check_unpatched(model)
    explicit = config.target_modules is not None
    targets = config.target_modules if explicit else default_lora_targets(model)
    # validates everything before the model is touched
    found = find_targets(model, targets, explicit, exclude=config.exclude_modules,
                         layers=(config.layers_to_transform, config.layers_pattern))
    for attr in ("rank_pattern", "alpha_pattern"):  # as peft, which warns the same
        unmatched = [k for k in getattr(config, attr) if not any(matches_pattern(k, name) for name, _ in found)]
        if unmatched:
            warnings.warn(f"peftops: {attr} keys {unmatched} match no targeted module and are ignored", stacklevel=3)
    layers = _insert(model, config, adapter_name,
                     {name: LoraLinear(module, *config.rank_and_scaling(name), config.dropout, config.use_dora)
                      for name, module in found})
    # Bias training as peft's: "all" trains every bias of the model, "lora_only" those of the adapted layers.
    if config.bias == "all":
        for n, p in model.named_parameters():
            if n == "bias" or n.endswith(".bias"):
                p.requires_grad_(True)
    elif config.bias == "lora_only":
        for layer in layers:
            if layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)
    return model


def ia3_modules(model: nn.Module, config: IA3Config) -> tuple:
    """(target_modules, feedforward_modules) as resolved for this model (peft's family defaults where None)."""
    return default_ia3_modules(model, config.target_modules, config.feedforward_modules)


def patch_ia3(model: nn.Module, config: IA3Config, adapter_name: str) -> nn.Module:
    check_unpatched(model)
    targets, feedforward = ia3_modules(model, config)
    found = find_targets(model, targets, config.target_modules is not None, technique="IA3",
                         exclude=config.exclude_modules)
    _insert(model, config, adapter_name,
            {name: Ia3Linear(module, is_feedforward(feedforward, name)) for name, module in found})
    get_state(model).gated_blocks = fuse_gated_blocks(model)
    return model


def unpatch_layers(model: nn.Module, merge: bool = False) -> nn.Module:
    state = get_state(model)
    unfuse_gated_blocks(model, state.gated_blocks)
    for name in state.layer_names:
        layer = model.get_submodule(name)
        if merge:
            if "_tied_weights_keys" in layer.__dict__:
                warnings.warn(f"peftops: merging {name} into its weight changes "
                              f"{layer._tied_weights_keys['base_layer.weight']} too, whose weight it is", stacklevel=3)
            layer.merge()
        _set_submodule(model, name, layer.base_layer)
    restore_flags(model, state.requires_grad)
    for encoder, flag in state.nested_tensor_flags:
        encoder.use_nested_tensor = flag
    del model.__dict__[STATE_ATTR]
    return model
