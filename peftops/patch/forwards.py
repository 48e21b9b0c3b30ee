"""Per-instance, reversible forward replacement: how every patching mode takes over a module it keeps in place."""
import functools
import threading

import torch

_SAVED = "_peftops_saved_forward"  # the instance's own forward before patching (None: the class's)


def replace_forward(module, forward) -> None:
    module.__dict__[_SAVED] = module.__dict__.get("forward")
    # a partial of a module-level function, not a bound method: it pickles (torch.save of a patched model), where a
    # bound method would be looked up by name on the module when loaded
    module.forward = functools.partial(forward, module)


def call_original(module, *args, **kwargs):
    """Runs the forward the module had before it was patched (a plain call, so torch.compile traces through it)."""
    saved = module.__dict__[_SAVED]
    return saved(*args, **kwargs) if saved is not None else type(module).forward(module, *args, **kwargs)


def restore_forward(module) -> None:
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
