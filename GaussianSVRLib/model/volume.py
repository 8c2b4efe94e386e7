"""The output grid and the Gaussians rendered onto it."""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import InputError
from . import forward
from .neighbours import knn
from .psf import to_sym6

#: Millimetres of grid added around the masked region on every side.
GRID_MARGIN_MM = 4.0
#: Bytes of memory one output voxel costs while rendering and writing (volume, copies, index chunks).
BYTES_PER_VOXEL = 16
#: Voxels rendered per chunk: bounds the (chunk, K) temporaries.
RENDER_CHUNK = 1 << 17


def available_memory() -> int:
    """Physical memory in bytes (POSIX), or a conservative 8 GiB where it cannot be read."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def grid_covering(
    points: np.ndarray, direction: np.ndarray, resolution: float, margin: float = GRID_MARGIN_MM
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An isotropic grid with the given direction (3, 3) covering points (P, 3) plus a margin.

    Returns the voxel -> LPS affine (4, 4) and the array shape (nk, nj, ni).
    """
    local = points @ direction
    low = local.min(0) - margin
    high = local.max(0) + margin
    size = np.ceil((high - low) / resolution).astype(np.int64) + 1
    affine = np.eye(4)
    affine[:3, :3] = direction * resolution
    affine[:3, 3] = direction @ low
    return affine, (int(size[2]), int(size[1]), int(size[0]))


def check_grid_fits(shape: tuple[int, int, int], resolution: float, path: str | None) -> None:
    """Refuse a grid that cannot be held in memory, before any work is done."""
    voxels = float(np.prod(np.asarray(shape, dtype=np.float64)))
    needed = voxels * BYTES_PER_VOXEL
    if voxels >= 2**31 or needed > 0.5 * available_memory():
        raise InputError(
            path,
            f"output grid of {shape[2]} x {shape[1]} x {shape[0]} voxels at {resolution} mm needs "
            f"{needed / 2**30:.1f} GiB, more than this machine can hold; raise --output-resolution",
        )


def render(
    means: torch.Tensor,
    covariances: torch.Tensor,
    intensities: torch.Tensor,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    k: int,
    backend: str = "auto",
    normalized: bool = False,
) -> np.ndarray:
    """The Gaussian mixture (no PSF) sampled on a grid: float32 array shaped (nk, nj, ni).

    means (N, 3), covariances (N, 3, 3), intensities (N,) in LPS mm; affine maps voxel (i, j, k)
    to LPS. normalized: the volume of a field fitted with the normalized forward model (the
    weighted mean of the neighbours' intensities), which must be rendered the same way.
    """
    device = means.device
    cov6 = to_sym6(covariances)
    det = torch.linalg.det(covariances)
    nk, nj, ni = shape
    linear = torch.as_tensor(affine[:3, :3], dtype=means.dtype, device=device)
    offset = torch.as_tensor(affine[:3, 3], dtype=means.dtype, device=device)
    jj, ii = torch.meshgrid(
        torch.arange(nj, device=device, dtype=means.dtype),
        torch.arange(ni, device=device, dtype=means.dtype),
        indexing="ij",
    )
    plane = torch.stack([ii.ravel(), jj.ravel(), torch.zeros_like(ii.ravel())], -1)
    out = np.zeros(shape, dtype=np.float32)
    k = min(k, means.shape[0])
    slices_per_chunk = max(1, RENDER_CHUNK // (ni * nj))
    with torch.no_grad():
        for k0 in range(0, nk, slices_per_chunk):
            ks = torch.arange(k0, min(k0 + slices_per_chunk, nk), device=device, dtype=means.dtype)
            index = plane[None].repeat(len(ks), 1, 1)
            index[..., 2] = ks[:, None]
            points = index.reshape(-1, 3) @ linear.T + offset
            neighbours = knn(means, points, k, backend)
            mode = "normalized" if normalized else "none"
            values = forward.evaluate(points, neighbours, means, cov6, det, intensities, None, mode)
            out[k0 : k0 + len(ks)] = values.reshape(len(ks), nj, ni).cpu().numpy()
    return out
