"""Affines, rotations and rigid transforms.

Conventions used everywhere in the engine:

- World coordinates are LPS millimetres, as in ITK/SimpleITK and DICOM. NIfTI headers and Slicer
  speak RAS; SimpleITK converts NIfTI on read and write, and ``LPS_TO_RAS`` converts explicitly.
- A stack's ``affine`` (4, 4) maps voxel indices (i, j, k) to LPS world, where k is the slice axis:
  ``affine[:3, :3] = direction @ diag(spacing)``, ``affine[:3, 3] = origin``.
  numpy arrays from SimpleITK are indexed [k, j, i].
- A slice's rigid motion maps a nominal world point p (from the stack affine) to the anatomy frame:
  ``x = R(r) (p - c) + c + t`` with r an axis-angle rotation vector (radians), t a translation (mm)
  and c the slice centre in nominal world coordinates (the pivot).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def image_affine(image: sitk.Image) -> np.ndarray:
    """Voxel (i, j, k) -> LPS world affine (4, 4) of a 3-D SimpleITK image."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return affine


def affine_to_geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split an affine (4, 4) into origin (3,), spacing (3,) and direction (3, 3)."""
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    return affine[:3, 3].copy(), spacing, linear / spacing


def set_image_geometry(image: sitk.Image, affine: np.ndarray) -> sitk.Image:
    """Give a SimpleITK image the geometry of a voxel -> LPS affine (4, 4); returns the image."""
    origin, spacing, direction = affine_to_geometry(affine)
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """Whether two images share their voxel grid (size, spacing, origin, direction), to within rounding."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4)
    )


def on_grid(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """The image on the reference's grid: itself when the grids match, else nearest-neighbour (0 outside)."""
    if same_grid(image, reference):
        return image
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply an affine (4, 4) to points (..., 3)."""
    return points @ affine[:3, :3].T + affine[:3, 3]


def rotvec_to_matrix_np(rotvec: np.ndarray) -> np.ndarray:
    """Rotation vectors (..., 3) radians -> float64 rotation matrices (..., 3, 3)."""
    from scipy.spatial.transform import Rotation

    rotvec = np.asarray(rotvec, dtype=np.float64)
    return Rotation.from_rotvec(rotvec.reshape(-1, 3)).as_matrix().reshape(*rotvec.shape[:-1], 3, 3)


def matrix_to_rotvec(matrix: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) -> rotation vectors (..., 3) in radians."""
    from scipy.spatial.transform import Rotation

    shape = matrix.shape[:-2]
    return Rotation.from_matrix(matrix.reshape(-1, 3, 3)).as_rotvec().reshape(*shape, 3)


def rigid_to_slice_motion(
    matrix: np.ndarray, offset: np.ndarray, centres: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Express the rigid map x = A p + b as per-slice (rotvec, translation) pivoting at centres (M, 3).

    Returns rotation vectors (M, 3) and translations (M, 3): A (p - c) + c + t = A p + b
    gives t = A c + b - c.
    """
    rotvec = np.broadcast_to(matrix_to_rotvec(matrix[None]), centres.shape).copy()
    translation = centres @ matrix.T + offset - centres
    return rotvec, translation


def kabsch(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares rigid map target ~ R source + b for paired points (P, 3); returns R (3, 3), b (3,)."""
    source_mean, target_mean = source.mean(0), target.mean(0)
    covariance = (target - target_mean).T @ (source - source_mean)
    u, _, vt = np.linalg.svd(covariance)
    sign = np.sign(np.linalg.det(u @ vt))
    rotation = u @ np.diag([1.0, 1.0, sign]) @ vt
    return rotation, target_mean - rotation @ source_mean
