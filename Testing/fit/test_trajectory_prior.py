"""The prior that slices acquired one after the other moved alike: the head turning as a whole costs
nothing whatever the slices' centres, a difference costs its size in mm, and a kick is not pulled back
harder the larger it is."""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from GaussianSVRLib.fit.losses import ROBUST_EPS_MM, trajectory_penalty

CENTRES = torch.tensor([[0.0, 0.0, -6.6], [0.0, 0.0, 0.0], [0.0, 0.0, 6.6]], dtype=torch.float64)
PAIRS = torch.tensor([[0, 1], [1, 2]])


def head_motion(
    rotvec: np.ndarray, shift: np.ndarray, pivot: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slice's (rotvec (3, 3), translation (3, 3)) for one rigid motion x -> R (x - pivot) + pivot
    + shift of the whole head, in the slices' own convention (about their centres)."""
    matrix = Rotation.from_rotvec(rotvec).as_matrix()
    centres = CENTRES.numpy()
    translation = (centres - pivot) @ matrix.T + pivot + shift - centres
    return torch.tensor(np.tile(rotvec, (3, 1))), torch.tensor(translation)


def test_one_motion_of_the_whole_head_costs_nothing():
    rotvec, translation = head_motion(
        np.radians([8.0, -5.0, 3.0]), np.array([2.0, -1.0, 4.0]), np.array([30.0, 10, 0])
    )
    assert float(trajectory_penalty(rotvec, translation, CENTRES, PAIRS)) < 1e-9
    # The same translations read as if they were shifts alone are far from one motion.
    assert (
        float(trajectory_penalty(torch.zeros(3, 3, dtype=torch.float64), translation, CENTRES, PAIRS)) > 0.5
    )


def test_a_difference_costs_its_size_and_a_kick_is_pulled_back_no_harder_than_a_nudge():
    def cost_and_pull(jump_mm: float) -> tuple[float, float]:
        translation = torch.zeros(3, 3, dtype=torch.float64)
        translation[2, 0] = jump_mm
        translation.requires_grad_(True)
        cost = trajectory_penalty(torch.zeros(3, 3, dtype=torch.float64), translation, CENTRES, PAIRS)
        cost.backward()
        return cost.item(), translation.grad[2].norm().item()

    cost, _ = cost_and_pull(4.0)
    assert abs(cost - (np.hypot(4.0, ROBUST_EPS_MM) - ROBUST_EPS_MM) / 2) < 1e-9
    _, pull_small = cost_and_pull(2.0)
    _, pull_large = cost_and_pull(12.0)
    assert pull_large < 1.05 * pull_small
    turned = torch.zeros(3, 3, dtype=torch.float64)
    turned[2, 2] = np.radians(5.0)
    assert float(trajectory_penalty(turned, torch.zeros(3, 3, dtype=torch.float64), CENTRES, PAIRS)) > 1.0
