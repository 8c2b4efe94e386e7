"""The forward model: values at points from their K nearest Gaussians, with the analytic PSF.

PSF modes:
- "exact": sum_j c_j (g_j * phi)(x), the true convolution of the Gaussian mixture with the PSF;
- "normalized": sum_j c_j g'_j(x) / (sum_j g'_j(x) + delta), g'_j with Sigma_obs but no amplitude
  factor (the published GaussianSVR formula);
- "none": the exact mixture without any PSF (ablation).
"""

from __future__ import annotations

import torch

from .psf import convolved_gaussian

PSF_MODES = ("exact", "normalized", "none")
NORMALIZATION_DELTA = 1e-6


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
    evaluate the volume itself (no PSF, as for the output grid).
    """
    delta = points[:, None, :] - means[neighbours]
    cov = cov6[neighbours]
    det = cov_det[neighbours]
    use_psf = psf6 is not None and mode != "none"
    psf = psf6[:, None, :] if use_psf else torch.zeros_like(cov[:1, :1])
    weights = convolved_gaussian(delta, cov, det, psf, exact=mode != "normalized")
    values = intensities[neighbours]
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
