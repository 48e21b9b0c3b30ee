"""Per-instance, reversible forward replacement: how every patching mode takes over a module it keeps in place."""
import functools
import threading

import torch

_SAVED = "_peftops_saved_forward"  # the instance's own forward before patching (None: the class's)
_CHECKPOINTED = "_peftops_checkpointed"  # set where the replaced forward does transformers' checkpointing itself


def replace_forward(module, forward) -> None:
    module.__dict__[_SAVED] = module.__dict__.get("forward")
    # (an instance forward already there, as accelerate's hooks set, calls the class's wrapper itself)
    if module.__dict__[_SAVED] is None and _checkpoints_its_class_forward(module):
        forward = functools.partial(_checkpointed, forward)
        module.__dict__[_CHECKPOINTED] = True
    # a partial of a module-level function, not a bound method: it pickles (torch.save of a patched model), where a
    # bound method would be looked up by name on the module when loaded
    module.forward = functools.partial(forward, module)


def _checkpoints_its_class_forward(module) -> bool:
    """Whether module is a transformers layer that checkpoints by wrapping its class's forward (recent 5.x releases;
    the wrapper is the outermost, `__wrapped__` the class's own), which a forward set on the instance bypasses; 4.x
    and the first 5.x releases wrap __call__, which the instance forward runs under."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return False
    return isinstance(module, GradientCheckpointingLayer) and "__call__" not in vars(GradientCheckpointingLayer)


def _checkpointed(forward, module, *args, **kwargs):
    """What transformers' class-forward wrapper does (GradientCheckpointingLayer as of 5.24), around a replaced forward:
    under checkpointing in training, no cache (a recompute would write it twice) and the forward run through the
    model's checkpoint function."""
    if not (module.gradient_checkpointing and module.training and torch.is_grad_enabled()):
        return forward(module, *args, **kwargs)
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    if not getattr(module, "_can_checkpoint_with_cache", False):
        kwargs.update({key: None for key in ("cache", "layer_past") if kwargs.get(key) is not None})
    return module._gradient_checkpointing_func(functools.partial(forward, module, **kwargs), *args)


def call_original(module, *args, **kwargs):
    """Runs the forward the module had before it was patched (a plain call, so torch.compile traces through it)."""
    saved = module.__dict__[_SAVED]
    if saved is not None:
        return saved(*args, **kwargs)
    forward = type(module).forward
    if module.__dict__.get(_CHECKPOINTED):  # the replaced forward checkpoints already: the class's, unwrapped
        forward = forward.__wrapped__
    return forward(module, *args, **kwargs)


def restore_forward(module) -> None:
    module.__dict__.pop(_CHECKPOINTED, None)
    saved = module.__dict__.pop(_SAVED)
    if saved is None:
        del module.forward
    else:
        module.forward = saved


def is_replaced(module) -> bool:
    return _SAVED in module.__dict__


def thread_slot() -> int:
    """The key under which a replaced forward leaves a tensor for another module of the same call: the calling
    thread's (threads may share a model), or 0 while tracing (there the tensor is a value of the graph)."""
    return 0 if torch.compiler.is_compiling() else threading.get_ident()


def one_dtype_for_ops(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether a fused op sees x and these tensors in one dtype: they share it, or autocast casts them all to its own
    (as it does for nn.Linear; it leaves float64 alone)."""
    dtypes = {x.dtype, *(t.dtype for t in others)}
    if len(dtypes) == 1:
        return True
    return x.device.type != "meta" and torch.is_autocast_enabled(x.device.type) and torch.float64 not in dtypes
