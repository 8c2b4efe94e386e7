"""Fixtures of the Slicer-layer tests: a fresh MRML scene and phantom stacks on disk.

With ``--import-mode=importlib`` pytest puts nothing on sys.path. This folder goes there (for
``slicer_helpers``), and so do the module's folder (``GaussianSVRSlicer``) and the repository root
(``GaussianSVRLib``), as inside Slicer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parents[1] / "GaussianSVR", HERE.parents[1]):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from GaussianSVRSlicer import phantom  # noqa: E402
from slicer_helpers import TINY_PHANTOM, write_stack  # noqa: E402


@pytest.fixture
def phantom_files(tmp_path: Path) -> list[Path]:
    """The three orthogonal (tiny) phantom stacks as .nii.gz files."""
    return [
        write_stack(voxels, ijk_to_ras, tmp_path / f"stack{index}.nii.gz")
        for index, (voxels, ijk_to_ras) in enumerate(phantom.orthogonal_stacks(**TINY_PHANTOM))
    ]


@pytest.fixture
def phantom_masks(phantom_files: list[Path]) -> list[Path | None]:
    """A head mask for the first phantom stack only (the engine propagates it to the others)."""
    voxels, ijk_to_ras = phantom.orthogonal_stacks(**TINY_PHANTOM)[0]
    mask = write_stack(phantom.head_mask(voxels), ijk_to_ras, phantom_files[0].with_name("mask0.nii.gz"))
    return [mask, *(None for _ in phantom_files[1:])]


@pytest.fixture
def scene():
    """A fresh MRML scene as ``slicer.mrmlScene`` (the slicer-core wheel has no application)."""
    import slicer

    slicer.mrmlScene = slicer.vtkMRMLScene()
    yield slicer.mrmlScene
    slicer.mrmlScene.Clear(1)
