"""A tiny synthetic head phantom sampled into three orthogonal thick-slice stacks (numpy only).

Used by the module's self-test inside Slicer and by the pytest layers; coordinates are RAS mm,
centred on the origin. Arrays are indexed [k, j, i] (k = slice axis), as Slicer and SimpleITK do.
"""

from __future__ import annotations

import numpy as np

#: (centre RAS mm, semi-axes mm, value): a head-like ellipsoid, two dark "ventricles", one bright spot
#: off the symmetry planes so that a flipped axis would show.
_BLOBS = (
    ((0.0, 0.0, 0.0), (15.0, 19.0, 13.0), 1.0),
    ((-5.0, 2.0, 3.0), (3.0, 6.0, 4.0), -0.7),
    ((5.0, 2.0, 3.0), (3.0, 6.0, 4.0), -0.7),
    ((6.0, -9.0, -4.0), (3.0, 3.0, 3.0), 0.8),
)

#: Columns: RAS directions of the i, j and k axes (right-handed), for axial, coronal and sagittal stacks.
ORIENTATIONS = (
    np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]]),  # i=R, j=A, k=S
    np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]),  # i=R, j=S, k=P
    np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]]),  # i=A, j=S, k=R
)


def phantom_values(points: np.ndarray) -> np.ndarray:
    """Phantom intensity (P,) at RAS points (P, 3)."""
    values = np.zeros(len(points))
    for centre, axes, value in _BLOBS:
        inside = (((points - np.asarray(centre)) / np.asarray(axes)) ** 2).sum(axis=1) <= 1.0
        values += value * inside
    return values


def orthogonal_stacks(
    fov_mm: float = 48.0, in_plane_mm: float = 1.5, slice_mm: float = 3.0, samples_per_slice: int = 3
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Three stacks (axial, coronal, sagittal) as (voxels (k, j, i) float32, IJK-to-RAS (4, 4)).

    Each voxel averages ``samples_per_slice`` points across the slice thickness (a box slice profile).
    """
    n_in_plane = int(round(fov_mm / in_plane_mm))
    n_slices = int(round(fov_mm / slice_mm))
    spacing = np.array([in_plane_mm, in_plane_mm, slice_mm])
    size = np.array([n_in_plane, n_in_plane, n_slices])
    k, j, i = np.meshgrid(np.arange(n_slices), np.arange(n_in_plane), np.arange(n_in_plane), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(np.float64)
    offsets = (np.arange(samples_per_slice) + 0.5) / samples_per_slice - 0.5
    stacks = []
    for directions in ORIENTATIONS:
        ijk_to_ras = np.eye(4)
        ijk_to_ras[:3, :3] = directions @ np.diag(spacing)
        ijk_to_ras[:3, 3] = -ijk_to_ras[:3, :3] @ ((size - 1) / 2.0)
        points = ijk @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]
        values = np.mean(
            [phantom_values(points + offset * slice_mm * directions[:, 2]) for offset in offsets], axis=0
        )
        stacks.append(
            (values.reshape(n_slices, n_in_plane, n_in_plane).astype(np.float32) * 100.0, ijk_to_ras)
        )
    return stacks


def head_mask(voxels: np.ndarray) -> np.ndarray:
    """The phantom head's mask (uint8, same shape) on a stack's voxels: where there is signal."""
    return (voxels > 0).astype(np.uint8)
