"""Thick-slice stacks simulated from a high-resolution volume, as a fetal MRI scanner would acquire them.

The simulation is the ground truth for a closed-form (analytic PSF) method, so it integrates the PSF
numerically: every slice pixel is the Gaussian-weighted mean of the volume sampled (trilinear) on a
grid of sub-sample points covering +/-3 sigma of the slice PSF. Neighbouring pixels share their
sub-samples: the grid is one fine grid per slice (in-plane step = pixel size / m, m an integer),
reduced by separable Gaussian weights. That is exactly the per-pixel weighted mean over a 3-D
sub-sample grid, computed about m^2 times faster. Steps: ``psf_steps``; on the atlas, halving them
changes the slices by < 0.4 % of the intensity range (1 % is the tested bound).

Geometry and motion follow ``geometry.py``: the pixel at nominal world position p (stack affine)
sees the volume at x = R (p - c) + c + t, c the slice centre. ``transforms.json`` records, per slice,
the full (rotation, translation) in that convention, per-stack misalignment already composed in.

Slices are acquired in time order (interleaved by default, as the scanner does); each stack gets a
BIDS sidecar (``stack_NN.json``) with its SliceTiming. Motion is either independent per slice or a
trajectory in acquisition time: smooth, with sudden jumps (the fetus kicks).

Optional corruptions, for testing outlier detection and intensity correction: signal drop-out,
slices replaced by neighbouring anatomy, slices blurred by motion during their acquisition (each
slice carries at most one, flagged in transforms.json), a smooth multiplicative bias field per
stack and another intensity scale for the last stack. They draw from random generators of their
own, so asking for them leaves the motion, the noise and every other slice as they were.
Stack and mask paths in it are file names relative to the JSON's folder, so a simulated case can
be moved; ``read_transforms`` returns them absolute, ``read_truth`` the flat per-slice list.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from ..errors import InputError
from ..geometry import (
    apply_affine,
    image_affine,
    matrix_to_rotvec,
    on_grid,
    rotvec_to_matrix_np,
    set_image_geometry,
)
from ..io.acquisition import default_order
from ..io.outputs import write_atomically, write_image
from ..io.slices import FWHM_TO_SIGMA, IN_PLANE_FWHM_FACTOR
from ..io.stacks import sidecar_path
from ..settings import MotionModel, SliceOrder

#: Stack orientations (columns = i, j, k axes in LPS world), cycled: axial, coronal, sagittal, axial.
#: All are proper rotations; the fourth (axial again) is offset by half a slice spacing.
ORIENTATIONS = (
    np.eye(3),
    np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]),
    np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
    np.eye(3),
)
OBLIQUE_RANGE_DEG = (15.0, 40.0)
DROPOUT_FACTOR_RANGE = (0.05, 0.3)
#: A replaced slice shows the anatomy this far (mm) along its normal, towards its stack's middle.
REPLACED_SHIFT_RANGE_MM = (8.0, 20.0)
#: A blurred slice averages this many poses (inclusive range) along a path spanning an in-plane
#: rotation and an in-plane translation drawn from these ranges.
BLUR_POSITIONS_RANGE = (5, 9)
BLUR_ROTATION_RANGE_DEG = (5.0, 10.0)
BLUR_TRANSLATION_RANGE_MM = (2.0, 4.0)
#: Seconds between two slices of a stack (single-shot fast spin echo: about one slice per second).
SLICE_SECONDS = 0.8
#: A trajectory's smooth part varies over this many slices of acquisition time (Gaussian sigma); a
#: jump moves the head by 0.5-1 times the motion's amplitude along a random direction.
TRAJECTORY_SMOOTHING_SLICES = 5.0
JUMP_SIZE_RANGE = (0.5, 1.0)
#: Lower bound of the bias field: it is only reached outside the mask's box at large amplitudes.
BIAS_FLOOR = 0.1
#: Half-width of the PSF support and of the sub-sample grid, in standard deviations.
PSF_SUPPORT_SIGMAS = 3.0
#: Sub-sample points evaluated at once (bounds memory: about 50 bytes each).
POINTS_PER_CHUNK = 2_000_000


@dataclass
class SimulationResult:
    stack_paths: list[str]
    mask_paths: list[str]
    transforms_path: str


@dataclass
class StackGeometry:
    """A simulated stack's grid: voxel -> LPS affine, size (ni, nj, nk) and the nominal FOV centre."""

    affine: np.ndarray  # (4, 4) voxel -> LPS
    size: tuple[int, int, int]  # (ni, nj, nk)
    centre: np.ndarray  # (3,) nominal centre of the field of view


def _random_unit(rng: np.random.Generator, dimensions: int = 3) -> np.ndarray:
    v = rng.normal(size=dimensions)
    return v / np.linalg.norm(v)


def _mask_array(mask: sitk.Image, volume: sitk.Image) -> np.ndarray:
    """The mask on the volume's grid as bool [k, j, i] (nearest neighbour if it is on another grid)."""
    binary = sitk.Cast(mask > 0, sitk.sitkUInt8)
    binary = on_grid(binary, volume)
    array = sitk.GetArrayFromImage(binary) > 0
    if not array.any():
        raise InputError(None, "the brain mask is empty on the volume's grid")
    return array


def stack_geometry(
    mask_world: np.ndarray,
    direction: np.ndarray,
    in_plane: float,
    spacing: float,
    margin: float,
    k_shift: float,
) -> StackGeometry:
    """A stack grid with the given direction (3, 3) covering the points mask_world (P, 3) plus a margin.

    The grid is centred on the points' extent along each stack axis; k_shift (mm) moves it along k.
    """
    steps = np.array([in_plane, in_plane, spacing])
    along = mask_world @ direction  # coordinates along the stack axes
    lo, hi = along.min(0) - margin, along.max(0) + margin
    n = np.ceil((hi - lo) / steps).astype(int) + 1
    start = (lo + hi) / 2.0 - (n - 1) * steps / 2.0
    start[2] += k_shift
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(steps)
    affine[:3, 3] = direction @ start
    centre = apply_affine(affine, (n - 1) / 2.0)
    return StackGeometry(affine, (int(n[0]), int(n[1]), int(n[2])), centre)


def _box_corners(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World positions (8, 3) of the corners of the mask's bounding box (voxel centres)."""
    kk, jj, ii = np.nonzero(mask)
    lo, hi = (ii.min(), jj.min(), kk.min()), (ii.max(), jj.max(), kk.max())
    corners = (
        np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij"), dtype=np.float64).reshape(3, -1).T
    )
    return apply_affine(affine, corners)


def psf_offsets(sigma: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (n,) in units of ``step`` within +/-3 sigma and their normalized Gaussian weights."""
    half = int(np.floor(PSF_SUPPORT_SIGMAS * sigma / step + 1e-9))
    index = np.arange(-half, half + 1)
    weights = np.exp(-0.5 * (index * step / sigma) ** 2)
    return index, weights / weights.sum()


def psf_steps(sigma: np.ndarray, voxel: float, oversampling: float = 1.0) -> np.ndarray:
    """Sub-sample steps (3,) mm along the slice axes: min(PSF sigma, volume voxel) / oversampling.

    A step of one sigma integrates the Gaussian weights accurately; one voxel resolves the kinks of
    the trilinear interpolant. Halving both changes the atlas simulation by < 0.4 % of its range.
    """
    return np.minimum(sigma, voxel) / oversampling


def _fine_plane(
    volume: torch.Tensor, to_grid: np.ndarray, fi: np.ndarray, fj: np.ndarray, fk: np.ndarray, w_k: np.ndarray
) -> np.ndarray:
    """Volume samples (trilinear) on the fine grid fk x fj x fi, reduced through-plane: (J, I) float64.

    volume (1, 1, D, H, W); to_grid (4, 4) maps stack voxel coordinates (i, j, k), motion included,
    to grid_sample's normalized volume coordinates; fi, fj, fk in stack voxel units.
    """
    lin, off = to_grid[:3, :3].T, to_grid[:3, 3]  # lin rows: grid step per unit of i, j, k
    grid = (
        (off + fk[:, None] * lin[2])[:, None, None, :]
        + (fj[:, None] * lin[1])[None, :, None, :]
        + (fi[:, None] * lin[0])[None, None, :, :]
    ).astype(np.float32)
    samples = torch.nn.functional.grid_sample(
        volume, torch.from_numpy(grid)[None], mode="bilinear", padding_mode="zeros", align_corners=True
    )[0, 0].numpy()
    return np.tensordot(w_k, samples, axes=(0, 0))


def sample_slices_psf(
    volume: np.ndarray,
    world_to_index: np.ndarray,
    affine: np.ndarray,
    size: tuple[int, int, int],
    ks: np.ndarray,
    rotations: np.ndarray,
    translations: np.ndarray,
    sigma: np.ndarray,
    steps: np.ndarray,
) -> np.ndarray:
    """PSF-integrated slices of a volume, by numerical quadrature.

    volume [k, j, i] with world_to_index (4, 4) its LPS -> voxel affine; affine (4, 4) and size
    (ni, nj, nk) define the stack; ks (B,) the slices to simulate, with rotations (B, 3, 3) and
    translations (B, 3) of their motion; sigma (3,) the PSF standard deviations (mm) and steps (3,)
    the largest sub-sample steps (mm) along the stack axes. In-plane the step is shrunk to the pixel
    size / an integer so that neighbouring pixels share sub-samples. Returns (B, nj, ni) float64.
    """
    ni, nj, _ = size
    axes_steps = affine[:3, :3]
    pixel = np.linalg.norm(axes_steps, axis=0)
    mi, mj = np.maximum(np.ceil(pixel[:2] / steps[:2] - 1e-9), 1).astype(int)
    off_i, w_i = psf_offsets(sigma[0], pixel[0] / mi)
    off_j, w_j = psf_offsets(sigma[1], pixel[1] / mj)
    off_k, w_k = psf_offsets(sigma[2], steps[2])
    # Fine grid in stack voxel units: output pixel i averages fine columns i * mi + off_i.
    fi = np.arange(off_i[0], (ni - 1) * mi + off_i[-1] + 1) / mi
    fk = off_k * steps[2] / pixel[2]
    rows_per_chunk = max(1, POINTS_PER_CHUNK // (len(fi) * len(fk) * mj))
    # grid_sample wants (x, y, z) = volume (i, j, k) normalized to [-1, 1] over voxel centres.
    shape_ijk = np.array(volume.shape[::-1], dtype=np.float64)
    to_normalized = np.eye(4)
    to_normalized[:3, :3] = np.diag(2.0 / np.maximum(shape_ijk - 1, 1))
    to_normalized[:3, 3] = -1.0
    volume_t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    out = np.empty((len(ks), nj, ni))
    for b, k in enumerate(ks):
        centre = apply_affine(affine, np.array([(ni - 1) / 2.0, (nj - 1) / 2.0, k]))
        # Stack voxel (i, j, k) -> volume index, motion included: W (R (A v + o - c) + c + t).
        moved = np.eye(4)
        moved[:3, :3] = rotations[b] @ axes_steps
        moved[:3, 3] = rotations[b] @ (affine[:3, 3] - centre) + centre + translations[b]
        to_grid = to_normalized @ world_to_index @ moved
        to_grid[:3, 3] += to_grid[:3, 2] * k
        for j0 in range(0, nj, rows_per_chunk):
            n = min(rows_per_chunk, nj - j0)
            fj = np.arange(j0 * mj + off_j[0], (j0 + n - 1) * mj + off_j[-1] + 1) / mj
            plane = _fine_plane(volume_t, to_grid, fi, fj, fk, w_k)
            rows = sum(w * plane[a : a + (n - 1) * mj + 1 : mj] for a, w in enumerate(w_j))
            out[b, j0 : j0 + n] = sum(w * rows[:, a : a + (ni - 1) * mi + 1 : mi] for a, w in enumerate(w_i))
    return out


def sample_slices_nearest_mask(
    mask: np.ndarray,
    world_to_index: np.ndarray,
    affine: np.ndarray,
    size: tuple[int, int, int],
    rotations: np.ndarray,
    translations: np.ndarray,
) -> np.ndarray:
    """The mask [k, j, i] seen through each moved slice: trilinear at pixel centres, threshold 0.5.

    rotations (nk, 3, 3), translations (nk, 3). Returns uint8 (nk, nj, ni).
    """
    ni, nj, nk = size
    jj, ii = np.meshgrid(np.arange(nj), np.arange(ni), indexing="ij")
    out = np.empty((nk, nj, ni), dtype=np.uint8)
    values = mask.astype(np.float32)
    for k in range(nk):
        index = np.stack([ii, jj, np.full_like(ii, k)], -1).astype(np.float64)
        nominal = apply_affine(affine, index)
        centre = apply_affine(affine, np.array([(ni - 1) / 2.0, (nj - 1) / 2.0, k]))
        world = (nominal - centre) @ rotations[k].T + centre + translations[k]
        vox = apply_affine(world_to_index, world)
        sampled = ndimage.map_coordinates(values, vox[..., ::-1].reshape(-1, 3).T, order=1, cval=0.0)
        out[k] = (sampled.reshape(nj, ni) >= 0.5).astype(np.uint8)
    return out


def _slice_motion(
    rng: np.random.Generator, nk: int, max_rotation_deg: float, max_translation_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice rotation vectors (nk, 3) radians and translations (nk, 3) mm, uniform per component."""
    rot = rng.uniform(-1.0, 1.0, size=(nk, 3)) * np.deg2rad(max_rotation_deg)
    trans = rng.uniform(-1.0, 1.0, size=(nk, 3)) * max_translation_mm
    return rot, trans


def trajectory(rng: np.random.Generator, n: int, jumps: int) -> np.ndarray:
    """A motion path (n, 6) over n instants of acquisition time, every component spanning at most
    [-1, 1]: smooth random drift (TRAJECTORY_SMOOTHING_SLICES) plus ``jumps`` sudden steps."""
    path = ndimage.gaussian_filter1d(rng.standard_normal((n, 6)), TRAJECTORY_SMOOTHING_SLICES, axis=0)
    path /= np.abs(path).max(axis=0) + 1e-12
    for at in rng.choice(np.arange(1, n), size=min(jumps, n - 1), replace=False):
        path[at:] += rng.uniform(*JUMP_SIZE_RANGE) * _random_unit(rng, 6)
    path -= 0.5 * (path.max(axis=0) + path.min(axis=0))
    return path / (np.abs(path).max(axis=0) + 1e-12)


def _trajectory_motion(
    rng: np.random.Generator,
    ranks: np.ndarray,
    max_rotation_deg: float,
    max_translation_mm: float,
    jumps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice rotation vectors (nk, 3) and translations (nk, 3) read off a trajectory at each
    slice's acquisition rank (nk,)."""
    path = trajectory(rng, len(ranks), jumps)[ranks]
    return path[:, :3] * np.deg2rad(max_rotation_deg), path[:, 3:] * max_translation_mm


def _compose_misalignment(
    centres: np.ndarray,
    rot: np.ndarray,
    trans: np.ndarray,
    mis_rot: np.ndarray,
    mis_trans: np.ndarray,
    pivot: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Slice motion followed by the stack misalignment x -> Rs (x - ps) + ps + ts, in slice convention.

    Rs (R (p - c) + c + t - ps) + ps + ts = (Rs R)(p - c) + c + t' with t' = Rs (c + t - ps) + ps + ts - c.
    Returns rotation matrices (nk, 3, 3) and translations (nk, 3).
    """
    rs = rotvec_to_matrix_np(mis_rot)
    matrices = rs[None] @ rotvec_to_matrix_np(rot)
    translations = (centres + trans - pivot) @ rs.T + pivot + mis_trans - centres
    return matrices, translations


def _write_atomic_json(data: dict[str, Any], path: Path) -> None:
    """JSON with every list of numbers on one line (one slice per few lines, not one number per line)."""
    text = re.sub(
        r"\[\s*([^\[\]{}\"]*?)\s*\]",
        lambda m: "[" + " ".join(m.group(1).split()) + "]",
        json.dumps(data, indent=1),
    )
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _image(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    return set_image_geometry(sitk.GetImageFromArray(array), affine)


def _check_settings(settings: dict[str, Any]) -> None:
    if settings["n_stacks"] < 1:
        raise InputError(None, f"n_stacks must be at least 1, got {settings['n_stacks']}")
    for name in ("in_plane", "thickness", "spacing", "psf_oversampling"):
        if not settings[name] > 0:
            raise InputError(None, f"{name} must be positive, got {settings[name]}")
    for name in ("noise", "max_translation_mm", "stack_misalignment_mm", "margin_mm"):
        if not settings[name] >= 0:
            raise InputError(None, f"{name} must be non-negative, got {settings[name]}")
    for name, kind in (("motion", MotionModel), ("slice_order", SliceOrder)):
        if settings[name] not in get_args(kind):
            raise InputError(
                None, f"{name} must be one of {', '.join(get_args(kind))}, got {settings[name]!r}"
            )
    if not (settings["jumps"] >= 0 and settings["interleave"] >= 1):
        raise InputError(None, "jumps must be non-negative and interleave at least 1")
    for name in ("dropout", "replaced", "blurred"):
        if not 0.0 <= settings[name] <= 1.0:
            raise InputError(None, f"{name} must be in [0, 1], got {settings[name]}")
    if settings["dropout"] + settings["replaced"] + settings["blurred"] > 1.0:
        raise InputError(None, "dropout + replaced + blurred must be at most 1 (one corruption per slice)")
    if not (np.isfinite(settings["stack_intensity_scale"]) and settings["stack_intensity_scale"] > 0):
        raise InputError(
            None, f"stack_intensity_scale must be positive, got {settings['stack_intensity_scale']}"
        )
    if not 0.0 <= settings["bias_field"] < 1.0:
        raise InputError(None, f"bias_field must be in [0, 1), got {settings['bias_field']}")
    max_angle = np.sqrt(3.0) * settings["max_rotation_deg"] + settings["stack_misalignment_deg"]
    if not (
        settings["max_rotation_deg"] >= 0 and settings["stack_misalignment_deg"] >= 0 and max_angle < 180
    ):
        raise InputError(
            None,
            "rotations must be non-negative with sqrt(3) x max_rotation_deg + stack_misalignment_deg "
            f"below 180 degrees (got {max_angle:.1f}) so that every slice rotation vector is unique",
        )


@dataclass
class _StackPlan:
    """Everything drawn at random for one stack (nk slices)."""

    geometry: StackGeometry
    centres: np.ndarray  # (nk, 3) slice pivots, nominal LPS mm
    rotations: np.ndarray  # (nk, 3, 3) slice motion, stack misalignment composed in
    translations: np.ndarray  # (nk, 3)
    factors: np.ndarray  # (nk,) signal drop-out multipliers, 1 for kept slices
    misalignment: dict[str, list[float]]
    ranks: np.ndarray  # (nk,) acquisition rank of every slice


def _plan_stack(
    index: int, rng: np.random.Generator, corners: np.ndarray, settings: dict[str, Any]
) -> _StackPlan:
    """Orientation, field of view, motion and drop-outs of stack ``index``; corners (8, 3) of the mask box."""
    direction = ORIENTATIONS[index % len(ORIENTATIONS)]
    if settings["oblique"]:
        angle = np.deg2rad(rng.uniform(*OBLIQUE_RANGE_DEG))
        direction = rotvec_to_matrix_np(_random_unit(rng) * angle) @ direction
    spacing = settings["spacing"]
    k_shift = spacing / 2.0 if index % len(ORIENTATIONS) == 3 else 0.0
    geometry = stack_geometry(
        corners, direction, settings["in_plane"], spacing, settings["margin_mm"], k_shift
    )
    ni, nj, nk = geometry.size
    index_centres = np.stack([np.full(nk, (ni - 1) / 2.0), np.full(nk, (nj - 1) / 2.0), np.arange(nk)], -1)
    centres = apply_affine(geometry.affine, index_centres)
    ranks = default_order(nk, settings["slice_order"], settings["interleave"])
    if settings["motion"] == "trajectory":
        rot, trans = _trajectory_motion(
            rng, ranks, settings["max_rotation_deg"], settings["max_translation_mm"], settings["jumps"]
        )
    else:
        rot, trans = _slice_motion(rng, nk, settings["max_rotation_deg"], settings["max_translation_mm"])
    mis_rot = _random_unit(rng) * np.deg2rad(settings["stack_misalignment_deg"]) + 0.0  # no -0.0 in JSON
    mis_trans = _random_unit(rng) * settings["stack_misalignment_mm"] + 0.0
    rotations, translations = _compose_misalignment(centres, rot, trans, mis_rot, mis_trans, geometry.centre)
    factors = np.ones(nk)
    dropped = rng.choice(nk, size=int(round(settings["dropout"] * nk)), replace=False)
    factors[dropped] = rng.uniform(*DROPOUT_FACTOR_RANGE, size=len(dropped))
    misalignment = {
        "rotation": mis_rot.tolist(),
        "translation": mis_trans.tolist(),
        "centre": geometry.centre.tolist(),
    }
    return _StackPlan(geometry, centres, rotations, translations, factors, misalignment, ranks)


def _unit_axes(geometry: StackGeometry) -> np.ndarray:
    """The stack's i, j, k directions as unit columns (3, 3); k is the slice normal."""
    return geometry.affine[:3, :3] / np.linalg.norm(geometry.affine[:3, :3], axis=0)


def _plan_outliers(
    seed: int, index: int, plan: _StackPlan, has_brain: np.ndarray, settings: dict[str, Any]
) -> dict[int, dict[str, Any]]:
    """Replaced and blurred slices of stack ``index``: slice k -> the fields of its record.

    Chosen among the slices without drop-out whose mask is not empty (has_brain (nk,)): a
    corruption where the reconstruction ignores the slice would test nothing. A replaced slice
    shows the anatomy ``replaced_shift_mm`` along its moved normal R n (towards the stack's
    middle); a blurred slice is the mean of ``positions`` poses spanning, in its plane, a rotation
    of ``rotation_deg`` and a translation ``translation_mm`` (world vector), centred on its
    recorded pose.
    """
    nk = len(plan.factors)
    order = np.random.default_rng([seed, index, 1]).permutation(
        np.nonzero((plan.factors == 1.0) & has_brain)[0]
    )
    n_replaced = min(int(round(settings["replaced"] * nk)), len(order))
    n_blurred = min(int(round(settings["blurred"] * nk)), len(order) - n_replaced)
    axes = _unit_axes(plan.geometry)
    outliers: dict[int, dict[str, Any]] = {}
    rng = np.random.default_rng([seed, index, 2])
    for k in np.sort(order[:n_replaced]):
        towards_middle = np.sign((nk - 1) / 2.0 - k) or rng.choice([-1.0, 1.0])
        outliers[int(k)] = {
            "replaced_shift_mm": float(towards_middle * rng.uniform(*REPLACED_SHIFT_RANGE_MM))
        }
    rng = np.random.default_rng([seed, index, 3])
    for k in np.sort(order[n_replaced : n_replaced + n_blurred]):
        positions = int(rng.integers(BLUR_POSITIONS_RANGE[0], BLUR_POSITIONS_RANGE[1] + 1))
        angle = rng.choice([-1.0, 1.0]) * rng.uniform(*BLUR_ROTATION_RANGE_DEG)
        heading = rng.uniform(0.0, 2.0 * np.pi)
        shift = rng.uniform(*BLUR_TRANSLATION_RANGE_MM) * (
            np.cos(heading) * axes[:, 0] + np.sin(heading) * axes[:, 1]
        )
        outliers[int(k)] = {
            "blur": {"positions": positions, "rotation_deg": float(angle), "translation_mm": shift.tolist()}
        }
    return outliers


def _acquisition_poses(
    plan: _StackPlan, outliers: dict[int, dict[str, Any]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pose a stack's slices are sampled at; a slice is the mean of its poses' PSF samples.

    Returns slice indices ks (B,), rotations (B, 3, 3) and translations (B, 3), sorted by slice:
    one pose per slice, the recorded one, except for corrupted slices (see ``_plan_outliers``).
    A pose x = R (p - c) + c + t preceded by an in-plane motion p -> Rb (p - c) + c + tb of the
    slice is x = (R Rb)(p - c) + c + (R tb + t).
    """
    axes = _unit_axes(plan.geometry)
    ks, rotations, translations = [], [], []
    for k, (rotation, translation) in enumerate(zip(plan.rotations, plan.translations, strict=True)):
        outlier = outliers.get(k, {})
        if "replaced_shift_mm" in outlier:
            poses = [(rotation, translation + outlier["replaced_shift_mm"] * rotation @ axes[:, 2])]
        elif "blur" in outlier:
            blur = outlier["blur"]
            path = np.linspace(-0.5, 0.5, blur["positions"])
            in_plane = rotvec_to_matrix_np(path[:, None] * np.deg2rad(blur["rotation_deg"]) * axes[:, 2])
            offsets = path[:, None] * np.asarray(blur["translation_mm"])
            poses = [
                (rotation @ r, rotation @ o + translation) for r, o in zip(in_plane, offsets, strict=True)
            ]
        else:
            poses = [(rotation, translation)]
        ks += [k] * len(poses)
        rotations += [r for r, _ in poses]
        translations += [t for _, t in poses]
    return np.array(ks), np.array(rotations), np.array(translations)


def _axis_extremes(linear: np.ndarray, quadratic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum and maximum (3,) of linear u + quadratic u^2 over u in [-1, 1], per axis."""
    vertex = np.clip(-linear / np.where(quadratic == 0, np.inf, 2.0 * quadratic), -1.0, 1.0)
    candidates = np.stack([-np.ones(3), np.ones(3), vertex])
    values = linear * candidates + quadratic * candidates**2
    return values.min(0), values.max(0)


def _plan_bias(seed: int, index: int, corners: np.ndarray, amplitude: float) -> dict[str, Any]:
    """A random bias field of this amplitude over the mask's box (corners (8, 3)); see ``bias_multiplier``."""
    rng = np.random.default_rng([seed, index, 4])
    linear, quadratic = rng.uniform(-1.0, 1.0, 3), rng.uniform(-1.0, 1.0, 3)
    low, high = _axis_extremes(linear, quadratic)
    norm = max(abs(low.sum()), abs(high.sum()))
    lo, hi = corners.min(0), corners.max(0)
    return {
        "amplitude": amplitude,
        "centre": ((lo + hi) / 2.0).tolist(),
        "half_extent": ((hi - lo) / 2.0).tolist(),
        "linear": (linear / norm).tolist(),
        "quadratic": (quadratic / norm).tolist(),
        "floor": BIAS_FLOOR,
    }


def bias_multiplier(points: np.ndarray, parameters: dict[str, Any]) -> np.ndarray:
    """A stack's multiplicative bias field (as in transforms.json) at world points (..., 3): (...,).

    max(1 + amplitude g(u), floor) with u = (x - centre) / half_extent per world axis and
    g(u) = sum over axes of linear u + quadratic u^2, scaled so that max |g| over the mask's box
    (|u| <= 1) is exactly 1: over the box the field spans [1 - amplitude, 1 + amplitude] and
    reaches one of the two bounds.
    """
    u = (points - np.asarray(parameters["centre"])) / np.asarray(parameters["half_extent"])
    g = u @ np.asarray(parameters["linear"]) + (u * u) @ np.asarray(parameters["quadratic"])
    return np.maximum(1.0 + parameters["amplitude"] * g, parameters["floor"])


def _pixel_centres(geometry: StackGeometry) -> np.ndarray:
    """Nominal world positions (nk, nj, ni, 3) of a stack's pixels."""
    ni, nj, nk = geometry.size
    kk, jj, ii = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    return apply_affine(geometry.affine, np.stack([ii, jj, kk], -1).astype(np.float64))


def _stack_record(
    plan: _StackPlan,
    outliers: dict[int, dict[str, Any]],
    stack_name: str,
    mask_name: str,
    settings: dict[str, Any],
    intensity_scale: float,
    bias: dict[str, Any] | None,
) -> dict[str, Any]:
    """The transforms.json entry of one stack."""
    rotvecs = matrix_to_rotvec(plan.rotations)
    return {
        "path": stack_name,
        "mask_path": mask_name,
        "thickness": settings["thickness"],
        "spacing": settings["spacing"],
        "in_plane": settings["in_plane"],
        "size": list(plan.geometry.size),
        "affine": plan.geometry.affine.tolist(),
        "misalignment": plan.misalignment,
        "intensity_scale": intensity_scale,
        "bias_field": bias,
        "slices": [
            {
                "k": k,
                "acquisition_rank": int(plan.ranks[k]),
                "centre": plan.centres[k].tolist(),
                "rotation": rotvecs[k].tolist(),
                "translation": plan.translations[k].tolist(),
                "dropout": bool(plan.factors[k] < 1.0),
                "dropout_factor": float(plan.factors[k]),
                "replaced": "replaced_shift_mm" in outliers.get(k, {}),
                "blurred": "blur" in outliers.get(k, {}),
                **outliers.get(k, {}),
            }
            for k in range(len(plan.factors))
        ],
    }


def simulate_stacks(
    volume: sitk.Image,
    mask: sitk.Image,
    out_dir: str | Path,
    *,
    n_stacks: int = 4,
    in_plane: float = 0.8,
    thickness: float = 3.0,
    spacing: float | None = None,
    max_rotation_deg: float = 5.0,
    max_translation_mm: float = 3.0,
    noise: float = 0.02,
    dropout: float = 0.0,
    oblique: bool = False,
    stack_misalignment_deg: float = 0.0,
    stack_misalignment_mm: float = 0.0,
    replaced: float = 0.0,
    blurred: float = 0.0,
    stack_intensity_scale: float = 1.0,
    bias_field: float = 0.0,
    seed: int = 0,
    psf_oversampling: float = 1.0,
    in_plane_factor: float = IN_PLANE_FWHM_FACTOR,
    margin_mm: float = 8.0,
    motion: MotionModel = "independent",
    jumps: int = 0,
    slice_order: SliceOrder = "interleaved",
    interleave: int = 2,
) -> SimulationResult:
    """Simulate ``n_stacks`` thick-slice stacks (and their masks) of ``volume`` into ``out_dir``.

    Orientations cycle axial (slice normal along world z), coronal (y), sagittal (x), axial offset by
    half a slice spacing; ``oblique`` turns each stack by a random rotation of 15-40 degrees. Each
    field of view covers the mask's bounding box plus ``margin_mm``; ``spacing`` (slice spacing)
    defaults to ``thickness``.

    Motion, per slice: rotation vector with each component uniform in +/-max_rotation_deg (so the
    rotation angle is at most sqrt(3) times that, about 1.2 times it on average) and translation
    uniform in +/-max_translation_mm per axis. Per stack, optionally, a misalignment about the
    stack's centre: rotation of exactly ``stack_misalignment_deg`` about a random axis and
    translation of ``stack_misalignment_mm`` in a random direction, applied after the slice motion.
    ``motion="trajectory"`` instead: per stack a path in acquisition time (``trajectory``), smooth
    with ``jumps`` sudden steps, each of its six components spanning exactly +/-max_rotation_deg
    (rotation vector components) or +/-max_translation_mm; slices read it at their acquisition rank
    (``slice_order``, ``interleave``), which each stack's sidecar records as SliceTiming.
    The rule that keeps rotation vectors unambiguous: sqrt(3) max_rotation_deg +
    stack_misalignment_deg must be below 180 degrees (InputError otherwise).

    PSF: Gaussian, in-plane FWHM = in_plane_factor x in_plane, through-plane FWHM = thickness,
    integrated numerically with sub-sample steps min(sigma, voxel) / ``psf_oversampling`` along each
    slice axis (voxel = the volume's smallest spacing; see ``psf_steps``). Signal drop-out (a
    fraction ``dropout`` of each stack's slices, multiplied by a factor in [0.05, 0.3]) comes before
    Rician noise of sigma noise x (99th percentile of the volume inside the mask). Masks: the mask
    interpolated (trilinear) at each moved pixel centre, thresholded at 0.5. Deterministic for a
    given seed; stack s draws from its own generator seeded (seed, s).

    Outliers, each slice at most one kind (flags per slice in transforms.json; fractions of each
    stack's slices, rounded): ``replaced`` slices show the anatomy 8-20 mm further along their
    normal, towards the stack's middle (their recorded transform stays the true one); ``blurred``
    slices average 5-9 poses spanning an in-plane rotation of 5-10 degrees and an in-plane
    translation of 2-4 mm (motion during the acquisition); both go through the same numerical PSF,
    fall on slices whose mask is not empty, and their masks are those of the recorded pose.
    ``bias_field`` > 0: each stack's signal is multiplied, before the noise, by its own smooth
    field (``bias_multiplier``) of that amplitude, a function of the nominal pixel position (a
    coil sensitivity is fixed in the scanner). ``stack_intensity_scale`` multiplies the last
    stack after the noise (another receiver gain). These draw from generators seeded (seed, s,
    1..4): the motion, the noise and the other slices do not change when they are asked for.
    """
    settings: dict[str, Any] = {
        "n_stacks": n_stacks,
        "in_plane": in_plane,
        "thickness": thickness,
        "spacing": thickness if spacing is None else spacing,
        "max_rotation_deg": max_rotation_deg,
        "max_translation_mm": max_translation_mm,
        "noise": noise,
        "dropout": dropout,
        "oblique": oblique,
        "stack_misalignment_deg": stack_misalignment_deg,
        "stack_misalignment_mm": stack_misalignment_mm,
        "replaced": replaced,
        "blurred": blurred,
        "stack_intensity_scale": stack_intensity_scale,
        "bias_field": bias_field,
        "seed": seed,
        "psf_oversampling": psf_oversampling,
        "in_plane_factor": in_plane_factor,
        "margin_mm": margin_mm,
        "motion": motion,
        "jumps": jumps,
        "slice_order": slice_order,
        "interleave": interleave,
    }
    _check_settings(settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    volume_array = sitk.GetArrayFromImage(volume).astype(np.float32)
    mask_array = _mask_array(mask, volume)
    volume_affine = image_affine(volume)
    world_to_index = np.linalg.inv(volume_affine)
    corners = _box_corners(mask_array, volume_affine)
    sigma = np.array([in_plane_factor * in_plane, in_plane_factor * in_plane, thickness]) * FWHM_TO_SIGMA
    steps = psf_steps(sigma, min(volume.GetSpacing()), psf_oversampling)
    noise_sigma = noise * float(np.percentile(volume_array[mask_array], 99))
    settings.update(noise_sigma=noise_sigma, psf_sigma=sigma.tolist(), psf_steps=steps.tolist())

    result = SimulationResult([], [], str(out_dir / "transforms.json"))
    records = []
    for s in range(n_stacks):
        rng = np.random.default_rng([seed, s])
        plan = _plan_stack(s, rng, corners, settings)
        g = plan.geometry
        stack_mask = sample_slices_nearest_mask(
            mask_array, world_to_index, g.affine, g.size, plan.rotations, plan.translations
        )
        outliers = _plan_outliers(seed, s, plan, stack_mask.any(axis=(1, 2)), settings)
        ks, rotations, translations = _acquisition_poses(plan, outliers)
        samples = sample_slices_psf(
            volume_array, world_to_index, g.affine, g.size, ks, rotations, translations, sigma, steps
        )
        signal = np.zeros((g.size[2], *samples.shape[1:]))
        np.add.at(signal, ks, samples)
        signal /= np.bincount(ks, minlength=g.size[2])[:, None, None]
        signal *= plan.factors[:, None, None]
        bias = _plan_bias(seed, s, corners, settings["bias_field"]) if settings["bias_field"] > 0 else None
        if bias is not None:
            signal *= bias_multiplier(_pixel_centres(g), bias)
        if noise_sigma > 0:
            real = signal + rng.normal(0.0, noise_sigma, signal.shape)
            signal = np.hypot(real, rng.normal(0.0, noise_sigma, signal.shape))
        intensity_scale = float(stack_intensity_scale) if s == n_stacks - 1 else 1.0
        if intensity_scale != 1.0:
            signal *= intensity_scale
        stack_name, mask_name = f"stack_{s:02d}.nii.gz", f"mask_{s:02d}.nii.gz"
        write_image(_image(signal.astype(np.float32), g.affine), out_dir / stack_name)
        write_image(_image(stack_mask, g.affine), out_dir / mask_name)
        timing = {"SliceTiming": [round(float(r) * SLICE_SECONDS, 3) for r in plan.ranks]}
        _write_atomic_json(timing, sidecar_path(out_dir / stack_name))
        result.stack_paths.append(str(out_dir / stack_name))
        result.mask_paths.append(str(out_dir / mask_name))
        records.append(_stack_record(plan, outliers, stack_name, mask_name, settings, intensity_scale, bias))
    _write_atomic_json({"stacks": records, "settings": settings}, Path(result.transforms_path))
    return result


def read_transforms(path: str | Path) -> dict[str, Any]:
    """transforms.json with each stack's ``path`` and ``mask_path`` made absolute."""
    path = Path(path)
    data = json.loads(path.read_text())
    for stack in data["stacks"]:
        stack["path"] = str(path.parent / stack["path"])
        stack["mask_path"] = str(path.parent / stack["mask_path"])
    return data


def read_truth(path: str | Path) -> list[dict[str, Any]]:
    """The true slice transforms of transforms.json as a flat list of dicts with a ``stack`` index.

    Each dict: stack, k, centre (3,), rotation (3,) radians, translation (3,) mm, dropout; the form
    ``metrics.motion_errors`` takes.
    """
    data = json.loads(Path(path).read_text())
    return [{"stack": s, **slice_} for s, stack in enumerate(data["stacks"]) for slice_ in stack["slices"]]


def naive_average(stack_paths: list[str], reference: sitk.Image) -> sitk.Image:
    """Average of the stacks resampled (linear) onto the reference grid: the floor baseline of SVR.

    Each stack is first scaled so that the median of its foreground (voxels above 10 % of its 99th
    percentile, on the reference grid, where it has support) equals the mean of those medians. A
    voxel averages the stacks whose field of view covers it; voxels no stack covers are 0.
    """
    if not stack_paths:
        raise InputError(None, "no stack to average")
    resampled, medians = [], []
    grid = sitk.Cast(reference, sitk.sitkFloat32)
    for path in stack_paths:
        stack = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
        values = sitk.GetArrayFromImage(
            sitk.Resample(stack, grid, sitk.Transform(), sitk.sitkLinear, float("nan"))
        )
        support = np.isfinite(values)
        inside = values[support]
        if inside.size == 0:
            raise InputError(path, "stack does not overlap the reference grid")
        foreground = inside[inside > 0.1 * np.percentile(inside, 99)]
        median = float(np.median(foreground)) if foreground.size else 0.0
        if not median > 0:
            raise InputError(path, "stack has no positive signal on the reference grid")
        resampled.append(values)
        medians.append(median)
    target = float(np.mean(medians))
    total = np.zeros(resampled[0].shape)
    count = np.zeros(resampled[0].shape)
    for values, median in zip(resampled, medians, strict=True):
        support = np.isfinite(values)
        total[support] += values[support] * (target / median)
        count[support] += 1
    average = np.divide(total, count, out=np.zeros_like(total), where=count > 0).astype(np.float32)
    image = sitk.GetImageFromArray(average)
    image.CopyInformation(reference)
    return image
