"""The worker's command line, environment and files for one reconstruction.

The engine runs as ``PythonSlicer -m GaussianSVRLib reconstruct ...`` (any Python outside Slicer).
Its package may sit in Slicer's qt-scripted-modules folder (installed extension) or beside this
module's folder (source tree loaded with --additional-module-paths); the child gets that folder on
its PYTHONPATH either way.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import params
from .engine_path import ENGINE_PACKAGE

#: What the engine's --stack-masks takes for "this stack has no mask".
NO_MASK = "none"


@dataclass(frozen=True)
class StackFiles:
    """One input stack as the worker reads it."""

    image: Path
    mask: Path | None
    thickness: float


@dataclass(frozen=True)
class RunFiles:
    """Where one run's outputs, previews and stop file go."""

    volume: Path
    gaussians: Path  # the .vtp; the engine writes the .npz beside it
    report: Path
    qc: Path  # the QC picture (PNG)
    preview_dir: Path
    stop_file: Path

    @property
    def gaussians_npz(self) -> Path:
        return self.gaussians.with_suffix(".npz")

    @classmethod
    def in_folders(cls, output_dir: Path, work_dir: Path, base_name: str) -> RunFiles:
        """Outputs named after ``base_name`` in ``output_dir``; previews and stop file in ``work_dir``."""
        return cls(
            volume=output_dir / f"{base_name}.nii.gz",
            gaussians=output_dir / f"{base_name}_gaussians.vtp",
            report=output_dir / f"{base_name}_report.json",
            qc=output_dir / f"{base_name}_qc.png",
            preview_dir=work_dir / "preview",
            stop_file=work_dir / "stop",
        )


def safe_file_name(name: str) -> str:
    """A node name made safe as a file name stem."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return cleaned or "reconstruction"


def python_command(which: Callable[[str], str | None] = shutil.which) -> list[str]:
    """The interpreter for the worker: Slicer's PythonSlicer launcher if on PATH, else this Python."""
    launcher = which("PythonSlicer")
    return [launcher] if launcher else [sys.executable]


def worker_environment(base: Mapping[str, str], engine_dir: Path) -> dict[str, str]:
    """``base`` with ``engine_dir`` first on PYTHONPATH, and Python's output unbuffered UTF-8 (the
    runner reads the pipes as UTF-8 whatever the system's code page)."""
    env = dict(base)
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(engine_dir) + (os.pathsep + existing if existing else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def reconstruct_command(
    python: Sequence[str],
    stacks: Sequence[StackFiles],
    files: RunFiles,
    settings: Mapping[str, object],
    init_gaussians: Path | None = None,
    roi: Path | None = None,
) -> list[str]:
    """The full worker command. A stack without a mask gets the engine's NO_MASK placeholder (the
    engine propagates the given masks to it, or takes the box of ``roi``, a markups ROI file);
    init_gaussians is an earlier run's .npz to continue from."""
    if not stacks:
        raise ValueError("no input stacks")
    command = [
        *python,
        "-m",
        ENGINE_PACKAGE,
        "reconstruct",
        "--input-stacks",
        *(str(s.image) for s in stacks),
    ]
    masks = [s.mask for s in stacks]
    if any(mask is not None for mask in masks):
        command += ["--stack-masks", *(NO_MASK if mask is None else str(mask) for mask in masks)]
    command += ["--thicknesses", *(repr(float(s.thickness)) for s in stacks)]
    command += [
        "--output-volume",
        str(files.volume),
        "--output-gaussians",
        str(files.gaussians),
        "--output-json",
        str(files.report),
        "--output-qc",
        str(files.qc),
        "--preview-dir",
        str(files.preview_dir),
        "--stop-file",
        str(files.stop_file),
        "--progress",
        "json",
    ]
    if init_gaussians is not None:
        command += ["--init-gaussians", str(init_gaussians)]
    if roi is not None:
        command += ["--roi-from", str(roi)]
    return command + params.engine_arguments(settings)
