"""Specks: voxels outside the brain, beyond a margin, brighter than the brain's median.

Outside its masks nothing is fitted, so whatever is bright there is an artifact of the Gaussians'
tails (issue 11); the margin spares the bright CSF rim that belongs to the brain's edge.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Voxels closer than this to the brain mask are not counted (mm).
SPECK_MARGIN_MM = 3.0


def bright_outside(
    volume: np.ndarray,
    brain: np.ndarray,
    spacing: tuple[float, float, float],
    known: np.ndarray | None = None,
    margin_mm: float = SPECK_MARGIN_MM,
) -> int:
    """The voxels of volume [k, j, i] farther than margin_mm from the brain (bool, same grid, voxel
    spacing (k, j, i) mm) and brighter than the volume's median inside it; only where ``known``
    (bool) is, if given (a reference's field of view)."""
    if not brain.any():
        raise ValueError("the brain mask is empty: there is no median to compare with")
    distance = ndimage.distance_transform_edt(~brain, sampling=spacing)
    bright = (distance > margin_mm) & (volume > np.median(volume[brain]))
    if known is not None:
        bright &= known
    return int(bright.sum())
