"""What the stacks saw together, and a brain found in the reconstruction frame carried back onto every
stack through each slice's fitted motion (the masks that make themselves, brain_search.py)."""

from __future__ import annotations

import numpy as np

from ..geometry import apply_affine, rotvec_to_matrix_np
from ..io.slices import SliceSet
from ..io.stacks import Stack


def grid_points(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The LPS centres (nk, nj, ni, 3) of a grid's voxels (voxel -> LPS (4, 4), shape (nk, nj, ni))."""
    k, j, i = np.indices(shape)
    return apply_affine(affine, np.stack([i, j, k], axis=-1).astype(np.float64))


def seen_by(stack: Stack, points: np.ndarray) -> np.ndarray:
    """Whether LPS points (..., 3) lie inside the stack's field of view (its voxels' extent)."""
    index = apply_affine(np.linalg.inv(stack.affine), points)
    extent = np.array(stack.data.shape[::-1])
    return np.all((index >= -0.5) & (index <= extent - 0.5), axis=-1)


def common_view(stacks: list[Stack]) -> list[np.ndarray]:
    """Per stack, its voxels [k, j, i] that every other stack sees too."""
    views = []
    for stack in stacks:
        points = grid_points(stack.affine, stack.data.shape)
        view = np.ones(stack.data.shape, dtype=bool)
        for other in stacks:
            if other is not stack:
                view &= seen_by(other, points)
        views.append(view)
    return views


def view_on_grid(stacks: list[Stack], affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The voxels [k, j, i] of a grid that every stack sees."""
    points = grid_points(affine, shape)
    view = np.ones(shape, dtype=bool)
    for stack in stacks:
        view &= seen_by(stack, points)
    return view


def masks_through_slices(
    stacks: list[Stack],
    slices: SliceSet,
    rotvec: np.ndarray,
    translation: np.ndarray,
    brain: np.ndarray,
    affine: np.ndarray,
) -> list[np.ndarray]:
    """Every stack's mask [k, j, i]: its pixels that their slice's motion puts inside ``brain`` [k, j, i]
    (bool, on the grid ``affine``). rotvec, translation (M, 3): the motions of the fitted slices of
    ``slices`` into the frame of ``brain``. A slice the fit did not hold moves as the nearest fitted one
    of its stack."""
    to_index = np.linalg.inv(affine)
    masks = []
    for s, stack in enumerate(stacks):
        fitted = np.nonzero(slices.slice_stack == s)[0]
        mask = np.zeros(stack.data.shape, dtype=bool)
        if len(fitted) == 0:
            masks.append(mask)
            continue
        nj, ni = stack.data.shape[1:]
        j, i = np.indices((nj, ni))
        rotations = rotvec_to_matrix_np(rotvec[fitted])
        for k in range(stack.data.shape[0]):
            nearest = int(np.argmin(np.abs(slices.slice_k[fitted] - k)))
            m = fitted[nearest]
            pixels = np.stack([i, j, np.full_like(i, k)], axis=-1).astype(np.float64)
            nominal = apply_affine(stack.affine, pixels)
            centre = slices.slice_centre[m]
            moved = (nominal - centre) @ rotations[nearest].T + centre + translation[m]
            index = np.rint(apply_affine(to_index, moved)).astype(np.int64)[..., ::-1]
            inside = np.all((index >= 0) & (index < np.array(brain.shape)), axis=-1)
            hit = np.zeros((nj, ni), dtype=bool)
            hit[inside] = brain[tuple(index[inside].T)]
            mask[k] = hit
        masks.append(mask)
    return masks
