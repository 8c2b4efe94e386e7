"""Constants and helpers shared by the Slicer-layer tests (conftest.py puts this folder on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "GaussianSVR"

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: A phantom and engine settings small enough for a run of about ten CPU seconds
#: (3 stacks of 16 x 16 x 10 voxels; a checkpoint every second).
TINY_PHANTOM = {"fov_mm": 40.0, "in_plane_mm": 2.5, "slice_mm": 4.0}
TINY_SETTINGS = {
    "nGaussians": 500,
    "kNeighbours": 8,
    "iterations": 5,
    "outputResolution": 2.5,
    "previewInterval": 1.0,
}
TINY_ENGINE_ARGS = [
    "--preset", "preview", "--n-gaussians", "500", "--k-neighbours", "8", "--device", "cpu",
    "--output-resolution", "2.5", "--checkpoint-interval", "1", "--seed", "0",
]  # fmt: skip


def write_stack(voxels: np.ndarray, ijk_to_ras: np.ndarray, path: Path) -> Path:
    """Write voxels (k, j, i) with an IJK-to-RAS affine as an image file (LPS geometry, SimpleITK)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(voxels)
    affine = RAS_TO_LPS @ ijk_to_ras
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in affine[:3, 3]])
    image.SetDirection([float(v) for v in (affine[:3, :3] / spacing).ravel()])
    sitk.WriteImage(image, str(path))
    return path
