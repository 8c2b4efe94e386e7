"""Shared fixtures: a small phantom made from the bundled atlas, and stacks simulated from it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from GaussianSVRLib.geometry import apply_affine, image_affine

# With --import-mode=importlib nothing is on sys.path: the shared helpers (testkit.py) live here.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from GaussianSVRLib.io.gaussians_file import load_gaussians, save_gaussians
from GaussianSVRLib.sim.simulate import SimulationResult, simulate_stacks

ATLAS = Path(__file__).resolve().parent.parent / "GaussianSVRLib" / "data" / "atlas"
#: Gaussian standard deviation of phantom_gaussians as a fraction of the voxel size (the grid sums
#: to a flat field).
SIGMA_FRACTION = 0.6


def phantom_image(spacing: float = 1.6) -> tuple[sitk.Image, sitk.Image]:
    """The bundled 28-week atlas brain, smoothed and resampled to `spacing` mm: real anatomy, small.

    Returns the volume (float32) and its brain mask (uint8) with the atlas geometry (LPS).
    """
    volume = sitk.ReadImage(str(ATLAS / "SB_GA28_operated_T2w.nii.gz"), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(ATLAS / "SB_GA28_operated_brainmask.nii.gz"), sitk.sitkUInt8)
    size = [int(round(n * s / spacing)) for n, s in zip(volume.GetSize(), volume.GetSpacing(), strict=True)]
    smoothed = sitk.SmoothingRecursiveGaussian(volume, spacing / 2.3548)
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing((spacing,) * 3)
    grid.SetOrigin(volume.GetOrigin())
    grid.SetDirection(volume.GetDirection())
    small = sitk.Resample(smoothed, grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    small_mask = sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return small, small_mask


@pytest.fixture(scope="session")
def phantom() -> tuple[sitk.Image, sitk.Image]:
    return phantom_image()


@pytest.fixture(scope="session")
def phantom_fine() -> tuple[sitk.Image, sitk.Image]:
    """The phantom at 1.2 mm: detail enough for registration and resolution measurements."""
    return phantom_image(1.2)


@pytest.fixture(scope="session")
def phantom_stacks(tmp_path_factory: pytest.TempPathFactory, phantom) -> SimulationResult:
    """Three orthogonal 2 mm-thick stacks of the phantom with small per-slice motion and 1% noise."""
    volume, mask = phantom
    out: Path = tmp_path_factory.mktemp("phantom_stacks")
    return simulate_stacks(
        volume,
        mask,
        out,
        n_stacks=3,
        in_plane=1.2,
        thickness=2.4,
        max_rotation_deg=2.0,
        max_translation_mm=1.0,
        noise=0.01,
        seed=3,
    )


@pytest.fixture(scope="session")
def phantom_gaussians(phantom, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """The phantom as a perfect "reconstruction": one isotropic Gaussian per voxel of the brain mask
    dilated by 2 voxels, amplitudes so that the mixture reproduces the voxel values, written and read
    back like a run's --output-gaussians file."""
    volume, mask = phantom
    values = sitk.GetArrayFromImage(volume)
    inside = ndimage.binary_dilation(sitk.GetArrayFromImage(mask) > 0, iterations=2)
    kk, jj, ii = np.nonzero(inside)
    spacing = volume.GetSpacing()[0]
    sigma = SIGMA_FRACTION * spacing
    means = apply_affine(image_affine(volume), np.stack([ii, jj, kk], -1).astype(np.float64))
    covariances = np.broadcast_to(np.eye(3) * sigma**2, (len(means), 3, 3))
    amplitude = (spacing / (np.sqrt(2.0 * np.pi) * sigma)) ** 3
    path = tmp_path_factory.mktemp("phantom_gaussians") / "gaussians.npz"
    save_gaussians(path, means, covariances, values[kk, jj, ii] * amplitude)
    return load_gaussians(path)
