"""Initialization: the problem (slices, reference stack, output grid), the pre-aligned slice motion and
content-adaptive Gaussians sampled from the slices, or an earlier run's (warm start)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..devices import cpu_threads
from ..errors import InputError
from ..io.acquisition import acquisition_ranks, time_pairs
from ..io.slices import SliceSet, coarsen_slices, extract_slices
from ..io.stacks import Stack
from ..model import forward
from ..model.gaussians import GaussianField
from ..model.motion import SliceMotion
from ..model.neighbours import knn
from ..model.volume import check_grid_fits, grid_covering
from ..settings import MAX_GAUSSIANS, MIN_GAUSSIANS, Settings, describe
from .atlas_poses import atlas_field, posed_on_atlas
from .prediction import SliceTensors
from .registration import prealign, slice_motion, stack_registrations
from .warmstart import warm_start

log = logging.getLogger(__name__)


@dataclass
class Problem:
    """Everything the optimizer needs, prepared from the stacks (masks ready, intensities normalized).

    grid_affine (4, 4) voxel -> LPS and grid_shape (nk, nj, ni): the output grid, in the reference
    stack's orientation, covering every masked pixel. time_pairs (Q, 2): slice ids acquired one after
    the other in the same stack.
    """

    stacks: list[Stack]
    slices: SliceSet
    reference: int
    grid_affine: np.ndarray
    grid_shape: tuple[int, int, int]
    n_gaussians: int
    time_pairs: np.ndarray

    @property
    def output_unit(self) -> float:
        """The output is in the units of the reference stack's file."""
        return self.stacks[self.reference].intensity_unit


def prepare(stacks: list[Stack], settings: Settings, volume_path: str | None) -> Problem:
    """Slices, reference stack, Gaussian count and the output grid (checked for size)."""
    slices = extract_slices(stacks, settings.in_plane_fwhm)
    if settings.reference_stack is not None and settings.reference_stack >= len(stacks):
        raise InputError(
            describe("reference_stack"),
            f"stack {settings.reference_stack} does not exist (there are {len(stacks)}, counted from 0)",
        )
    reference = reference_index(stacks) if settings.reference_stack is None else settings.reference_stack
    affine, shape = grid_covering(slices.positions, stacks[reference].direction, settings.output_resolution)
    check_grid_fits(shape, settings.output_resolution, volume_path)
    n_gaussians = settings.n_gaussians or automatic_gaussian_count(
        stacks[reference], settings.gaussians_per_ml
    )
    if n_gaussians > slices.n_pixels:
        log.warning(
            "%s %d is more than the %d masked slice pixels: %d Gaussians are used",
            describe("n_gaussians"), n_gaussians, slices.n_pixels, slices.n_pixels,
        )  # fmt: skip
        n_gaussians = slices.n_pixels
    if n_gaussians < settings.k_neighbours:
        raise InputError(
            describe("k_neighbours"),
            f"{settings.k_neighbours} neighbours per pixel, but the brain holds only {n_gaussians} Gaussians",
        )
    ranks = [acquisition_ranks(stack, settings.slice_order, settings.interleave) for stack in stacks]
    pairs = time_pairs(slices.slice_stack, slices.slice_k, ranks)
    return Problem(stacks, slices, reference, affine, shape, n_gaussians, pairs)


def data_stages(problem: Problem, settings: Settings, device: torch.device) -> dict[str, SliceTensors]:
    """The slice pixels of each stage on the device: "fine", and "coarse" (half resolution) if asked for."""
    stages = {"fine": SliceTensors.from_slices(problem.slices, 1.0, device)}
    if settings.coarse_to_fine:
        coarse = coarsen_slices(problem.slices, problem.stacks, 2)
        stages["coarse"] = SliceTensors.from_slices(coarse, 1.0, device)
    return stages


def automatic_gaussian_count(stack: Stack, per_ml: float) -> int:
    """Gaussians for the brain volume of a stack's mask (ml), within [MIN_GAUSSIANS, MAX_GAUSSIANS]."""
    millilitres = float(stack.mask.sum()) * float(np.prod(stack.spacing)) / 1000.0
    return int(np.clip(round(per_ml * millilitres), MIN_GAUSSIANS, MAX_GAUSSIANS))


def atlas_posed_motion(problem: Problem, settings: Settings, device: torch.device) -> np.ndarray | None:
    """Slice motion (rotvec, translation (M, 3) each, stacked (2, M, 3)) with every slice's pose searched
    against the atlas where the stacks' vote put it (atlas_poses.py), from the stack registrations;
    None where the stacks formed no group."""
    registrations, placement = stack_registrations(
        problem.stacks, problem.reference, settings.seed, settings.gestational_age, True
    )
    if placement is None:
        return None
    slices = problem.slices
    rotvec, translation = slice_motion(registrations, slices)

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32, device=device)

    motion = SliceMotion(tensor(slices.slice_centre), tensor(rotvec), tensor(translation))
    data = SliceTensors.from_slices(slices, 1.0, device)
    posed_on_atlas(
        atlas_field(placement, device), motion, data, settings.k_neighbours, settings.neighbour_backend,
        settings.psf_mode,
    )  # fmt: skip
    return np.stack([motion.rotvec.detach().cpu().numpy(), motion.translation.detach().cpu().numpy()])


def initial_models(
    problem: Problem, settings: Settings, device: torch.device, posed: np.ndarray | None = None
) -> tuple[GaussianField, SliceMotion]:
    """Pre-aligned slice motion (or ``posed``: rotvec and translation (2, M, 3)) and content-adaptive
    Gaussians in the reference stack's frame, or the earlier run's with --init-gaussians."""
    if settings.init_gaussians:
        return warm_start(
            settings.init_gaussians, problem.stacks, problem.slices, problem.reference, settings.seed, device
        )
    slices = problem.slices
    rng = np.random.default_rng(settings.seed)
    if posed is not None:
        rotvec, translation = posed.astype(np.float64)
    elif settings.prealign and len(problem.stacks) > 1:
        rotvec, translation = prealign(
            problem.stacks, slices, problem.reference, settings.seed, settings.gestational_age,
            settings.atlas_prealign,
        )  # fmt: skip
    else:
        rotvec = np.zeros((slices.n_slices, 3))
        translation = np.zeros((slices.n_slices, 3))

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32, device=device)

    motion = SliceMotion(tensor(slices.slice_centre), tensor(rotvec), tensor(translation))
    thickness = np.array([problem.stacks[s].thickness for s in slices.slice_stack])
    gradient = in_plane_gradient(problem.stacks, slices)
    chosen, nominal = sample_centres(
        slices, gradient, problem.n_gaussians, settings.edge_fraction, thickness, rng
    )
    with torch.no_grad():
        slice_id = torch.as_tensor(slices.pixel_slice[chosen], device=device)
        centres = motion.move(tensor(nominal), slice_id, motion.rotations())
    scales = initial_scales(centres.cpu().numpy().astype(np.float64))
    values = tensor(slices.values[chosen])
    field_ = GaussianField(centres, tensor(scales)[:, None].repeat(1, 3), values)
    with torch.no_grad():
        means, cov6, det, intensities = field_.packed()
        neighbours = knn(means, means, min(settings.k_neighbours, field_.n), settings.neighbour_backend)
        mixture = forward.evaluate(means, neighbours, means, cov6, det, intensities, None, "none")
        if settings.psf_mode != "normalized":
            # A normalized field predicts the weighted mean of its intensities: no overlap to undo.
            field_.intensities.mul_(initial_intensity_gain(values, mixture))
    return field_, motion


def reference_index(stacks: list[Stack]) -> int:
    """The stack with the most masked voxels in world volume, among those whose mask was given (not
    propagated) if any: the anatomy frame is its frame."""
    given = any(stack.mask_path is not None for stack in stacks)
    volumes = [
        stack.mask.sum() * float(np.prod(stack.spacing)) if stack.mask_path is not None or not given else -1.0
        for stack in stacks
    ]
    return int(np.argmax(volumes))


def in_plane_gradient(stacks: list[Stack], slices: SliceSet) -> np.ndarray:
    """Gradient magnitude (P,) of every pixel within its slice, in intensity per mm."""
    magnitude = np.zeros(slices.n_pixels, dtype=np.float32)
    stack_of_pixel = slices.slice_stack[slices.pixel_slice]
    for s, stack in enumerate(stacks):
        gj, gi = np.gradient(stack.data, stack.spacing[1], stack.spacing[0], axis=(1, 2))
        on_stack = stack_of_pixel == s
        magnitude[on_stack] = np.hypot(gi, gj).ravel()[slices.pixel_index[on_stack]]
    return magnitude


def sample_centres(
    slices: SliceSet,
    gradient: np.ndarray,
    n: int,
    edge_fraction: float,
    thickness: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Content-adaptive sampling of n pixels: p ~ edge_fraction |grad I| / mean + (1 - edge_fraction).

    Returns the chosen pixel indices (n,) and nominal positions (n, 3) jittered through the slab
    each pixel integrates (uniform over the slice thickness along the slice normal).
    thickness (M,) is the slice thickness of each slice in mm.
    """
    weight = edge_fraction * gradient / max(float(gradient.mean()), 1e-12) + (1.0 - edge_fraction)
    weight = weight + 1e-12
    n = min(n, slices.n_pixels)
    chosen = rng.choice(slices.n_pixels, size=n, replace=False, p=weight / weight.sum())
    slice_id = slices.pixel_slice[chosen]
    normal = slices.slice_axes[slice_id, :, 2]
    offset = (rng.random(n) - 0.5) * thickness[slice_id]
    return chosen, slices.positions[chosen] + normal * offset[:, None]


def initial_scales(centres: np.ndarray, neighbours: int = 4) -> np.ndarray:
    """Isotropic scales (n,) in mm: half the mean distance to the nearest sampled centres."""
    from scipy.spatial import cKDTree

    distance, _ = cKDTree(centres).query(centres, k=neighbours + 1, workers=cpu_threads())
    return 0.5 * distance[:, 1:].mean(axis=1)


def initial_intensity_gain(values: torch.Tensor, predicted: torch.Tensor) -> float:
    """The global factor that makes a freshly seeded mixture (overlapping Gaussians) match the data."""
    return float((values * predicted).sum() / (predicted * predicted).sum().clamp_min(1e-12))
