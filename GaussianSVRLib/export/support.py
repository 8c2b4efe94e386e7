"""The brain the stacks agree on, in the output frame: the voxels that most stacks' masks cover,
each slice carried there by its fitted motion.

Only masked pixels are fitted, so outside the masks the Gaussians are unconstrained: their tails
leave bright specks and a ragged rim around the brain. SVRTK and NeSVoR cut their volumes to the
reconstructed mask for the same reason. A vote of the stacks, not their union, because hand-drawn
masks disagree at the edge and the union keeps every stack's most generous stroke.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ..geometry import rotvec_to_matrix_np
from ..io.slices import SliceSet
from ..io.stacks import Stack

#: Kept around the voted brain (mm): the stacks' masks are thick-slice masks, blocky by a slice,
#: and the bright CSF at the brain's edge belongs to the image.
SUPPORT_MARGIN_MM = 1.6
#: Beyond the margin the cut fades from 1 to 0 over this width (mm): a hard cut through thick-slice
#: masks leaves a staircase rim. Not inside the margin: the vote of thick-slice masks can fall short
#: of the brain by half a slice.
EDGE_FADE_MM = 1.2
#: Output voxels mapped per chunk.
CHUNK = 1 << 18


@dataclass
class StackSlices:
    """Every slice k of one stack (K = the stack's slice count) with the motion x = R (p - c) + c + t
    that carries it into the output frame: rotations R (K, 3, 3), translations t (K, 3), pivots c
    (K, 3) in nominal LPS mm. A slice the fit did not hold (no masked pixels, or excluded) moves as
    the nearest held slice of its stack."""

    stack: Stack
    rotations: np.ndarray
    translations: np.ndarray
    pivots: np.ndarray


def stack_slices(
    stack: Stack, index: int, slices: SliceSet, rotvec: np.ndarray, translation: np.ndarray, held: np.ndarray
) -> StackSlices | None:
    """The slices of stack ``index`` with their motions (rotvec, translation (M, 3), held (M,) bool of
    the fitted slices of ``slices``); None if the fit held none of its slices."""
    fitted = np.nonzero((slices.slice_stack == index) & held)[0]
    if len(fitted) == 0:
        return None
    k = np.arange(stack.data.shape[0])
    nearest = fitted[np.abs(slices.slice_k[fitted][None, :] - k[:, None]).argmin(1)]
    return StackSlices(
        stack, rotvec_to_matrix_np(rotvec[nearest]), translation[nearest], slices.slice_centre[nearest]
    )


def votes(points: torch.Tensor, carried: StackSlices) -> tuple[torch.Tensor, torch.Tensor]:
    """For output points (V, 3): whether the stack sees each (it lies in one of its slices' slabs and
    inside its field of view) and whether that slice's mask covers it, both (V,) bool."""
    device, dtype = points.device, points.dtype

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), dtype=dtype, device=device)

    rotations, translations, pivots = (
        tensor(a) for a in (carried.rotations, carried.translations, carried.pivots)
    )
    to_index = tensor(np.linalg.inv(carried.stack.affine))
    nk, nj, ni = carried.stack.data.shape
    mask = torch.as_tensor(carried.stack.mask, dtype=torch.bool, device=device)

    def slab_of(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuous stack index (V, 3) of each point seen through slice k's motion inverted."""
        nominal = torch.einsum("vji,vj->vi", rotations[k], points - pivots[k] - translations[k]) + pivots[k]
        return nominal @ to_index[:3, :3].T + to_index[:3, 3], k

    middle = torch.full((len(points),), nk // 2, dtype=torch.long, device=device)
    index, k = slab_of(middle)
    # Twice: the middle slice's motion finds the slab, the slab's own motion confirms it.
    for _ in range(2):
        index, k = slab_of(torch.round(index[:, 2]).clamp(0, nk - 1).long())
    i, j = torch.round(index[:, 0]).long(), torch.round(index[:, 1]).long()
    seen = ((index[:, 2] - k).abs() <= 0.5) & (i >= 0) & (i < ni) & (j >= 0) & (j < nj)
    inside = torch.zeros_like(seen)
    inside[seen] = mask[k[seen], j[seen], i[seen]]
    return seen, inside


def voted_brain(
    affine: np.ndarray, shape: tuple[int, int, int], carried: list[StackSlices], device: torch.device
) -> np.ndarray:
    """Weights (float32 [k, j, i] in [0, 1]) of the voxels of a grid (voxel -> LPS (4, 4)): 1 where at
    least half the stacks seeing a voxel have it inside their masks (holes filled) and up to
    SUPPORT_MARGIN_MM outside that brain, fading to 0 over EDGE_FADE_MM beyond."""
    nk, nj, ni = shape
    seen = torch.zeros(nk * nj * ni, dtype=torch.int32, device=device)
    inside = torch.zeros_like(seen)
    linear = torch.as_tensor(affine[:3, :3], dtype=torch.float32, device=device)
    offset = torch.as_tensor(affine[:3, 3], dtype=torch.float32, device=device)
    for start in range(0, len(seen), CHUNK):
        flat = torch.arange(start, min(start + CHUNK, len(seen)), device=device)
        voxels = torch.stack([flat % ni, (flat // ni) % nj, flat // (ni * nj)], -1).float()
        points = voxels @ linear.T + offset
        for stack in carried:
            stack_seen, stack_inside = votes(points, stack)
            seen[flat] += stack_seen.int()
            inside[flat] += stack_inside.int()
    brain = ((2 * inside >= seen) & (seen > 0)).reshape(shape).cpu().numpy()
    brain = ndimage.binary_fill_holes(brain)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[::-1]
    distance = ndimage.distance_transform_edt(~brain, sampling=spacing)
    return np.clip(1.0 + (SUPPORT_MARGIN_MM - distance) / EDGE_FADE_MM, 0.0, 1.0).astype(np.float32)


def carried_stacks(
    stacks: list[Stack], slices: SliceSet, rotvec: np.ndarray, translation: np.ndarray, held: np.ndarray
) -> list[StackSlices]:
    """Every stack the fit held a slice of, its slices carried by their motion (rotvec, translation
    (M, 3) into the output frame; held (M,) bool: the slices the fit kept)."""
    carried = (stack_slices(stack, s, slices, rotvec, translation, held) for s, stack in enumerate(stacks))
    return [stack for stack in carried if stack is not None]
