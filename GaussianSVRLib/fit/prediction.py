"""Slice pixels on the device and their prediction from Gaussians under slice motion."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..io.slices import SliceSet
from ..model import forward
from ..model.gaussians import GaussianField
from ..model.motion import SliceMotion
from ..model.neighbours import knn
from ..model.psf import psf_covariance, to_sym6


@dataclass
class SliceTensors:
    """A SliceSet on the device.

    values (P,), positions (P, 3), slice_id (P,), axes (M, 3, 3), sigma (M, 3).
    """

    values: torch.Tensor
    positions: torch.Tensor
    slice_id: torch.Tensor
    axes: torch.Tensor
    sigma: torch.Tensor

    @classmethod
    def from_slices(cls, slices: SliceSet, scale: float, device: torch.device) -> SliceTensors:
        def tensor(array: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(array), dtype=dtype, device=device)

        return cls(
            values=tensor(slices.values / scale),
            positions=tensor(slices.positions),
            slice_id=tensor(slices.pixel_slice, torch.int64),
            axes=tensor(slices.slice_axes),
            sigma=tensor(slices.psf_sigma),
        )

    @property
    def n_pixels(self) -> int:
        return self.values.shape[0]


def slice_psf(data: SliceTensors, rotations: torch.Tensor) -> torch.Tensor:
    """World PSF covariances of all slices as 6-vectors (M, 6), turned with their motion."""
    return to_sym6(psf_covariance(data.axes, data.sigma, rotations))


def predict(
    field_: GaussianField,
    motion: SliceMotion,
    data: SliceTensors,
    index: torch.Tensor,
    neighbours: torch.Tensor,
    mode: str,
) -> torch.Tensor:
    """Predicted values (B,) of pixels index (B,) with their neighbour lists (B, K)."""
    # index_select, not advanced indexing: on the CPU t[index] is 4-12x slower (measured).
    rotations = motion.rotations()
    means, cov6, det, intensities = field_.packed()
    slice_id = data.slice_id.index_select(0, index)
    values = forward.evaluate_slices(
        data.positions.index_select(0, index), slice_id, rotations, motion.offsets(rotations), neighbours,
        means, cov6, det, intensities, slice_psf(data, rotations), mode,
    )  # fmt: skip
    return values * motion.intensity_scale().index_select(0, slice_id)


def neighbour_lists(
    field_: GaussianField, motion: SliceMotion, data: SliceTensors, k: int, backend: str
) -> torch.Tensor:
    """(P, K) nearest Gaussians of every pixel at its current moved position."""
    with torch.no_grad():
        points = motion.move(data.positions, data.slice_id, motion.rotations())
        return knn(field_.means.detach(), points, k, backend)
