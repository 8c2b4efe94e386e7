"""Warm start: continue from an earlier run's Gaussians and slice transforms (--init-gaussians G.npz).

Continuing, the anatomy frame starts equal to the earlier run's output frame (the file's format is
io/gaussians_file.py). A current slice takes the saved map of the same slice; a slice the earlier run
did not have (its mask grew) takes its stack's median map; a stack the earlier run did not have is
registered rigidly to a known stack and put through that stack's median map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from ..errors import InputError
from ..geometry import rigid_to_slice_motion, rotvec_to_matrix_np
from ..io.gaussians_file import Saved, file_digest, read_saved
from ..io.slices import SliceSet
from ..io.stacks import Stack
from ..model.gaussians import MIN_SCALE, GaussianField
from ..model.motion import SliceMotion
from .registration import register_rigid

log = logging.getLogger(__name__)


def scales_and_quaternions(covariances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Principal standard deviations (N, 3) and unit quaternions (N, 4) (w, x, y, z) of covariances
    (N, 3, 3), so that covariance = R diag(scales^2) R^T with R the quaternion's rotation.

    Eigenvectors are made a right-handed frame (a rotation) by flipping the third when needed,
    which leaves R diag R^T unchanged; variances are floored at MIN_SCALE^2.
    """
    symmetric = 0.5 * (covariances + np.swapaxes(covariances, -1, -2)).astype(np.float64)
    variances, axes = np.linalg.eigh(symmetric)
    axes[np.linalg.det(axes) < 0, :, 2] *= -1.0
    xyzw = Rotation.from_matrix(axes).as_quat()
    return np.sqrt(np.clip(variances, MIN_SCALE**2, None)), xyzw[:, [3, 0, 1, 2]]


def match_stacks(saved: Saved, stacks: list[Stack]) -> np.ndarray:
    """For each current stack (S_now,), the saved stack it is, or -1.

    Same stack: same file content (SHA-256), else the same resolved path; in both cases the same
    array shape. Each saved stack is used once, content matches first.
    """
    matched = np.full(len(stacks), -1, dtype=np.int64)
    used: set[int] = set()
    keys = [(file_digest(stack.path), str(Path(stack.path).resolve())) for stack in stacks]
    for field_index, saved_keys in ((0, saved.stack_digests), (1, saved.stack_paths)):
        for s, stack in enumerate(stacks):
            if matched[s] >= 0:
                continue
            for u, key in enumerate(saved_keys):
                same_shape = tuple(saved.stack_shapes[u]) == stack.data.shape
                if u not in used and key == keys[s][field_index] and same_shape:
                    matched[s] = u
                    used.add(u)
                    break
    return matched


def repivot(
    rotvec: np.ndarray, translation: np.ndarray, centre: np.ndarray, new_centre: np.ndarray
) -> np.ndarray:
    """Translations (..., 3) of the maps x = R(p - c) + c + t rewritten around new_centre (..., 3).

    R(p - c') + c' + t' is the same map when t' = R(c' - c) + c + t - c'.
    """
    moved = np.einsum("...ij,...j->...i", rotvec_to_matrix_np(rotvec), new_centre - centre)
    return moved + centre + translation - new_centre


def stack_median_map(
    rotvec: np.ndarray, translation: np.ndarray, centre: np.ndarray, new_centre: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A stack's typical slice map (rotvec (3,), translation (3,)) around new_centre (3,), from its
    slices' maps (K, 3) around their centres (K, 3): component-wise medians, robust to outlier slices."""
    shifted = repivot(rotvec, translation, centre, np.broadcast_to(new_centre, centre.shape))
    return np.median(rotvec, axis=0), np.median(shifted, axis=0)


def match_slices(saved: Saved, stack_map: np.ndarray, slices: SliceSet) -> np.ndarray:
    """For each current slice (M,), the index of the same saved slice (same stack, same k), or -1."""
    lookup = {
        (int(u), int(k)): i for i, (u, k) in enumerate(zip(saved.slice_stack, saved.slice_k, strict=True))
    }
    pairs = zip(stack_map[slices.slice_stack], slices.slice_k, strict=True)
    return np.array([lookup.get((int(u), int(k)), -1) if u >= 0 else -1 for u, k in pairs], dtype=np.int64)


@dataclass
class KnownStack:
    """A stack of the saved run: its median map (rotvec (3,), translation (3,) around centre (3,)),
    its median intensity scale and how many of its slices were found."""

    rotvec: np.ndarray
    translation: np.ndarray
    centre: np.ndarray
    scale: float
    n_found: int


def through_anchor(
    stacks: list[Stack], slices: SliceSet, new: int, anchor: int, anchor_map: KnownStack, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Slice maps (rotvec (K, 3), translation (K, 3)) of a stack the saved run did not have.

    It is registered rigidly to a known stack (x = A p + b into the anchor's nominal world), then
    taken where the anchor's median map (R_a, t_a around c_a) takes the anchor:
    R_a (A p + b - c_a) + c_a + t_a.
    """
    matrix, offset = register_rigid(stacks[anchor], stacks[new], seed)
    rotation, centre = rotvec_to_matrix_np(anchor_map.rotvec), anchor_map.centre
    translation = anchor_map.translation
    on_stack = slices.slice_stack == new
    return rigid_to_slice_motion(
        rotation @ matrix, rotation @ (offset - centre) + centre + translation, slices.slice_centre[on_stack]
    )


def median_value(slices: SliceSet, stack: int) -> float:
    """The median pixel value of a stack's slices."""
    return float(np.median(slices.values[slices.slice_stack[slices.pixel_slice] == stack]))


def continue_slices(
    saved: Saved, found: np.ndarray, slices: SliceSet, scale: np.ndarray, state: tuple[np.ndarray, ...]
) -> dict[int, KnownStack]:
    """Fill in state (rotvec (M, 3), translation (M, 3), log_scale (M,)) for the slices of known stacks:
    found ones (found (M,) >= 0) take their saved map and scale (M_saved,), the others their stack's
    median. Returns the known stacks by current index."""
    rotvec, translation, log_scale = state
    hit = found >= 0
    rotvec[hit] = saved.rotvec[found[hit]]
    translation[hit] = repivot(
        saved.rotvec[found[hit]],
        saved.translation[found[hit]],
        saved.centre[found[hit]],
        slices.slice_centre[hit],
    )
    log_scale[hit] = np.log(scale[found[hit]])
    known = {}
    for s in map(int, np.unique(slices.slice_stack[hit])):
        on_stack = slices.slice_stack == s
        own = found[hit & on_stack]
        maps = (saved.rotvec[own], saved.translation[own], saved.centre[own])
        middle = slices.slice_centre[on_stack][on_stack.sum() // 2]
        known[s] = KnownStack(
            *stack_median_map(*maps, middle), middle, float(np.median(scale[own])), len(own)
        )
        for i in np.nonzero(on_stack & ~hit)[0]:
            rotvec[i], translation[i] = stack_median_map(*maps, slices.slice_centre[i])
            log_scale[i] = np.log(known[s].scale)
    return known


def initial_slice_state(
    saved: Saved, stacks: list[Stack], slices: SliceSet, reference: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotation vectors (M, 3), translations (M, 3) and log intensity scales (M,) of the current slices.

    Scales are divided by the saved reference stack's median scale, which the saved intensities carry.
    A new stack is registered to the current reference if that is known, else to the known stack
    with most slices found.
    """
    found = match_slices(saved, match_stacks(saved, stacks), slices)
    if not np.any(found >= 0):
        names = ", ".join(Path(p).name for p in saved.stack_paths)
        raise InputError(saved.path, f"none of its slices is in the input stacks (it was made from {names})")
    scale = saved.scale / np.median(saved.scale[saved.slice_stack == saved.reference])
    m = slices.n_slices
    state = (np.zeros((m, 3)), np.zeros((m, 3)), np.zeros(m))
    known = continue_slices(saved, found, slices, scale, state)
    rotvec, translation, log_scale = state
    anchor = reference if reference in known else max(known, key=lambda s: known[s].n_found)
    for s, stack in enumerate(stacks):
        on_stack = slices.slice_stack == s
        if s in known:
            log.info("warm start: %s: %d of %d slices found", stack.path, known[s].n_found, on_stack.sum())
            continue
        if not on_stack.any():
            continue
        rotvec[on_stack], translation[on_stack] = through_anchor(
            stacks, slices, s, anchor, known[anchor], seed
        )
        # A new stack may have another intensity scale: start from its typical value over the anchor's.
        ratio = median_value(slices, s) / max(median_value(slices, anchor), 1e-12)
        log_scale[on_stack] = np.log(known[anchor].scale * max(ratio, 1e-6))
        log.info("warm start: %s is new: registered to %s", stack.path, stacks[anchor].path)
    return rotvec, translation, log_scale


def warm_start(
    path: str | Path,
    stacks: list[Stack],
    slices: SliceSet,
    reference: int,
    seed: int,
    device: torch.device,
) -> tuple[GaussianField, SliceMotion]:
    """The Gaussians and slice motion of an earlier run, for the current slices (see the module doc).

    The file's Gaussian count replaces the n_gaussians setting. Its intensities are in the units of
    the reference stack's file and its slice scales relative to them; both are brought into the
    units of each stack's normalized voxels (Stack.intensity_unit).
    """
    saved = read_saved(path)
    rotvec, translation, log_scale = initial_slice_state(saved, stacks, slices, reference, seed)
    units = np.array([stack.intensity_unit for stack in stacks])
    log_scale = log_scale + np.log(units[reference] / units[slices.slice_stack])
    scales, quaternions = scales_and_quaternions(saved.covariances)

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32, device=device)

    field_ = GaussianField(
        tensor(saved.means), tensor(scales), tensor(saved.intensities / units[reference]), tensor(quaternions)
    )
    motion = SliceMotion(tensor(slices.slice_centre), tensor(rotvec), tensor(translation))
    with torch.no_grad():
        motion.log_scale.copy_(tensor(log_scale))
    log.info("warm start from %s: %d Gaussians (the n_gaussians setting is not used)", saved.path, field_.n)
    return field_, motion
