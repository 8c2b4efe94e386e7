"""The one place where the compute device and the number of CPU threads are chosen."""

from __future__ import annotations

import os
import typing

import SimpleITK as sitk
import torch

from .errors import InputError
from .settings import DeviceName

DEVICES: tuple[str, ...] = typing.get_args(DeviceName)


def choose_device(name: str = "auto") -> torch.device:
    """ "auto" takes CUDA when torch sees a GPU, else the CPU; asking for CUDA without one is an error."""
    if name not in DEVICES:
        raise InputError(None, f"unknown device {name!r}, expected one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError(None, "--device cuda was asked for, but torch sees no CUDA GPU")
    return torch.device(name)


def cpu_threads() -> int:
    """The CPUs this process may run on (its affinity: a cohort worker pins each run to its share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_cpu_threads() -> int:
    """Make torch (and through it the numba kernels), SimpleITK and the neighbour search use the CPUs this
    process may run on, and no more; returns their number."""
    threads = cpu_threads()
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return threads
