"""The engine's Python packages inside Slicer: what is there, and what to install, never at import time.

The worker (run with PythonSlicer) imports torch, the packages Slicer ships (numpy, vtk, SimpleITK)
and those in ``PACKAGES``. torch comes through the PyTorch extension (it picks the CUDA build that
matches the driver); ``PACKAGES`` through pip, with Slicer's own packages pinned so that pip cannot
replace them. Nothing here imports any of them: versions are read from package metadata.

Left out on purpose: tqdm (the worker runs with ``--progress json``; only the terminal bar imports
it) and faiss (the engine's automatic neighbour search uses scipy's k-d tree on the CPU and faiss
only when it has GPU support, which faiss-cpu has not).
"""

from __future__ import annotations

import enum
import importlib.metadata
import importlib.util
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

TORCH_MINIMUM = "2.2"
#: Slicer ships these; pip must never replace them (pinned to the installed version when known).
PROTECTED_DISTRIBUTIONS = ("numpy", "vtk", "SimpleITK")
#: The version of a package that imports but has no metadata (e.g. a source build): taken as good.
UNKNOWN_VERSION = "unknown"


@dataclass(frozen=True)
class Package:
    """A pip package the worker imports; ``minimum`` as in the engine's pyproject.toml."""

    distribution: str
    minimum: str
    required: bool
    why: str
    module: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.distribution}>={self.minimum}"

    @property
    def import_name(self) -> str:
        return self.module or self.distribution


#: Official Slicer builds ship scipy (Slicer_USE_SCIPY, ON by default); custom builds may not.
PACKAGES = (
    Package("scipy", "1.10", True, "the engine's neighbour search (k-d tree) and rotations"),
    Package(
        "numba",
        "0.60",
        False,
        "CPU speed: fused kernels about 9x faster than plain PyTorch (about 60 MB to download; the first run "
        "compiles them once, about 20 s)",
    ),
)


class Action(enum.Enum):
    NEED_PYTORCH_EXTENSION = "need the PyTorch extension"
    INSTALL_TORCH = "install torch"
    PIP_INSTALL = "pip install"


@dataclass(frozen=True)
class Environment:
    """Installed versions (None: absent; UNKNOWN_VERSION: importable without metadata)."""

    torch: str | None
    pytorch_extension: bool
    packages: Mapping[str, str | None]
    protected: Mapping[str, str | None]


@dataclass(frozen=True)
class Step:
    """One thing to do before a run; a required step must succeed, an optional one may be declined."""

    action: Action
    required: bool
    reason: str
    package: Package | None = None


def installed_version(
    distribution: str,
    version: Callable[[str], str] = importlib.metadata.version,
    find_spec: Callable[[str], object] | None = None,
    module: str = "",
) -> str | None:
    """The version from metadata; UNKNOWN_VERSION if only ``find_spec(module)`` finds it; else None."""
    try:
        return version(distribution)
    except importlib.metadata.PackageNotFoundError:
        if find_spec is not None and find_spec(module or distribution) is not None:
            return UNKNOWN_VERSION
        return None


def probe(
    version: Callable[[str], str] = importlib.metadata.version,
    find_spec: Callable[[str], object] = importlib.util.find_spec,
    packages: Sequence[Package] = PACKAGES,
) -> Environment:
    """What this Python has, without importing any of it (find_spec of a top-level name imports nothing)."""
    return Environment(
        torch=installed_version("torch", version),
        pytorch_extension=find_spec("PyTorchUtils") is not None,
        packages={
            p.distribution: installed_version(p.distribution, version, find_spec, p.import_name)
            for p in packages
        },
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


def satisfied(found: str | None, minimum: str) -> bool:
    return found == UNKNOWN_VERSION or (found is not None and version_at_least(found, minimum))


def plan(
    env: Environment, declined: Collection[str] = (), packages: Sequence[Package] = PACKAGES
) -> list[Step]:
    """The steps before a run can start: torch, then missing required packages, then missing optional
    ones unless their distribution is in ``declined`` (each is offered once)."""
    steps: list[Step] = []
    if not satisfied(env.torch, TORCH_MINIMUM):
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
    missing = [p for p in packages if not satisfied(env.packages.get(p.distribution), p.minimum)]
    for package in sorted(missing, key=lambda p: not p.required):
        if not package.required and package.distribution in declined:
            continue
        found = env.packages.get(package.distribution)
        state = "is not installed" if found is None else f"{found} is older than {package.minimum}"
        kind = "needed" if package.required else "optional"
        reason = f"{package.distribution} {state} ({kind}: {package.why})"
        steps.append(Step(Action.PIP_INSTALL, package.required, reason, package))
    return steps


def constraints_text(protected: Mapping[str, str | None]) -> str:
    """A pip constraints file that pins Slicer's own packages to their installed versions."""
    return "".join(f"{name}=={version}\n" for name, version in sorted(protected.items()) if version)


def pip_install_arguments(requirement: str, constraints_file: str) -> list[str]:
    """Arguments after the interpreter: install ``requirement`` without touching pinned packages.

    Wheels only: Slicer users rarely have a compiler, and a resolver that cannot satisfy the pins
    would otherwise fall back to building an old release from source; this way it fails at once with
    a readable message. No prompts: pip runs without a terminal.
    """
    return [
        "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--only-binary", ":all:",
        requirement, "-c", constraints_file,
    ]  # fmt: skip
