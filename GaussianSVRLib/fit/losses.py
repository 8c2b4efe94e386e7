"""Data terms and regularizers."""

from __future__ import annotations

import torch


def weighted_l1(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean absolute error (B,) -> () weighted per pixel by its slice weight (B,)."""
    return (weight * (prediction - target).abs()).sum() / weight.sum().clamp_min(1e-6)


def scale_penalty(scales: torch.Tensor, target: float) -> torch.Tensor:
    """Mean over Gaussians of ||s_j - s_target||^2 for scales (N, 3) in mm."""
    return ((scales - target) ** 2).sum(-1).mean()
