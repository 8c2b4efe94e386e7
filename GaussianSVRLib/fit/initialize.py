"""Initialization: the reference stack and content-adaptive Gaussians sampled from the slices."""

from __future__ import annotations

import numpy as np
import torch

from ..io.slices import SliceSet
from ..io.stacks import Stack


def reference_index(stacks: list[Stack]) -> int:
    """The stack with the most masked voxels in world volume, among those whose mask was given (not
    propagated) if any: the anatomy frame is its frame."""
    given = any(stack.mask_path is not None for stack in stacks)
    volumes = [
        stack.mask.sum() * float(np.prod(stack.spacing)) if stack.mask_path is not None or not given else -1.0
        for stack in stacks
    ]
    return int(np.argmax(volumes))


def in_plane_gradient(stacks: list[Stack], slices: SliceSet) -> np.ndarray:
    """Gradient magnitude (P,) of every pixel within its slice, in intensity per mm."""
    magnitude = np.zeros(slices.n_pixels, dtype=np.float32)
    stack_of_pixel = slices.slice_stack[slices.pixel_slice]
    for s, stack in enumerate(stacks):
        gj, gi = np.gradient(stack.data, stack.spacing[1], stack.spacing[0], axis=(1, 2))
        on_stack = stack_of_pixel == s
        magnitude[on_stack] = np.hypot(gi, gj).ravel()[slices.pixel_index[on_stack]]
    return magnitude


def sample_centres(
    slices: SliceSet,
    gradient: np.ndarray,
    n: int,
    edge_fraction: float,
    thickness: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Content-adaptive sampling of n pixels: p ~ edge_fraction |grad I| / mean + (1 - edge_fraction).

    Returns the chosen pixel indices (n,) and nominal positions (n, 3) jittered through the slab
    each pixel integrates (uniform over the slice thickness along the slice normal).
    thickness (M,) is the slice thickness of each slice in mm.
    """
    weight = edge_fraction * gradient / max(float(gradient.mean()), 1e-12) + (1.0 - edge_fraction)
    weight = weight + 1e-12
    n = min(n, slices.n_pixels)
    chosen = rng.choice(slices.n_pixels, size=n, replace=False, p=weight / weight.sum())
    slice_id = slices.pixel_slice[chosen]
    normal = slices.slice_axes[slice_id, :, 2]
    offset = (rng.random(n) - 0.5) * thickness[slice_id]
    return chosen, slices.positions[chosen] + normal * offset[:, None]


def initial_scales(centres: np.ndarray, neighbours: int = 4) -> np.ndarray:
    """Isotropic scales (n,) in mm: half the mean distance to the nearest sampled centres."""
    from scipy.spatial import cKDTree

    distance, _ = cKDTree(centres).query(centres, k=neighbours + 1, workers=-1)
    return 0.5 * distance[:, 1:].mean(axis=1)


def initial_intensity_gain(values: torch.Tensor, predicted: torch.Tensor) -> float:
    """The global factor that makes a freshly seeded mixture (overlapping Gaussians) match the data."""
    return float((values * predicted).sum() / (predicted * predicted).sum().clamp_min(1e-12))
