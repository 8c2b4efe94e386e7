"""What the stacks see together, and a brain carried back onto the stacks through slice motions."""

from __future__ import annotations

import numpy as np
import pytest

from GaussianSVRLib.fit.views import common_view, grid_points, masks_through_slices, view_on_grid
from GaussianSVRLib.geometry import rotvec_to_matrix_np
from GaussianSVRLib.io.slices import extract_slices
from GaussianSVRLib.io.stacks import Stack


def stack(origin, shape=(10, 20, 20), spacing=(1.0, 1.0, 2.0), mask=None) -> Stack:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    data = np.ones(shape, dtype=np.float32)
    return Stack("stack.nii.gz", data, np.ones(shape, bool) if mask is None else mask, affine, spacing[2])


def test_each_stack_keeps_what_the_others_see():
    # B starts 10 voxels further along x: A's voxels from i = 10 on lie inside B, B's up to i = 9 inside A.
    a, b = stack((0.0, 0.0, 0.0)), stack((10.0, 0.0, 0.0))
    view_a, view_b = common_view([a, b])
    i = np.indices(a.data.shape)[2]
    assert np.array_equal(view_a, i >= 10)
    assert np.array_equal(view_b, i <= 9)


def test_a_grid_sees_the_intersection_of_all_stacks():
    a, b = stack((0.0, 0.0, 0.0)), stack((0.0, 5.0, 0.0))
    affine = np.eye(4)
    affine[:3, 3] = (-5.0, -5.0, -5.0)
    view = view_on_grid([a, b], affine, (40, 40, 40))
    points = grid_points(affine, (40, 40, 40))
    inside = (
        (points[..., 0] >= -0.5) & (points[..., 0] <= 19.5)
        & (points[..., 1] >= 4.5) & (points[..., 1] <= 19.5)
        & (points[..., 2] >= -1.0) & (points[..., 2] <= 19.0)
    )  # fmt: skip
    assert np.array_equal(view, inside)


def ball(affine: np.ndarray, shape, centre, radius: float) -> np.ndarray:
    return np.linalg.norm(grid_points(affine, shape) - centre, axis=-1) <= radius


@pytest.mark.parametrize("shift", [(0.0, 0.0, 0.0), (3.0, -2.0, 4.0)])
def test_the_brain_comes_back_through_each_slice_motion(shift):
    """Slice pixel p moves to p + t: brain where p + t is, so the stack's mask is the ball moved by -t."""
    s = stack((0.0, 0.0, 0.0))
    slices = extract_slices([s])
    grid = np.eye(4)
    grid[:3, 3] = -10.0
    brain = ball(grid, (40, 40, 40), np.array([10.0, 10.0, 10.0]), 6.0)
    translation = np.tile(shift, (slices.n_slices, 1))
    rotvec = np.zeros((slices.n_slices, 3))
    (mask,) = masks_through_slices([s], slices, rotvec, translation, brain, grid)
    centre = np.array([10.0, 10.0, 10.0]) - shift
    expected = ball(s.affine, s.data.shape, centre, 6.0)
    # The brain is sampled at its nearest grid voxel: pixels within half a voxel of the sphere may differ.
    distance = np.linalg.norm(grid_points(s.affine, s.data.shape) - centre, axis=-1)
    clear = np.abs(distance - 6.0) > 0.9
    assert np.array_equal(mask[clear], expected[clear])
    assert mask.sum() > 0.8 * expected.sum()


def test_slices_the_fit_did_not_hold_move_as_their_nearest_fitted_neighbour():
    """Only slices 4-5 were fitted (their masks): every other slice takes slice 4's or 5's rotation."""
    held = np.zeros((10, 20, 20), bool)
    held[4:6] = True
    s = stack((0.0, 0.0, 0.0), mask=held)
    slices = extract_slices([s])
    assert list(slices.slice_k) == [4, 5]
    grid = np.eye(4)
    grid[:3, 3] = -20.0
    brain = ball(grid, (60, 60, 60), np.array([4.0, 12.0, 9.0]), 6.0)
    rotvec = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, np.pi / 2]])
    (mask,) = masks_through_slices([s], slices, rotvec, np.zeros((2, 3)), brain, grid)
    turned = rotvec_to_matrix_np(rotvec[1])
    for k in range(10):
        pixels, pivot = grid_points(s.affine, s.data.shape)[k], slices.slice_centre[1]
        moved = pixels if k <= 4 else (pixels - pivot) @ turned.T + pivot
        distance = np.linalg.norm(moved - np.array([4.0, 12.0, 9.0]), axis=-1)
        clear = np.abs(distance - 6.0) > 0.9
        assert np.array_equal(mask[k][clear], (distance <= 6.0)[clear]), k
