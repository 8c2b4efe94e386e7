"""Helpers shared by the Slicer-layer tests (a uniquely named module: ``conftest`` cannot be imported
reliably when several test folders have one).

Importing it puts the module's helpers (``GaussianSVRSlicer``, from GaussianSVR/) and the engine
(``GaussianSVRLib``, repository root) on the path, as inside Slicer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "GaussianSVR"
for path in (REPO, MODULE_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Engine settings small enough for a run of a few seconds on two cores.
TINY_ENGINE_ARGS = [
    "--preset", "preview", "--n-gaussians", "2000", "--k-neighbours", "8", "--device", "cpu",
    "--output-resolution", "1.5", "--seed", "0",
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
