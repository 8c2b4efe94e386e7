"""The forward model: values at points from their K nearest Gaussians, with the analytic PSF.

PSF modes:
- "exact": sum_j c_j (g_j * phi)(x), the true convolution of the Gaussian mixture with the PSF;
- "normalized": sum_j c_j g'_j(x) / (sum_j g'_j(x) + delta), g'_j with Sigma_obs but no amplitude
  factor (the published GaussianSVR formula);
- "none": the exact mixture without any PSF (ablation).
"""

from __future__ import annotations

import torch

from . import kernels
from .psf import NORMALIZATION_DELTA, convolved_gaussian


def evaluate(
    points: torch.Tensor,
    neighbours: torch.Tensor,
    means: torch.Tensor,
    cov6: torch.Tensor,
    cov_det: torch.Tensor,
    intensities: torch.Tensor,
    psf6: torch.Tensor | None = None,
    mode: str = "exact",
) -> torch.Tensor:
    """Predicted values (B,) at points (B, 3).

    neighbours (B, K) indexes the N Gaussians: means (N, 3), cov6 (N, 6), cov_det (N,),
    intensities (N,). psf6 (B, 6) is the world PSF covariance of each point's slice, or None to
    evaluate the volume itself (no PSF, as for the output grid). On the CPU the fused numba
    kernel of kernels.py runs when numba is installed (several times faster, see
    docs/benchmarks.md); elsewhere, plain torch.
    """
    if points.device.type == "cpu" and kernels.enabled():
        return kernels.evaluate_fused(points, neighbours, means, cov6, cov_det, intensities, psf6, mode)
    return evaluate_torch(points, neighbours, means, cov6, cov_det, intensities, psf6, mode)


def evaluate_slices(
    positions: torch.Tensor,
    slice_id: torch.Tensor,
    rotations: torch.Tensor,
    offsets: torch.Tensor,
    neighbours: torch.Tensor,
    means: torch.Tensor,
    cov6: torch.Tensor,
    cov_det: torch.Tensor,
    intensities: torch.Tensor,
    psf6: torch.Tensor | None = None,
    mode: str = "exact",
) -> torch.Tensor:
    """Predicted values (B,) of slice pixels: evaluate() at x = R_s p + b_s with slice s's PSF.

    positions (B, 3) nominal pixel positions on slices slice_id (B,); rotations (M, 3, 3), offsets
    (M, 3) and psf6 (M, 6) (or None) per slice; the Gaussians as for evaluate(). Differentiable
    w.r.t. everything but positions and the indices. On the CPU with numba, the fused kernels move
    the pixels themselves (kernels.py); elsewhere plain torch.
    """
    if positions.device.type == "cpu" and kernels.enabled():
        return kernels.evaluate_slices_fused(
            positions, slice_id, rotations, offsets, neighbours, means, cov6, cov_det, intensities, psf6,
            mode,
        )  # fmt: skip
    points = (rotations.index_select(0, slice_id) @ positions.unsqueeze(-1)).squeeze(-1)
    points = points + offsets.index_select(0, slice_id)
    pixel_psf = psf6.index_select(0, slice_id) if psf6 is not None else None
    return evaluate_torch(points, neighbours, means, cov6, cov_det, intensities, pixel_psf, mode)


def evaluate_torch(
    points: torch.Tensor,
    neighbours: torch.Tensor,
    means: torch.Tensor,
    cov6: torch.Tensor,
    cov_det: torch.Tensor,
    intensities: torch.Tensor,
    psf6: torch.Tensor | None = None,
    mode: str = "exact",
) -> torch.Tensor:
    """evaluate() in plain torch on any device (the CUDA path, and the CPU path without numba)."""
    batch, k = neighbours.shape
    # One gather of a packed (N, 11) table: the backward of each gather is a scatter-add over
    # all B*K pairs, by far the slowest part of the step in plain torch.
    table = torch.cat([means, cov6, cov_det[:, None], intensities[:, None]], -1)
    gathered = torch.index_select(table, 0, neighbours.reshape(-1)).reshape(batch, k, 11)
    delta = points[:, None, :] - gathered[..., :3]
    cov = gathered[..., 3:9]
    det = gathered[..., 9]
    use_psf = psf6 is not None and mode != "none"
    psf = psf6[:, None, :] if use_psf else torch.zeros_like(cov[:1, :1])
    weights = convolved_gaussian(delta, cov, det, psf, exact=mode != "normalized")
    values = gathered[..., 10]
    if mode == "normalized":
        return (weights * values).sum(-1) / (weights.sum(-1) + NORMALIZATION_DELTA)
    return (weights * values).sum(-1)


def brute_force(
    points: torch.Tensor,
    means: torch.Tensor,
    covariances: torch.Tensor,
    intensities: torch.Tensor,
    psf: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: the exact PSF-convolved mixture over ALL Gaussians, with full matrix inverses.

    points (B, 3), means (N, 3), covariances (N, 3, 3), intensities (N,), psf (B, 3, 3) or None.
    Slow (B x N pairs); for tests.
    """
    cov = covariances[None] if psf is None else covariances[None] + psf[:, None]
    delta = points[:, None, :] - means[None]
    solved = torch.linalg.solve(cov, delta[..., None])[..., 0]
    quad = (delta * solved).sum(-1)
    amplitude = torch.sqrt(torch.linalg.det(covariances)[None] / torch.linalg.det(cov))
    return (intensities[None] * amplitude * torch.exp(-0.5 * quad)).sum(-1)
