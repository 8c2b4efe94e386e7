"""Fixtures of the Slicer-layer tests: a fresh MRML scene and phantom stacks on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from slicer_helpers import write_stack

from GaussianSVRSlicer import phantom


@pytest.fixture
def phantom_files(tmp_path: Path) -> list[Path]:
    """The three orthogonal phantom stacks as .nii.gz files."""
    return [
        write_stack(voxels, ijk_to_ras, tmp_path / f"stack{index}.nii.gz")
        for index, (voxels, ijk_to_ras) in enumerate(phantom.orthogonal_stacks())
    ]


@pytest.fixture
def scene():
    """A fresh MRML scene as ``slicer.mrmlScene`` (the slicer-core wheel has no application)."""
    import slicer

    slicer.mrmlScene = slicer.vtkMRMLScene()
    yield slicer.mrmlScene
    slicer.mrmlScene.Clear(1)
