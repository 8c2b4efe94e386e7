"""Rigid registration of stacks with SimpleITK: a stack to another, and every stack to the reference."""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from ..atlas.bundled import load_atlas
from ..geometry import rigid_to_slice_motion, set_image_geometry
from ..io.slices import SliceSet
from ..io.stacks import Stack
from .stack_orientation import (
    AtlasPlacement,
    Rigid,
    StackOrientation,
    checked,
    group_start,
    orient,
    stack_atlas,
)

log = logging.getLogger(__name__)

#: Smoothing (mm, Gaussian sigma) of the registration's last level.
FINE_SMOOTHING_MM = 1.0


def masked_image(stack: Stack) -> sitk.Image:
    """The stack's voxels inside its mask, as a float32 SimpleITK image with the stack geometry."""
    image = sitk.GetImageFromArray(np.where(stack.mask, stack.data, 0).astype(np.float32))
    return set_image_geometry(image, stack.affine)


def mask_image(stack: Stack) -> sitk.Image:
    return set_image_geometry(sitk.GetImageFromArray(stack.mask.astype(np.uint8)), stack.affine)


def correlation_method(fixed: Stack) -> sitk.ImageRegistrationMethod:
    """Correlation over the fixed stack's mask (grown by 2 pixels in-plane), linear interpolation."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsCorrelation()
    method.SetMetricFixedMask(sitk.BinaryDilate(mask_image(fixed), [2, 2, 1]))
    method.SetInterpolator(sitk.sitkLinear)
    return method


def as_transform(rigid: Rigid, centre: np.ndarray) -> sitk.Euler3DTransform:
    """SimpleITK's transform (fixed points -> moving points) about ``centre`` (3,) for the rigid map
    x_fixed = A x_moving + b (A made exactly orthonormal, as SimpleITK requires)."""
    matrix, offset = Rotation.from_matrix(rigid[0]).as_matrix(), rigid[1]
    transform = sitk.Euler3DTransform()
    transform.SetCenter(tuple(float(v) for v in centre))
    transform.SetMatrix(tuple(float(v) for v in matrix.T.ravel()))
    transform.SetTranslation(tuple(float(v) for v in matrix.T @ (centre - offset) - centre))
    return transform


def stack_agreement(fixed: Stack, moving: Stack, rigid: Rigid) -> float:
    """The correlation of the two masked stacks, smoothed as the registration's last level, with the
    moving one where x_fixed = A x_moving + b puts it (every voxel: two maps compare exactly)."""
    images = [sitk.SmoothingRecursiveGaussian(masked_image(s), FINE_SMOOTHING_MM) for s in (fixed, moving)]
    method = correlation_method(fixed)
    method.SetInitialTransform(as_transform(rigid, np.zeros(3)))
    return -method.MetricEvaluate(*images)


def register_rigid(fixed: Stack, moving: Stack, seed: int = 0, start: Rigid | None = None) -> Rigid:
    """Rigid map x = A p + b from the moving stack's nominal world to the fixed stack's world.

    Correlation on the masked stacks, coarse to fine, from ``start`` (A (3, 3), b (3,)) when given,
    else centred on the masks' intensity moments (or from the headers for a moving stack without a
    mask). SimpleITK's transform maps fixed points to moving points, so the result is its inverse.
    """
    fixed_image, moving_image = masked_image(fixed), masked_image(moving)
    if moving.mask.all():
        # Without a mask the moments of the whole field of view say nothing about the brain; stacks
        # of one session share the scanner frame, so start from their headers.
        initial = sitk.Euler3DTransform()
        centre = np.argwhere(fixed.mask).mean(axis=0)[::-1]
        initial.SetCenter(
            fixed_image.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in centre))
        )
    else:
        initial = sitk.CenteredTransformInitializer(
            fixed_image,
            moving_image,
            sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS,
        )
    if start is not None:
        initial = as_transform(start, np.asarray(initial.GetCenter()))
    method = correlation_method(fixed)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.25, seed)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=200, relaxationFactor=0.6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, FINE_SMOOTHING_MM])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    transform = method.Execute(fixed_image, moving_image)
    inverse = transform.GetInverse()
    origin = np.asarray(inverse.TransformPoint((0.0, 0.0, 0.0)))
    columns = [np.asarray(inverse.TransformPoint(tuple(e))) - origin for e in np.eye(3)]
    matrix = np.stack(columns, axis=1)
    log.info("stack %s registered to %s (metric %.3f)", moving.path, fixed.path, method.GetMetricValue())
    return matrix, origin


def prealign(
    stacks: list[Stack],
    slices: SliceSet,
    reference: int,
    seed: int = 0,
    week: float | None = None,
    atlas_search: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Initial per-slice motion (rotvec (M, 3), translation (M, 3)) from stack-to-reference registration,
    checked by the stacks' vote on the atlas of ``week`` when ``atlas_search`` (stack_orientation.py)."""
    registrations, _ = stack_registrations(stacks, reference, seed, week, atlas_search)
    return slice_motion(registrations, slices)


def slice_motion(registrations: dict[int, Rigid], slices: SliceSet) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice motion (rotvec (M, 3), translation (M, 3)) of stack registrations (none: identity)."""
    rotvec = np.zeros((slices.n_slices, 3))
    translation = np.zeros((slices.n_slices, 3))
    for s, (matrix, offset) in registrations.items():
        on_stack = slices.slice_stack == s
        rotvec[on_stack], translation[on_stack] = rigid_to_slice_motion(
            matrix, offset, slices.slice_centre[on_stack]
        )
    return rotvec, translation


def stack_registrations(
    stacks: list[Stack], reference: int, seed: int, week: float | None, atlas_search: bool
) -> tuple[dict[int, Rigid], AtlasPlacement | None]:
    """Every other stack registered to the reference (stack -> x_reference = A x + b) and, with
    ``atlas_search``, checked by the stacks' vote on the atlas: a stack outside the group is registered
    again from the group's start and takes the new result where both judges prefer it, the atlas on
    the stack and the stack on the reference (a stack whose own atlas fit is wrong starts far off and
    loses on the second). Also where the vote put the atlas (None without a vote)."""
    registrations = {
        s: register_rigid(stacks[reference], stack, seed) for s, stack in enumerate(stacks) if s != reference
    }
    if not atlas_search:
        return registrations, None
    orientations = atlas_orientations(stacks, reference, week)
    found = checked({**registrations, reference: (np.eye(3), np.zeros(3))}, orientations)
    if found is None:
        return registrations, None
    rotation, centre, outside = found
    fixed = stacks[reference]
    for s in sorted(outside - {reference}):
        orientation, old = orientations[s], registrations[s]
        again = register_rigid(fixed, stacks[s], seed, group_start(rotation, centre, orientation))
        if orientation.score(again[0].T @ rotation) > orientation.score(old[0].T @ rotation) and (
            stack_agreement(fixed, stacks[s], again) > stack_agreement(fixed, stacks[s], old)
        ):
            log.info("stack %s: registered again from where the other stacks place the atlas", stacks[s].path)
            registrations[s] = again
    fit = orientations[reference].fit
    return registrations, AtlasPlacement(load_atlas(fit.week), rotation, centre, fit.scale)


def atlas_orientations(
    stacks: list[Stack], reference: int, week: float | None
) -> dict[int, StackOrientation]:
    """Each masked stack's orientation on the atlas of ``week`` (default: of the reference's brain); none
    at all when the reference has no mask (nothing to place the others against)."""
    if stacks[reference].mask.all():
        return {}
    atlas = stack_atlas(stacks[reference].mask, stacks[reference].affine, week)
    return {
        s: orient(masked_image(stack), stack.mask, stack.affine, atlas)
        for s, stack in enumerate(stacks)
        if not stack.mask.all()
    }
