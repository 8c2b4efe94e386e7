"""The one place where the compute device is chosen."""

from __future__ import annotations

import torch

from .errors import InputError

DEVICES = ("auto", "cpu", "cuda")


def choose_device(name: str = "auto") -> torch.device:
    """ "auto" takes CUDA when torch sees a GPU, else the CPU; asking for CUDA without one is an error."""
    if name not in DEVICES:
        raise InputError(None, f"unknown device {name!r}, expected one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError(None, "--device cuda was asked for, but torch sees no CUDA GPU")
    return torch.device(name)
