"""Rigid registration of stacks with SimpleITK: a stack to another, and every stack to the reference."""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk

from ..geometry import rigid_to_slice_motion, set_image_geometry
from ..io.slices import SliceSet
from ..io.stacks import Stack

log = logging.getLogger(__name__)


def masked_image(stack: Stack) -> sitk.Image:
    """The stack's voxels inside its mask, as a float32 SimpleITK image with the stack geometry."""
    image = sitk.GetImageFromArray(np.where(stack.mask, stack.data, 0).astype(np.float32))
    return set_image_geometry(image, stack.affine)


def mask_image(stack: Stack) -> sitk.Image:
    return set_image_geometry(sitk.GetImageFromArray(stack.mask.astype(np.uint8)), stack.affine)


def register_rigid(fixed: Stack, moving: Stack, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rigid map x = A p + b from the moving stack's nominal world to the fixed stack's world.

    Correlation on the masked stacks, centred on the masks' intensity moments (or from the headers
    for a moving stack without a mask), coarse to fine.
    SimpleITK's transform maps fixed points to moving points, so the result is its inverse.
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
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsCorrelation()
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.25, seed)
    method.SetMetricFixedMask(sitk.BinaryDilate(mask_image(fixed), [2, 2, 1]))
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=200, relaxationFactor=0.6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0])
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
    stacks: list[Stack], slices: SliceSet, reference: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Initial per-slice motion (rotvec (M, 3), translation (M, 3)) from stack-to-reference registration."""
    rotvec = np.zeros((slices.n_slices, 3))
    translation = np.zeros((slices.n_slices, 3))
    for s, stack in enumerate(stacks):
        if s == reference:
            continue
        matrix, offset = register_rigid(stacks[reference], stack, seed)
        on_stack = slices.slice_stack == s
        rotvec[on_stack], translation[on_stack] = rigid_to_slice_motion(
            matrix, offset, slices.slice_centre[on_stack]
        )
    return rotvec, translation
