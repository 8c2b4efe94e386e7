"""Multi-start pose search for slices that fit badly.

Gradient descent moves a slice only within its basin: a slice that starts 10-20 degrees off (large
fetal motion on top of a stack misalignment) can settle in a wrong pose, fit badly, be excluded
and stay there. The search re-tries such a slice from a grid of rotations about its own axes:
every candidate is scored against the current (frozen) volume, the best few are refined by a
short gradient descent on the slice's pose alone, and the slice moves to the best refined pose
when that fits clearly better than where it was. Scores are relative L1 residuals after each
slice's least-squares intensity scale, so a slice's current scale does not favour its current pose.

The candidates of all searched slices travel together as "virtual slices" (one per slice and
candidate), predicted by the same code as the real ones (prediction.py).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..geometry import matrix_to_rotvec
from ..model.gaussians import FrozenGaussians, GaussianField
from ..model.motion import SliceMotion
from ..model.rotations import rotvec_to_matrix
from .prediction import SliceTensors, neighbour_lists, predict

#: Spacing (degrees) of the 3 x 3 x 3 grid of rotations about a slice's axes.
GRID_STEP_DEG = 8.0
#: Single-axis rotations (degrees) added beyond the grid, for slices far off about one axis.
WIDE_STEP_DEG = 16.0
#: Pixels scored per slice (evenly spaced through its pixels).
MAX_PIXELS = 512
#: Starts refined per slice: its current pose and the best-scoring other candidates.
REFINED_STARTS = 5
#: Refinement: Adam steps, learning rates (radians, mm) and neighbour refreshes.
REFINE_STEPS = 40
REFINE_LR_ROTATION = 1e-2
REFINE_LR_TRANSLATION = 0.2
REFINE_REFRESH_EVERY = 8
#: The best refined pose must lower the slice's residual by this fraction to be taken.
MIN_GAIN = 0.05
#: Pixels predicted at once while scoring (bounds the memory of the plain-torch path).
SCORE_BATCH = 131072
#: Fraction of the slices that may be searched at once, the worst first (bounds the cost).
MAX_FRACTION = 0.25


@dataclass
class SearchResult:
    """slices (S,): the searched slices; before and after (S,): their scale-fitted residuals at the
    current pose and at the pose kept; moved (S,) bool: whether the slice took a new pose."""

    slices: np.ndarray
    before: np.ndarray
    after: np.ndarray
    moved: np.ndarray


def candidate_rotations(step_deg: float = GRID_STEP_DEG, wide_deg: float = WIDE_STEP_DEG) -> torch.Tensor:
    """Rotation vectors (C, 3) radians about a slice's axes: zero, the grid, then the wide steps."""
    grid = list(itertools.product((0.0, -step_deg, step_deg), repeat=3))
    wide = [tuple(sign * wide_deg * (axis == i) for i in range(3)) for axis in range(3) for sign in (-1, 1)]
    return torch.tensor(grid + wide, dtype=torch.float64) * (math.pi / 180.0)


def candidate_poses(rotation: torch.Tensor, axes: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Rotations (S, C, 3, 3): each slice's current rotation (S, 3, 3) turned by every delta (C, 3),
    a rotation vector about the slice's own axes (S, 3, 3) (columns: in-plane u, v, normal).

    Turning the moved slice about its moved axes F = R A gives F D F^T R = R A D A^T.
    """
    delta = rotvec_to_matrix(deltas.to(rotation)).unsqueeze(0)
    a = axes.unsqueeze(1)
    return rotation.unsqueeze(1) @ a @ delta @ a.transpose(-1, -2)


def sample_pixels(
    slice_id: torch.Tensor, slices: np.ndarray, max_pixels: int = MAX_PIXELS
) -> list[torch.Tensor]:
    """Indices of up to max_pixels evenly spaced pixels of each of the slices (S,), slice_id (P,)."""
    samples = []
    for i in slices:
        pixels = torch.nonzero(slice_id == int(i)).flatten()
        if len(pixels) > max_pixels:
            pixels = pixels[
                torch.linspace(0, len(pixels) - 1, max_pixels, device=pixels.device).round().long()
            ]
        samples.append(pixels)
    return samples


def virtual_slices(
    data: SliceTensors, slices: np.ndarray, samples: list[torch.Tensor], copies: int
) -> SliceTensors:
    """copies virtual slices per slice (S,): virtual slice s * copies + r is a copy of slices[s], with
    its sampled pixels (samples[s], indices into data), PSF axes and sigma."""
    index = torch.cat([pixels for pixels in samples for _ in range(copies)])
    counts = torch.tensor([len(pixels) for pixels in samples for _ in range(copies)], device=index.device)
    rows = torch.as_tensor(np.repeat(np.asarray(slices), copies), dtype=torch.long, device=index.device)
    return SliceTensors(
        values=data.values.index_select(0, index),
        positions=data.positions.index_select(0, index),
        slice_id=torch.repeat_interleave(torch.arange(len(counts), device=index.device), counts),
        axes=data.axes.index_select(0, rows),
        sigma=data.sigma.index_select(0, rows),
    )


def fitted_residuals(
    observed: torch.Tensor, predicted: torch.Tensor, slice_id: torch.Tensor, n: int
) -> torch.Tensor:
    """Per slice (n,): sum |I - a p| / sum |I| over its pixels, a = sum I p / sum p^2 its
    least-squares intensity scale (held constant for gradients). observed, predicted, slice_id (P,)."""

    def per_slice(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, slice_id, values)

    scale = (per_slice(observed * predicted) / per_slice(predicted * predicted).clamp_min(1e-12)).detach()
    error = per_slice((observed - scale[slice_id] * predicted).abs())
    return error / per_slice(observed.abs()).clamp_min(1e-12)


def least_squares_scales(
    observed: torch.Tensor, predicted: torch.Tensor, slice_id: torch.Tensor, n: int
) -> torch.Tensor:
    """Per slice (n,): the intensity scale sum I p / sum p^2 of observed, predicted, slice_id (P,)."""
    products = torch.zeros(n, dtype=observed.dtype, device=observed.device)
    squares = torch.zeros_like(products)
    products.index_add_(0, slice_id, observed * predicted)
    squares.index_add_(0, slice_id, predicted * predicted)
    return products / squares.clamp_min(1e-12)


def score(
    field_: FrozenGaussians, motion: SliceMotion, data: SliceTensors, k: int, backend: str, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions (P,) and fitted residuals (V,) of V virtual slices at their poses (no gradient)."""
    with torch.no_grad():
        neighbours = neighbour_lists(field_, motion, data, k, backend)
        predicted = torch.cat(
            [
                predict(field_, motion, data, index, neighbours.index_select(0, index), mode)
                for index in torch.arange(data.n_pixels, device=data.values.device).split(SCORE_BATCH)
            ]
        )
        return predicted, fitted_residuals(data.values, predicted, data.slice_id, motion.n)


def refine(
    field_: FrozenGaussians, motion: SliceMotion, data: SliceTensors, k: int, backend: str, mode: str
) -> None:
    """REFINE_STEPS of Adam on the poses of the virtual slices (in place) against the frozen volume."""
    optimizer = torch.optim.Adam(
        [
            {"params": [motion.rotvec], "lr": REFINE_LR_ROTATION},
            {"params": [motion.translation], "lr": REFINE_LR_TRANSLATION},
        ]
    )
    index = torch.arange(data.n_pixels, device=data.values.device)
    neighbours = None
    for step in range(REFINE_STEPS):
        if step % REFINE_REFRESH_EVERY == 0:
            neighbours = neighbour_lists(field_, motion, data, k, backend)
        predicted = predict(field_, motion, data, index, neighbours, mode)
        loss = fitted_residuals(data.values, predicted, data.slice_id, motion.n).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def slices_to_search(
    weight: np.ndarray, residual: np.ndarray, judged: np.ndarray, max_fraction: float = MAX_FRACTION
) -> np.ndarray:
    """Indices of the judged slices (M,) bool that are down-weighted (weight (M,) < 1), the worst
    residuals (M,) first, at most max_fraction of all slices."""
    candidates = np.nonzero(judged & (weight < 1.0) & np.isfinite(residual))[0]
    worst_first = candidates[np.argsort(-residual[candidates], kind="stable")]
    return worst_first[: max(1, int(max_fraction * len(weight)))]


def search_poses(
    field_: GaussianField | FrozenGaussians,
    motion: SliceMotion,
    data: SliceTensors,
    slices: np.ndarray,
    k: int,
    backend: str,
    mode: str,
) -> SearchResult:
    """Search new poses for the slices (S,) of data and move those that gain MIN_GAIN (motion
    changes in place; a moved slice's intensity scale becomes its least-squares one). The
    Gaussians are not changed."""
    # Frozen once: the search's many steps then neither rebuild the covariances nor backpropagate
    # into the Gaussians.
    field_ = field_.frozen()
    device = motion.rotvec.device
    rows = torch.as_tensor(np.asarray(slices), dtype=torch.long, device=device)
    deltas = candidate_rotations()
    s, c = len(slices), deltas.shape[0]
    rotation = motion.rotations().detach().index_select(0, rows).double()
    translation = motion.translation.detach().index_select(0, rows)
    centres = motion.centres.index_select(0, rows)
    poses = candidate_poses(rotation, data.axes.index_select(0, rows).double(), deltas)  # (S, C, 3, 3)
    rotvecs = torch.as_tensor(matrix_to_rotvec(poses.cpu().numpy())).to(motion.rotvec)  # (S, C, 3)

    samples = sample_pixels(data.slice_id, slices)
    everyone = virtual_slices(data, slices, samples, c)
    screened = SliceMotion(
        centres.repeat_interleave(c, 0), rotvecs.reshape(-1, 3), translation.repeat_interleave(c, 0)
    )
    _, scores = score(field_, screened, everyone, k, backend, mode)
    scores = scores.reshape(s, c)
    before = scores[:, 0].clone()
    # The current pose is always among the refined starts, so that a start wins by fitting better,
    # not by having been refined.
    scores[:, 0] = -1.0
    starts = scores.topk(min(REFINED_STARTS, c), dim=1, largest=False).indices  # (S, R)
    r = starts.shape[1]

    chosen = virtual_slices(data, slices, samples, r)
    refined = SliceMotion(
        centres.repeat_interleave(r, 0),
        rotvecs[torch.arange(s, device=device)[:, None], starts].reshape(-1, 3),
        translation.repeat_interleave(r, 0),
    )
    refine(field_, refined, chosen, k, backend, mode)
    predicted, residual = score(field_, refined, chosen, k, backend, mode)
    best = residual.reshape(s, r).argmin(1)
    pick = torch.arange(s, device=device) * r + best
    after = residual[pick]
    moved = after < (1.0 - MIN_GAIN) * before
    with torch.no_grad():
        scales = least_squares_scales(chosen.values, predicted, chosen.slice_id, refined.n)[pick]
        motion.rotvec[rows[moved]] = refined.rotvec[pick][moved]
        motion.translation[rows[moved]] = refined.translation[pick][moved]
        motion.log_scale[rows[moved]] = scales[moved].clamp_min(1e-6).log()
    return SearchResult(
        slices=np.asarray(slices),
        before=before.cpu().numpy(),
        after=torch.where(moved, after, before).cpu().numpy(),
        moved=moved.cpu().numpy(),
    )
