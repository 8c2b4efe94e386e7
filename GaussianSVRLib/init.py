"""Initialization: rigid pre-alignment of the stacks and content-adaptive Gaussians."""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk
import torch

from .geometry import rigid_to_slice_motion, set_image_geometry
from .stacks import SliceSet, Stack

log = logging.getLogger(__name__)


def reference_index(stacks: list[Stack]) -> int:
    """The stack with the most masked voxels in world volume, among those whose mask was given (not
    propagated) if any: the anatomy frame is its frame."""
    given = any(stack.mask_path is not None for stack in stacks)
    volumes = [
        stack.mask.sum() * float(np.prod(stack.spacing)) if stack.mask_path is not None or not given else -1.0
        for stack in stacks
    ]
    return int(np.argmax(volumes))


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
