"""The engine's Python packages inside Slicer: what is there, and what to install, never at import time.

torch comes through the PyTorch extension (it picks the CUDA build that matches the driver); faiss-cpu
(optional: the engine falls back to torch for the neighbour search) through pip, with Slicer's own
numpy pinned so that pip cannot replace it. Nothing here imports torch or faiss: versions are read
from package metadata, and faiss is only ever imported by the worker process.
"""

from __future__ import annotations

import enum
import importlib.metadata
import importlib.util
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

TORCH_MINIMUM = "2.2"
FAISS_REQUIREMENT = "faiss-cpu>=1.8"
FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11")
#: Slicer ships these; pip must never replace them (pinned to the installed version when known).
PROTECTED_DISTRIBUTIONS = ("numpy", "vtk", "SimpleITK")


class Action(enum.Enum):
    NEED_PYTORCH_EXTENSION = "need the PyTorch extension"
    INSTALL_TORCH = "install torch"
    INSTALL_FAISS = "install faiss-cpu"


@dataclass(frozen=True)
class Environment:
    """Installed versions (None: absent) and whether the PyTorch extension's module is available."""

    torch: str | None
    faiss: str | None
    pytorch_extension: bool
    protected: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    action: Action
    required: bool
    reason: str


def installed_version(
    distribution: str, version: Callable[[str], str] = importlib.metadata.version
) -> str | None:
    try:
        return version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe(
    version: Callable[[str], str] = importlib.metadata.version,
    find_spec: Callable[[str], object] = importlib.util.find_spec,
) -> Environment:
    """What this Python has, without importing torch or faiss."""
    faiss = next(
        (v for v in (installed_version(d, version) for d in FAISS_DISTRIBUTIONS) if v is not None),
        None,
    )
    return Environment(
        torch=installed_version("torch", version),
        faiss=faiss,
        pytorch_extension=find_spec("PyTorchUtils") is not None,
        protected={d: installed_version(d, version) for d in PROTECTED_DISTRIBUTIONS},
    )


def version_at_least(version: str, minimum: str) -> bool:
    """Compare the numeric release parts ('2.13.0+cpu' >= '2.2')."""

    def release(text: str) -> tuple[int, ...]:
        match = re.match(r"\d+(\.\d+)*", text.strip())
        return tuple(int(part) for part in match.group(0).split(".")) if match else ()

    have, need = release(version), release(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def plan(env: Environment, faiss_declined: bool = False) -> list[Step]:
    """The steps before a run can start, in order; required steps must succeed, optional ones may not."""
    steps: list[Step] = []
    if env.torch is None or not version_at_least(env.torch, TORCH_MINIMUM):
        found = "not installed" if env.torch is None else f"version {env.torch} is too old"
        if env.pytorch_extension:
            steps.append(Step(Action.INSTALL_TORCH, True, f"PyTorch {found}; need >={TORCH_MINIMUM}"))
        else:
            steps.append(
                Step(
                    Action.NEED_PYTORCH_EXTENSION,
                    True,
                    f"PyTorch {found}. Install the 'PyTorch' extension from the Extensions Manager, "
                    "restart Slicer, and try again.",
                )
            )
    if env.faiss is None and not faiss_declined:
        steps.append(
            Step(
                Action.INSTALL_FAISS,
                False,
                "faiss-cpu makes the neighbour search faster (optional, about 30 MB)",
            )
        )
    return steps


def constraints_text(protected: Mapping[str, str | None]) -> str:
    """A pip constraints file that pins Slicer's own packages to their installed versions."""
    return "".join(f"{name}=={version}\n" for name, version in sorted(protected.items()) if version)


def pip_install_arguments(requirement: str, constraints_file: str) -> list[str]:
    """Arguments after the interpreter: install ``requirement`` without touching pinned packages."""
    return ["-m", "pip", "install", "--disable-pip-version-check", requirement, "-c", constraints_file]
