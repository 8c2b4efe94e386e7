"""Per-slice rigid motion and intensity scale, applied to pixel positions and PSF axes."""

from __future__ import annotations

import torch
from torch import nn

from .rotations import apply_slice_motion, rotvec_to_matrix


class SliceMotion(nn.Module):
    """M slices: rotation vectors (M, 3) rad, translations (M, 3) mm, log intensity scales (M,).

    Pixel p of slice i (nominal world position) maps to R_i (p - c_i) + c_i + t_i in the anatomy
    frame; c_i (M, 3) is the slice centre, a fixed buffer.
    """

    def __init__(self, centres: torch.Tensor, rotvec: torch.Tensor, translation: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("centres", centres.clone())
        self.rotvec = nn.Parameter(rotvec.clone())
        self.translation = nn.Parameter(translation.clone())
        self.log_scale = nn.Parameter(
            torch.zeros(centres.shape[0], dtype=centres.dtype, device=centres.device)
        )

    @property
    def n(self) -> int:
        return self.centres.shape[0]

    def rotations(self) -> torch.Tensor:
        """(M, 3, 3) rotation matrices."""
        return rotvec_to_matrix(self.rotvec)

    def intensity_scale(self) -> torch.Tensor:
        """(M,) multiplicative intensity scale per slice."""
        return torch.exp(self.log_scale)

    def offsets(self, rotations: torch.Tensor) -> torch.Tensor:
        """(M, 3) b_i such that R_i (p - c_i) + c_i + t_i = R_i p + b_i, for rotations (M, 3, 3)."""
        return self.centres + self.translation - (rotations @ self.centres.unsqueeze(-1)).squeeze(-1)

    def move(self, positions: torch.Tensor, slice_id: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """Anatomy-frame positions (P, 3) of nominal positions (P, 3) on slices slice_id (P,).

        rotations (M, 3, 3) is passed in so that it is computed once per step, not per pixel.
        """
        return apply_slice_motion(
            positions,
            self.centres.index_select(0, slice_id),
            rotations.index_select(0, slice_id),
            self.translation.index_select(0, slice_id),
        )


def compose_rigid(
    rotation: torch.Tensor,
    offset: torch.Tensor,
    slice_rotations: torch.Tensor,
    translation: torch.Tensor,
    centres: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice motions (R_i (M, 3, 3), t_i (M, 3)) followed by the map x -> G x + g.

    G (R_i (p - c) + c + t) + g = (G R_i) (p - c) + c + t' with t' = G (c + t) + g - c.
    Returns the new rotations (M, 3, 3) and translations (M, 3).
    """
    new_rotations = rotation @ slice_rotations
    new_translation = (centres + translation) @ rotation.T + offset - centres
    return new_rotations, new_translation
