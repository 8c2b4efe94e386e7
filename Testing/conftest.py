"""Shared fixtures: a small synthetic brain phantom and stacks simulated from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from GaussianSVRLib.simulate import SimulationResult, simulate_stacks


def phantom_image(size: int = 40, spacing: float = 1.2) -> tuple[sitk.Image, sitk.Image]:
    """An ellipsoidal "brain" with a darker rim, two bright "ventricles" and a smooth bias.

    Returns the volume (float32) and its mask (uint8), LPS, identity direction, centred at origin.
    """
    grid = (np.arange(size) - (size - 1) / 2) * spacing
    z, y, x = np.meshgrid(grid, grid, grid, indexing="ij")
    radius = size * spacing * 0.38
    r = np.sqrt((x / radius) ** 2 + (y / (0.85 * radius)) ** 2 + (z / (0.75 * radius)) ** 2)
    volume = np.where(r < 1.0, 1.0, 0.0) - 0.4 * ((r > 0.8) & (r < 1.0))
    for cx in (-0.3, 0.3):
        d = np.sqrt(
            ((x - cx * radius) / (0.15 * radius)) ** 2 + (y / (0.4 * radius)) ** 2 + (z / (0.2 * radius)) ** 2
        )
        volume = volume + 1.5 * (d < 1.0)
    volume = volume * (1.0 + 0.1 * x / radius)
    image = sitk.GetImageFromArray(volume.astype(np.float32) * 1000.0)
    image.SetSpacing((spacing,) * 3)
    image.SetOrigin((float(grid[0]),) * 3)
    mask = sitk.GetImageFromArray((r < 1.05).astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask


@pytest.fixture(scope="session")
def phantom() -> tuple[sitk.Image, sitk.Image]:
    return phantom_image()


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
