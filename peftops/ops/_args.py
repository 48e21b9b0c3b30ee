"""The functional ops' first check, before any attribute of an argument is read."""
import torch


def check_tensors(op: str, optional=(), **args) -> None:
    """TypeError naming the argument when one is not a tensor (None is allowed for the names in `optional`)."""
    for name, value in args.items():
        if not isinstance(value, torch.Tensor) and not (value is None and name in optional):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
