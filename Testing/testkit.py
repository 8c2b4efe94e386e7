"""Helpers shared by the tests (the root conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from scipy.spatial.transform import Rotation

from GaussianSVRLib.geometry import apply_affine, image_affine

OBLIQUE = Rotation.from_rotvec([0.2, -0.4, 0.3]).as_matrix()
# Columns: i -> inferior, j -> patient left, k -> anterior (a permutation with flips, det -1).
PERMUTED = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]])


def make_image(
    size=(12, 10, 6), spacing=(0.8, 0.9, 3.0), direction=OBLIQUE, origin=(-12.5, 30.25, 7.0), seed=0
) -> sitk.Image:
    values = np.random.default_rng(seed).normal(100.0, 20.0, size[::-1]).astype(np.float32)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(np.asarray(direction, dtype=np.float64).ravel().tolist())
    return image


def phantom(region, size, spacing, direction, background=100.0, bright=1000.0) -> sitk.Image:
    """An image centred on the world origin, ``bright`` where region(LPS points (..., 3)) holds."""
    direction = np.asarray(direction, dtype=np.float64)
    image = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin((-(direction @ np.diag(spacing) @ ((np.asarray(size) - 1) / 2.0))).tolist())
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    world = apply_affine(image_affine(image), np.stack([i, j, k], axis=-1).astype(np.float64))
    array = np.where(region(world), bright, background).astype(np.float32)
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(image)
    return result


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def assert_same_geometry(a: sitk.Image, b: sitk.Image, atol: float) -> None:
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=atol)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=atol)


def gaussians(n=20, seed=1):
    rng = np.random.default_rng(seed)
    rotations = Rotation.random(n, random_state=seed).as_matrix()
    sigmas = rng.uniform(0.5, 3.0, (n, 3))
    covariances = np.einsum("nij,nj,nkj->nik", rotations, sigmas**2, rotations)
    means = rng.uniform(-40.0, 40.0, (n, 3))
    intensities = rng.normal(0.0, 1.0, n)
    return means.astype(np.float32), covariances.astype(np.float32), intensities.astype(np.float32)


def random_turn(seed: int) -> np.ndarray:
    """Any axis permutation (one of the 24 rotations of the cube) and up to 45 degrees on top (3, 3)."""
    rng = np.random.default_rng(seed)
    cube = Rotation.create_group("O").as_matrix()[rng.integers(24)]
    axis = rng.normal(size=3)
    extra = Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.radians(rng.uniform(0, 45))).as_matrix()
    return cube @ extra


def rigid(rotation: np.ndarray, pivot: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """The map (4, 4) x -> rotation (x - pivot) + pivot + shift."""
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = pivot + shift - rotation @ pivot
    return matrix


def random_covariances(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """(n, 3, 3) float64 R diag(s^2) R^T with s uniform in [low, high] and R random."""
    rotation, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=generator, dtype=torch.float64))
    scales = low + (high - low) * torch.rand(n, 3, generator=generator, dtype=torch.float64)
    return (rotation * scales[:, None, :] ** 2) @ rotation.transpose(1, 2)
