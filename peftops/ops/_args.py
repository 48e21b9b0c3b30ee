"""The functional ops' first check, before any attribute of an argument is read."""
import numbers

import torch


def _type_name(value) -> str:
    """`float`, or `numpy.bool` for a type outside the builtins (a bare `bool` there would read as Python's)."""
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def check_tensors(op: str, optional=(), **args) -> None:
    """TypeError naming the argument when one is not a dense tensor (None is allowed for the names in `optional`)."""
    for name, value in args.items():
        if value is None and name in optional:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {_type_name(value)}")
        if value.layout != torch.strided:
            raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout {value.layout}")


def as_float(op: str, name: str, value) -> float:
    """A number argument (`scale`, `dropout_p`, `p`) as a Python float: a real number or a one-element tensor that
    needs no gradient (the ops take it as a constant); TypeError or ValueError naming the argument otherwise."""
    if isinstance(value, torch.Tensor):
        if torch.compiler.is_compiling():  # the op's schema takes a float, which a traced tensor's value is not
            raise TypeError(f"{op}: {name} must be a Python number under torch.compile, got a tensor")
        if value.numel() != 1:
            raise ValueError(f"{op}: {name} must be a number, got a tensor of shape {tuple(value.shape)}")
        if value.requires_grad:
            raise ValueError(f"{op}: {name} is a tensor that requires grad, but {op} takes it as a constant "
                             "(no gradient flows to it); pass a float or a detached tensor")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {_type_name(value)}")
    return float(value)


def check_dropout_p(op: str, name: str, p: float, training: bool) -> None:
    """A dropout probability in [0, 1); 1 too where dropout is off (eval), as nn.Dropout's eval takes it."""
    if not (0.0 <= p < 1.0 or (not training and p == 1.0)):
        raise ValueError(f"{op}: {name} must be in [0, 1){'' if training else ' (or 1 in eval)'}, got {p}")


def check_flag(op: str, name: str, value) -> bool:
    """A bool keyword (`training`, `is_causal`, `feedforward`, `save_output`); TypeError naming it otherwise (None is
    not False)."""
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {_type_name(value)}")
    return value
