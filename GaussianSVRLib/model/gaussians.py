"""The volume as N anisotropic 3-D Gaussians: parameters and their covariances."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .psf import to_sym6
from .rotations import quaternion_to_matrix

#: Scales are kept in [MIN_SCALE, MAX_SCALE] mm: smaller ones fit noise, larger ones blur everything.
MIN_SCALE = 0.05
MAX_SCALE = 30.0


class GaussianField(nn.Module):
    """N Gaussians: means (N, 3) LPS mm, log-scales (N, 3), quaternions (N, 4) (w, x, y, z), intensities (N,).

    V(x) = sum_j c_j exp(-0.5 (x - mu_j)^T Sigma_j^-1 (x - mu_j)), Sigma_j = R_j S_j^2 R_j^T.
    """

    def __init__(
        self,
        means: torch.Tensor,
        scales: torch.Tensor,
        intensities: torch.Tensor,
        quaternions: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        n = means.shape[0]
        if quaternions is None:
            quaternions = torch.zeros(n, 4, dtype=means.dtype, device=means.device)
            quaternions[:, 0] = 1.0
        self.means = nn.Parameter(means.clone())
        self.log_scales = nn.Parameter(torch.log(scales.clamp(MIN_SCALE, MAX_SCALE)).clone())
        self.quaternions = nn.Parameter(quaternions.clone())
        self.intensities = nn.Parameter(intensities.clone())

    @property
    def n(self) -> int:
        return self.means.shape[0]

    def scales(self) -> torch.Tensor:
        """(N, 3) standard deviations along the principal axes, mm."""
        return torch.exp(self.log_scales).clamp(MIN_SCALE, MAX_SCALE)

    def covariances(self) -> torch.Tensor:
        """(N, 3, 3) covariances, mm^2."""
        rotation = quaternion_to_matrix(self.quaternions)
        return (rotation * self.scales()[:, None, :] ** 2) @ rotation.transpose(-1, -2)

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """means (N, 3), covariances as 6-vectors (N, 6), determinants (N,), intensities (N,)."""
        det = torch.exp(2.0 * torch.log(self.scales()).sum(-1))
        return self.means, to_sym6(self.covariances()), det, self.intensities

    def frozen(self) -> FrozenGaussians:
        """The Gaussians as they are now, detached, packed once."""
        with torch.no_grad():
            return FrozenGaussians(*(t.detach().clone() for t in self.packed()))

    def state(self) -> dict[str, torch.Tensor]:
        """Detached world-space description: means, covariances, intensities."""
        with torch.no_grad():
            return {
                "means": self.means.detach().clone(),
                "covariances": self.covariances().detach().clone(),
                "intensities": self.intensities.detach().clone(),
            }


@dataclass
class FrozenGaussians:
    """Fixed Gaussians in the form the forward model reads (what fit.prediction and final_fit use of
    a GaussianField: ``means`` and ``packed()``), computed once: nothing to differentiate, nothing
    recomputed per step.

    means (N, 3), cov6 (N, 6) covariances as 6-vectors, det (N,), intensities (N,).
    """

    means: torch.Tensor
    cov6: torch.Tensor
    det: torch.Tensor
    intensities: torch.Tensor

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.means, self.cov6, self.det, self.intensities

    def frozen(self) -> FrozenGaussians:
        return self


def transform_state(state: dict[str, torch.Tensor], rotation: torch.Tensor, offset: torch.Tensor) -> dict:
    """Gaussians moved by the rigid map x -> R x + b: means (N, 3) and covariances (N, 3, 3)."""
    return {
        "means": state["means"] @ rotation.T + offset,
        "covariances": rotation @ state["covariances"] @ rotation.T,
        "intensities": state["intensities"],
    }
