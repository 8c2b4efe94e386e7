"""Slice PSF covariances and the closed-form Gaussian convolution.

Symmetric 3x3 matrices travel as 6-vectors (xx, xy, xz, yy, yz, zz): the per-pair work of the
forward model is then elementwise arithmetic on (..., 6) tensors, with no batched small-matrix
inversion, which is slow in plain torch.
"""

from __future__ import annotations

from typing import get_args

import torch

from ..settings import PsfMode

PSF_MODES: tuple[str, ...] = get_args(PsfMode)
#: Added to the normalizer of the "normalized" mode, so that a pixel far from every Gaussian stays finite.
NORMALIZATION_DELTA = 1e-6
SYM6 = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))


def to_sym6(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric matrices (..., 3, 3) -> 6-vectors (..., 6)."""
    return torch.stack([matrix[..., i, j] for i, j in SYM6], -1)


def from_sym6(sym: torch.Tensor) -> torch.Tensor:
    """6-vectors (..., 6) -> symmetric matrices (..., 3, 3)."""
    a, b, c, d, e, f = sym.unbind(-1)
    return torch.stack(
        [torch.stack([a, b, c], -1), torch.stack([b, d, e], -1), torch.stack([c, e, f], -1)], -2
    )


def psf_covariance(axes: torch.Tensor, sigma: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """World covariance (M, 3, 3) of each slice's PSF.

    axes (M, 3, 3): unit slice axes as columns (stack direction); sigma (M, 3): PSF standard
    deviations along them (mm); rotation (M, 3, 3): the slice's motion, which turns the PSF with it.
    """
    frame = rotation @ axes
    return (frame * sigma[:, None, :] ** 2) @ frame.transpose(-1, -2)


def adjugate_det_sym6(sym: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adjugate (..., 6) and determinant (...) of symmetric matrices given as 6-vectors."""
    a, b, c, d, e, f = sym.unbind(-1)
    adj_a = d * f - e * e
    adj_b = c * e - b * f
    adj_c = b * e - c * d
    adj_d = a * f - c * c
    adj_e = b * c - a * e
    adj_f = a * d - b * b
    det = a * adj_a + b * adj_b + c * adj_c
    return torch.stack([adj_a, adj_b, adj_c, adj_d, adj_e, adj_f], -1), det


def quadratic_form_sym6(sym: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """d^T A d for A (..., 6) and d (..., 3)."""
    x, y, z = d.unbind(-1)
    a, b, c, dd, e, f = sym.unbind(-1)
    return a * x * x + dd * y * y + f * z * z + 2.0 * (b * x * y + c * x * z + e * y * z)


def convolved_gaussian(
    delta: torch.Tensor, cov: torch.Tensor, cov_det: torch.Tensor, psf: torch.Tensor, exact: bool = True
) -> torch.Tensor:
    """A unit-peak Gaussian convolved with a normalized Gaussian PSF, evaluated at offsets.

    delta (..., 3): x - mu; cov (..., 6): Sigma_j; cov_det (...): det Sigma_j; psf (..., 6):
    the PSF covariance (broadcastable; zeros for no PSF). Sigma_obs = Sigma_j + Sigma_PSF and

        (g_j * phi)(x) = sqrt(det Sigma_j / det Sigma_obs) exp(-0.5 delta^T Sigma_obs^-1 delta),

    which is exact. With exact=False the amplitude factor is dropped (the published variant,
    meant to be followed by normalization over neighbours).
    """
    obs = cov + psf
    adj, det = adjugate_det_sym6(obs)
    det = det.clamp_min(1e-12)
    value = torch.exp(-0.5 * quadratic_form_sym6(adj, delta) / det)
    if exact:
        value = value * torch.sqrt(cov_det / det)
    return value
