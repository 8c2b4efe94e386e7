"""The volume in standard space: the Gaussians sampled on a grid in the atlas's frame.

The reconstruction is registered to the atlas of its age (atlas/registration.py); the output grid is
laid in the atlas's orientation around the brain, and the Gaussians are sampled on it directly (not
the scanner-space volume resampled), so turning the volume costs no interpolation blur.
"""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk
import torch

from ..atlas.bundled import load_atlas
from ..atlas.registration import StandardSpace, foreground, standard_space
from ..fit.initialize import Problem
from ..geometry import image_affine, set_image_geometry
from ..settings import Settings
from .frame import Snapshot, preview_grid, volume_image
from .support import StackSlices

log = logging.getLogger(__name__)

#: Room (mm) around the brain on the standard-space grid.
MARGIN_MM = 10.0


def standard_grid(
    volume: sitk.Image, space: StandardSpace, spacing: float
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The grid (voxel -> atlas LPS affine (4, 4), shape (nk, nj, ni)) in the atlas's axes that holds the
    volume's brain with MARGIN_MM around it, at the given spacing (mm)."""
    k, j, i = np.nonzero(foreground(volume))
    scanner = np.stack([i, j, k], 1) @ image_affine(volume)[:3, :3].T + image_affine(volume)[:3, 3]
    to_atlas = np.linalg.inv(space.fit.matrix())
    points = scanner @ to_atlas[:3, :3].T + to_atlas[:3, 3]
    direction = np.asarray(load_atlas(space.fit.week).t2.GetDirection()).reshape(3, 3)
    along = points @ direction  # coordinates along the atlas's voxel axes
    low, high = along.min(axis=0) - MARGIN_MM, along.max(axis=0) + MARGIN_MM
    size = np.ceil((high - low) / spacing).astype(int) + 1
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = direction @ low
    return affine, (int(size[2]), int(size[1]), int(size[0]))


def in_standard_space(
    state: Snapshot,
    problem: Problem,
    settings: Settings,
    device: torch.device,
    brain: list[StackSlices] | None = None,
) -> tuple[sitk.Image, StandardSpace]:
    """The Gaussians sampled in the atlas frame of their age (cut to ``brain`` as volume_image does),
    and where that frame lies.

    The registration sees them on the coarse preview grid (the atlases are 1.6 mm); only the
    standard-space grid is sampled at the output resolution.
    """
    scanner_volume = volume_image(state, *preview_grid(problem), settings, device)
    space = standard_space(scanner_volume, settings.gestational_age)
    affine, shape = standard_grid(scanner_volume, space, settings.output_resolution)
    image = volume_image(state, space.fit.matrix() @ affine, shape, settings, device, brain)
    source = "estimated" if space.week_estimated else "given"
    log.info(
        "standard space: atlas week %d (%s age %.1f weeks, brain %.0f ml), correlation %.2f",
        space.fit.week, source, space.week, space.fit.brain_ml, space.fit.correlation,
    )  # fmt: skip
    return set_image_geometry(image, affine), space
