"""save_adapter / load_adapter: pick the file format from how the model is patched."""
from ..patch import adapter, backend
from ..patch.bitfit import BitFitState
from ..patch.bottleneck import BottleneckState
from ..patch.prefix import PrefixState
from .bitfit_format import load_bitfit, save_bitfit
from .bottleneck_format import load_bottleneck, save_bottleneck
from .peft_format import load_into_peft, load_peft_format, save_peft_format
from .prefix_format import load_prefix, save_prefix


def save_adapter(model, path: str):
    """Write only the trainable technique parameters: LoRA / IA3 in peft's format (backend mode: peft's own
    save_pretrained), BitFit and bottleneck adapters in peftops' own format."""
    adapter.check_model("save_adapter", model)
    if backend.is_peft_model(model):
        model.save_pretrained(path)
        return
    state = adapter.get_state(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by peftops: there is no adapter to save")
    if isinstance(state, BitFitState):
        save_bitfit(model, state, path)
    elif isinstance(state, BottleneckState):
        save_bottleneck(model, state, path)
    elif isinstance(state, PrefixState):
        save_prefix(model, state, path)
    else:
        save_peft_format(model, state, path)


def load_adapter(model, path: str):
    """Load an adapter saved by peftops (or peft, for LoRA / IA3 / prefix tuning) onto a model patched with the
    same config."""
    adapter.check_model("load_adapter", model)
    if backend.is_peft_model(model):
        return load_into_peft(model, path)
    state = adapter.get_state(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by peftops: patch it with the adapter's config first")
    if isinstance(state, BitFitState):
        return load_bitfit(model, state, path)
    if isinstance(state, BottleneckState):
        return load_bottleneck(model, state, path)
    if isinstance(state, PrefixState):
        return load_prefix(model, state, path)
    return load_peft_format(model, state, path)
