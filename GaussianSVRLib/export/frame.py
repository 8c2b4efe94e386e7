"""The fitted model as a run hands it back: in the output frame and in the units of the input files.

The global frame of a reconstruction is arbitrary (the volume and all slices can move together);
fixing it so that the reference stack's slices sit, on average, where its header puts them makes the
output overlay the input stacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from ..fit.initialize import Problem
from ..geometry import kabsch, matrix_to_rotvec, set_image_geometry
from ..io.gaussians_file import continuation_arrays
from ..model.gaussians import GaussianField, transform_state
from ..model.motion import SliceMotion, compose_rigid
from ..model.volume import render
from ..settings import Settings
from .support import StackSlices, voted_brain

#: Preview volumes are rendered this much coarser than the output.
PREVIEW_COARSENING = 2.0
#: Pixels of the reference stack used to fix the frame (a strided sample: the fit is over-determined).
GAUGE_SAMPLE = 20_000


@dataclass
class Snapshot:
    """The model in the output frame (LPS mm, units of the reference stack's file).

    means (N, 3), covariances (N, 3, 3), intensities (N,); per slice (M,) rotation vectors (M, 3) and
    translations (M, 3) of its map into the output frame, and its intensity scale against the volume.
    """

    means: np.ndarray
    covariances: np.ndarray
    intensities: np.ndarray
    rotvec: np.ndarray
    translation: np.ndarray
    scale: np.ndarray

    def gaussians(self) -> dict[str, np.ndarray]:
        return {"means": self.means, "covariances": self.covariances, "intensities": self.intensities}


def gauge(problem: Problem, motion: SliceMotion) -> tuple[torch.Tensor, torch.Tensor]:
    """The rigid map (R (3, 3), b (3,)) that takes the anatomy frame back onto the reference stack."""
    slices = problem.slices
    on_reference = np.nonzero(slices.slice_stack[slices.pixel_slice] == problem.reference)[0]
    sample = on_reference[:: max(1, len(on_reference) // GAUGE_SAMPLE)]
    device = motion.centres.device
    with torch.no_grad():
        nominal = torch.as_tensor(slices.positions[sample], dtype=torch.float32, device=device)
        slice_id = torch.as_tensor(slices.pixel_slice[sample], device=device)
        moved = motion.move(nominal, slice_id, motion.rotations())
    rotation, offset = kabsch(
        moved.cpu().numpy().astype(np.float64), nominal.cpu().numpy().astype(np.float64)
    )
    return (
        torch.as_tensor(rotation, dtype=torch.float32, device=device),
        torch.as_tensor(offset, dtype=torch.float32, device=device),
    )


def snapshot(problem: Problem, field_: GaussianField, motion: SliceMotion) -> Snapshot:
    """The Gaussians and slice maps in the output frame.

    Intensities are in the reference stack's file units: the optimizer's unit (each stack's normalized
    voxels) times the reference stack's unit and its median slice scale. A slice's scale is reported
    against that volume: its own scale times its stack's unit over the reference's.
    """
    rotation, offset = gauge(problem, motion)
    state = transform_state(field_.state(), rotation, offset)
    scale = motion.intensity_scale().detach().cpu().numpy().astype(np.float64)
    on_reference = problem.slices.slice_stack == problem.reference
    reference_scale = float(np.median(scale[on_reference]))
    units = np.array([stack.intensity_unit for stack in problem.stacks])
    with torch.no_grad():
        rotations, translation = compose_rigid(
            rotation, offset, motion.rotations(), motion.translation, motion.centres
        )
    return Snapshot(
        means=state["means"].cpu().numpy(),
        covariances=state["covariances"].cpu().numpy(),
        intensities=(state["intensities"] * (problem.output_unit * reference_scale)).cpu().numpy(),
        rotvec=matrix_to_rotvec(rotations.cpu().numpy().astype(np.float64)),
        translation=translation.cpu().numpy().astype(np.float64),
        scale=scale * units[problem.slices.slice_stack] / problem.output_unit,
    )


def continuation(problem: Problem, state: Snapshot) -> dict[str, np.ndarray]:
    """The arrays a Gaussians file carries so that a later run can continue from it."""
    return continuation_arrays(
        problem.stacks, problem.slices, problem.reference, state.rotvec, state.translation, state.scale
    )


def volume_image(
    state: Snapshot,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    settings: Settings,
    device: torch.device,
    brain: list[StackSlices] | None = None,
) -> sitk.Image:
    """The Gaussians sampled on a grid (voxel -> LPS affine (4, 4), shape (nk, nj, ni)) on the device,
    negatives clipped; with ``brain``, zero outside the brain those stacks agree on (support.py)."""

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32, device=device)

    array = render(
        tensor(state.means),
        tensor(state.covariances),
        tensor(state.intensities),
        affine,
        shape,
        settings.k_neighbours,
        settings.neighbour_backend,
        normalized=settings.psf_mode == "normalized",
    )
    if brain is not None:
        array *= voted_brain(affine, shape, brain, device)
    return set_image_geometry(sitk.GetImageFromArray(np.clip(array, 0, None)), affine)


def preview_grid(problem: Problem) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The output grid PREVIEW_COARSENING times coarser."""
    affine = problem.grid_affine.copy()
    affine[:3, :3] *= PREVIEW_COARSENING
    shape = tuple(int(np.ceil(n / PREVIEW_COARSENING)) for n in problem.grid_shape)
    return affine, shape  # type: ignore[return-value]
