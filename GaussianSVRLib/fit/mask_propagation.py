"""Brain masks before reconstruction: a box or a propagated mask for stacks that have none, all dilated
by a margin."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..geometry import set_image_geometry
from ..io.roi import Box, box_mask
from ..io.stacks import Stack
from .registration import mask_image, register_rigid

log = logging.getLogger(__name__)

#: A propagated mask follows its source stack through one rigid registration, not the motion of each
#: slice, so it gets this extra margin (mm) on top of the requested dilation.
PROPAGATION_MARGIN_MM = 3.0


def has_mask(stack: Stack) -> bool:
    return stack.mask_path is not None


def dilate(mask: np.ndarray, spacing: np.ndarray, margin_mm: float) -> np.ndarray:
    """The mask (k, j, i) grown by margin_mm in world distance (a voxel ellipsoid per axis spacing (3,))."""
    radius = [int(np.ceil(margin_mm / s - 1e-6)) for s in spacing]
    if margin_mm <= 0 or not any(radius):
        return mask
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing))
    grown = sitk.BinaryDilate(image, radius, sitk.sitkBall)
    return sitk.GetArrayFromImage(grown).astype(bool)


def propagate(source: Stack, target: Stack, seed: int = 0) -> np.ndarray:
    """The source stack's mask on the target stack's grid (k, j, i), through their rigid registration.

    The target has no mask, so its image is registered whole (from the identity, headers of one
    session share the scanner frame) against the source's brain.
    """
    matrix, offset = register_rigid(source, target, seed)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in matrix.ravel()))
    transform.SetTranslation(tuple(float(v) for v in offset))
    grid = set_image_geometry(sitk.Image(*target.data.shape[::-1], sitk.sitkUInt8), target.affine)
    resampled = sitk.Resample(mask_image(source), grid, transform, sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(resampled).astype(bool)


def prepare_masks(
    stacks: list[Stack], margin_mm: float, seed: int = 0, roi: Box | None = None
) -> list[Stack]:
    """Every stack with a brain mask: its own, else the box ``roi`` when one is given, else one
    propagated from the largest given mask; all dilated by margin_mm (propagated ones by
    PROPAGATION_MARGIN_MM more).

    Without any mask or box there is no brain to reconstruct: an InputError says what to give.
    """
    masked = [s for s, stack in enumerate(stacks) if has_mask(stack)]
    if not masked and roi is None:
        raise InputError(
            stacks[0].path,
            "no brain mask given: give --stack-masks for at least one stack ('none' for stacks "
            "without), a mask is propagated to the others; or a box around the brain (--roi, --roi-from)",
        )
    volumes = {s: stacks[s].mask.sum() * float(np.prod(stacks[s].spacing)) for s in masked}
    source = max(volumes, key=volumes.__getitem__) if masked else None
    prepared = []
    for stack in stacks:
        if has_mask(stack):
            mask, margin = stack.mask, margin_mm
        elif roi is not None:
            mask, margin = box_mask(roi, stack.affine, stack.data.shape), margin_mm
            if not (mask & (stack.data != 0)).any():
                raise InputError(stack.path, "the ROI box does not reach this stack (no voxel of it inside)")
        else:
            mask, margin = propagate(stacks[source], stack, seed), margin_mm + PROPAGATION_MARGIN_MM
            log.info("mask of %s propagated from %s (%d voxels)", stack.path, stacks[source].path, mask.sum())
            if not mask.any():
                raise InputError(stack.path, f"the mask of {stacks[source].path} does not reach this stack")
        prepared.append(replace(stack, mask=dilate(mask, stack.spacing, margin)))
    return prepared
