"""Choosing the device a command runs on: one rule for every command and the library.

`None` or "auto" means the first CUDA device when PyTorch sees one, else the CPU. Anything else must
name a device this machine has; a typo or a GPU the build cannot use is a one-line error before any
model is loaded, not a traceback from deep inside PyTorch.
"""
from __future__ import annotations

import torch

from .errors import RobertaError


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The torch.device for a user's `--device` value, checked against this machine."""
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise RobertaError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise RobertaError(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise RobertaError(f"device {name!r} asked for, but {why}: use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise RobertaError(f"device {name!r} does not exist: this machine has {count} CUDA device(s), "
                           f"cuda:0 to cuda:{count - 1}")
    return device
