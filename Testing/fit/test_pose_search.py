"""Multi-start pose search (pose_search.py): slices turned far off are brought back, others stay.

The volume is the phantom itself as Gaussians (conftest's phantom_gaussians) and the slices come
from a motion-free simulated stack, so every slice's true pose is the identity.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from GaussianSVRLib.fit.pose_search import (
    candidate_poses,
    candidate_rotations,
    fitted_residuals,
    search_poses,
    slices_to_search,
)
from GaussianSVRLib.fit.prediction import SliceTensors
from GaussianSVRLib.geometry import rotvec_to_matrix_np
from GaussianSVRLib.io.slices import extract_slices
from GaussianSVRLib.io.stacks import read_stack
from GaussianSVRLib.model.gaussians import GaussianField
from GaussianSVRLib.model.motion import SliceMotion
from GaussianSVRLib.model.rotations import rotvec_to_matrix
from GaussianSVRLib.qa.agreement import frozen_gaussians
from GaussianSVRLib.sim.simulate import simulate_stacks


def angle_deg(rotvec: np.ndarray) -> np.ndarray:
    return np.degrees(np.linalg.norm(rotvec, axis=-1))


def test_candidates_are_the_grid_and_the_wide_steps_with_the_current_pose_first():
    deltas = candidate_rotations(8.0, 16.0).numpy()
    assert deltas.shape == (27 + 6, 3)
    assert np.all(deltas[0] == 0.0)
    assert len(np.unique(deltas.round(9), axis=0)) == len(deltas)
    angles = np.degrees(np.abs(deltas))
    assert set(np.unique(angles.round(6))) == {0.0, 8.0, 16.0}


def test_a_candidate_turns_the_slice_about_its_own_axes():
    axes = torch.as_tensor(rotvec_to_matrix_np(np.array([[0.3, -0.2, 0.5]])))  # an oblique slice
    current = rotvec_to_matrix(torch.tensor([[0.1, 0.05, -0.2]], dtype=torch.float64))
    about_normal = torch.tensor([[0.0, 0.0, np.radians(10.0)]], dtype=torch.float64)
    pose = candidate_poses(current, axes, about_normal)[0, 0]
    normal = axes[0, :, 2]
    # Turning about the slice normal keeps the moved normal and turns the in-plane axes by 10 degrees.
    assert torch.allclose(pose @ normal, current[0] @ normal, atol=1e-12)
    u_before, u_after = current[0] @ axes[0, :, 0], pose @ axes[0, :, 0]
    assert np.degrees(torch.arccos(u_before @ u_after).item()) == pytest.approx(10.0, abs=1e-6)


def test_fitted_residuals_ignore_the_intensity_scale():
    observed = torch.tensor([1.0, 2.0, 3.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    slice_id = torch.tensor([0, 0, 0, 1, 1, 1])
    scaled = observed * torch.tensor([2.5, 2.5, 2.5, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert torch.allclose(
        fitted_residuals(observed, scaled, slice_id, 2), torch.zeros(2, dtype=torch.float64)
    )
    wrong = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    residual = fitted_residuals(observed, wrong, slice_id, 2)
    assert residual[0] > 0.3 and residual[1] == 0.0


def test_slices_to_search_are_the_down_weighted_judged_ones_worst_first():
    weight = np.array([1.0, 0.5, 0.0, 0.2, 0.9, 1.0, 1.0, 1.0])
    residual = np.array([0.1, 0.2, 0.5, 0.3, np.nan, 0.1, 0.1, 0.1])
    judged = np.array([True, True, True, False, True, True, True, True])
    assert slices_to_search(weight, residual, judged, max_fraction=1.0).tolist() == [2, 1]
    assert slices_to_search(weight, residual, judged, max_fraction=0.125).tolist() == [2]
    assert slices_to_search(np.ones(8), residual, judged).tolist() == []


@pytest.fixture(scope="module")
def still_slices(phantom, tmp_path_factory):
    volume, mask = phantom
    result = simulate_stacks(
        volume,
        mask,
        tmp_path_factory.mktemp("still"),
        n_stacks=1,
        in_plane=1.6,
        thickness=3.2,
        max_rotation_deg=0.0,
        max_translation_mm=0.0,
        noise=0.01,
        seed=3,
    )
    slices = extract_slices([read_stack(result.stack_paths[0], result.mask_paths[0])], 1.2)
    return slices, SliceTensors.from_slices(slices, float(np.median(slices.values)), torch.device("cpu"))


def test_slices_turned_far_off_are_brought_back_and_good_ones_stay(phantom_gaussians, still_slices):
    slices, data = still_slices
    m = slices.n_slices
    counts = np.bincount(slices.pixel_slice, minlength=m)
    big = np.argsort(-counts)[:4]  # well-filled slices near the middle of the brain
    turned, kept = big[:3], big[3]
    rotvec = np.zeros((m, 3))
    for i, axis in zip(turned, (0, 1, 2), strict=True):
        # 12 degrees about one of the slice's own axes: out of reach of a plain gradient step.
        rotvec[i] = np.radians(12.0) * slices.slice_axes[i][:, axis]
    motion = SliceMotion(
        torch.as_tensor(slices.slice_centre, dtype=torch.float32),
        torch.as_tensor(rotvec, dtype=torch.float32),
        torch.zeros(m, 3),
    )
    field_ = frozen_gaussians(phantom_gaussians, torch.device("cpu"))
    searched = np.array([*turned, kept])
    result = search_poses(field_, motion, data, searched, k=16, backend="auto", mode="exact")

    assert result.moved.tolist() == [True, True, True, False]
    assert np.all(result.after[:3] < 0.7 * result.before[:3])
    rotation_error = angle_deg(motion.rotvec.detach().numpy()[searched])
    translation_error = np.linalg.norm(motion.translation.detach().numpy()[searched], axis=1)
    assert np.all(rotation_error[:3] < 4.0), rotation_error  # from 12: within the optimizer's reach
    assert np.all(translation_error[:3] < 1.5), translation_error
    assert rotation_error[3] == 0.0 and translation_error[3] == 0.0
    untouched = np.setdiff1d(np.arange(m), searched)
    assert np.all(motion.rotvec.detach().numpy()[untouched] == 0.0)


def test_a_search_leaves_a_live_field_and_its_gradients_alone(phantom_gaussians, still_slices):
    """The optimizer's own field is searched against: the search reads it frozen, so neither the
    Gaussians nor their accumulated gradients change."""
    slices, data = still_slices
    m = slices.n_slices
    means = torch.as_tensor(phantom_gaussians["means"], dtype=torch.float32)
    field_ = GaussianField(
        means,
        torch.full_like(means, 1.5),
        torch.as_tensor(phantom_gaussians["intensities"], dtype=torch.float32),
    )
    before = [parameter.detach().clone() for parameter in field_.parameters()]
    rotvec = torch.zeros(m, 3)
    rotvec[0] = torch.tensor([0.2, 0.0, 0.0])
    motion = SliceMotion(torch.as_tensor(slices.slice_centre, dtype=torch.float32), rotvec, torch.zeros(m, 3))
    search_poses(field_, motion, data, np.array([0, 1]), k=16, backend="auto", mode="exact")
    for parameter, original in zip(field_.parameters(), before, strict=True):
        assert parameter.grad is None and parameter.requires_grad
        assert torch.equal(parameter.detach(), original)
