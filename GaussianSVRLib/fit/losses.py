"""Data terms and regularizers."""

from __future__ import annotations

import torch

from ..model.rotations import apply_slice_motion, rotvec_to_matrix

#: The radius (mm) at which a rotation difference is counted as a displacement, and where the robust
#: trajectory penalty turns from quadratic to linear.
BRAIN_RADIUS_MM = 40.0
ROBUST_EPS_MM = 0.5


def weighted_l1(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean absolute error (B,) -> () weighted per pixel by its slice weight (B,)."""
    return (weight * (prediction - target).abs()).sum() / weight.sum().clamp_min(1e-6)


def scale_penalty(scales: torch.Tensor, target: float) -> torch.Tensor:
    """Mean over Gaussians of ||s_j - s_target||^2 for scales (N, 3) in mm."""
    return ((scales - target) ** 2).sum(-1).mean()


def trajectory_penalty(
    rotvec: torch.Tensor, translation: torch.Tensor, centres: torch.Tensor, pairs: torch.Tensor
) -> torch.Tensor:
    """Mean over pairs (Q, 2) of slices acquired one after the other of how differently they moved.

    Per pair, the two slices' motions (rotation vectors (M, 3) rad, translations (M, 3) mm about their
    centres (M, 3)) are compared where it matters: the displacement of the point midway between the
    centres and the rotation at a brain's radius, both in mm, under sqrt(d^2 + eps^2) - eps, which
    is quadratic for small differences and linear for a jump (a kick is not pulled back).
    """
    a, b = pairs[:, 0], pairs[:, 1]
    midway = 0.5 * (centres[a] + centres[b])
    moved_a = apply_slice_motion(midway, centres[a], rotvec_to_matrix(rotvec[a]), translation[a])
    moved_b = apply_slice_motion(midway, centres[b], rotvec_to_matrix(rotvec[b]), translation[b])
    turned = BRAIN_RADIUS_MM**2 * ((rotvec[a] - rotvec[b]) ** 2).sum(-1)
    squared = ((moved_a - moved_b) ** 2).sum(-1) + turned
    return (torch.sqrt(squared + ROBUST_EPS_MM**2) - ROBUST_EPS_MM).mean()
