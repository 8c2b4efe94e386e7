"""The brain found in a volume by its outline: the bundled atlas brain placed where the volume is bright
just inside its surface and dark just outside.

The volume is a first reconstruction of everything the stacks saw together (the brain with its skull,
fluid, the uterus or other fetal parts around it, or a black background), and the brain may fill that
view. What marks the brain there is its outline: cerebrospinal fluid against the dark skull, or tissue
against black. A placement of an atlas brain (rotation, centre, size) is scored by the mean step of the
smoothed volume across its surface, inside minus outside, where the outside sample is in the field of
view (elsewhere the step counts 0: the view's own border is no outline).

Search: every rotation of the grid at three sizes around each of OUTLINE_WEEKS' atlases (the shape
changes with age) is scored at two scales (COARSE sees the head's shape, MEDIUM a thin skull between
the brain and bright fluid); the best distinct few per size are polished at that scale, the best of
each scale finely. The brain need not sit in the middle of what the stacks saw, and a thin outline
is caught only from a few millimetres away: MEDIUM starts from centres around the view's centre too.

The strongest outline is often the white matter's edge against the dark cortical plate, one cortex
inside the true one; so the choice moves out to a larger placement that still steps
clearly, at most OUTER_VOLUME times larger (the skull is millimetres further out, the uterus far).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..geometry import image_affine
from .bundled import Atlas, load_atlas
from .orientations import angle_deg, rotation_grid
from .registration import GRID_ROTATIONS, SCORE_CHUNK, AtlasFit, distinct_best, polish, sampled, smoothed

#: Atlases whose outlines are tried: young to old (the brain's proportions change with age).
OUTLINE_WEEKS = (22, 26, 30, 34)
#: Sizes tried per atlas, as factors on its brain volume: with the four weeks they cover 40-460 ml.
SIZE_FACTORS = (0.75, 1.0, 1.33)
#: Orientations kept per size from the coarse scoring, each DISTINCT_DEG from the others.
PER_SIZE = 3
#: Per scale (COARSE, MEDIUM): how many of the best grid placements are polished at that scale, and
#: how many of those finely.
POLISHED = 24
FINE_CANDIDATES = 8


@dataclass(frozen=True)
class Scale:
    """One scale of the outline score: smoothing (mm, sigma), the step across the surface (mm, each
    side), every how many surface points are used, the pattern-search steps, and how far (mm) along
    each axis from the view's centre the grid search starts too (0: from the centre only)."""

    smoothing_mm: float
    step_mm: float
    every: int
    steps: tuple[float, ...]
    offset_mm: float = 0.0


COARSE = Scale(2.5, 3.0, 4, (8.0, 4.0, 2.0))
MEDIUM = Scale(1.0, 2.0, 8, (8.0, 4.0, 2.0), offset_mm=5.0)
FINE = Scale(1.0, 2.0, 1, (2.0, 1.0))
#: A larger placement is preferred to the best one when it steps at least this share as clearly,
#: is larger by a volume factor in OUTER_VOLUME and turned at most OUTER_ANGLE_DEG from it.
OUTER_SHARE = 0.7
OUTER_VOLUME = (1.15, 1.9)
OUTER_ANGLE_DEG = 60.0
#: Below this outline step (in units of the volume's 99th percentile) nothing brain-like was found.
MIN_STEP = 0.03
#: Brain volumes (ml) that a fetal or neonatal brain can have; a placement outside is no brain.
PLAUSIBLE_ML = (25.0, 800.0)


class OutlineNotFound(ValueError):
    """No placement of the atlas brain outlines anything in the volume."""


@dataclass(frozen=True)
class Surface:
    """An atlas brain's surface: points (S, 3) and outward unit normals (S, 3), atlas LPS."""

    points: np.ndarray
    normals: np.ndarray


@cache
def surface(week: int) -> Surface:
    """The boundary voxels of the week's atlas brain mask, with the normals of the smoothed mask."""
    atlas = load_atlas(week)
    brain = sitk.GetArrayFromImage(atlas.mask) > 0
    k, j, i = np.nonzero(brain & ~ndimage.binary_erosion(brain))
    affine = image_affine(atlas.mask)
    gradient = np.stack(np.gradient(ndimage.gaussian_filter(brain.astype(np.float32), 1.0))[::-1], axis=-1)
    # The mask falls outward; index-space gradients become world normals through the inverse transpose.
    normals = -gradient[k, j, i] @ np.linalg.inv(affine[:3, :3])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    points = np.stack([i, j, k], axis=1) @ affine[:3, :3].T + affine[:3, 3]
    return Surface(points, normals)


class OutlineContrast:
    """The outline score of atlas placements on one volume at one Scale (the scorer ``polish`` takes)."""

    def __init__(self, volume: sitk.Image, view: np.ndarray, week: int, scale: Scale) -> None:
        values = sitk.GetArrayViewFromImage(volume)
        top = float(np.percentile(values[values > 0], 99)) if (values > 0).any() else 1.0
        self.volume = sitk.GetArrayFromImage(smoothed(volume, scale.smoothing_mm)) / top
        self.view = view.astype(np.float32)
        self.affine = image_affine(volume)
        shape = surface(week)
        self.points, self.normals = shape.points[:: scale.every], shape.normals[:: scale.every]
        self.step = scale.step_mm

    def scores(
        self, fit: AtlasFit, rotations: np.ndarray, shifts: np.ndarray, scales: np.ndarray
    ) -> np.ndarray:
        """The mean inside-minus-outside step (M,) of the surface placed by the fit with each of M changes
        (a rotation (M, 3, 3) on the left, a shift (M, 3) of the centre, a factor (M,) on the scale)."""
        local = self.points - fit.atlas_centre
        turned = rotations @ fit.rotation
        linear = (scales * fit.scale)[:, None, None] * turned
        centres = fit.volume_centre + shifts
        out = np.empty(len(turned))
        for start in range(0, len(turned), SCORE_CHUNK):
            part = slice(start, start + SCORE_CHUNK)
            placed = local @ linear[part].transpose(0, 2, 1) + centres[part, None, :]
            normals = self.step * (self.normals @ turned[part].transpose(0, 2, 1))
            inside = sampled(self.volume, self.affine, placed - normals)
            outside = sampled(self.volume, self.affine, placed + normals)
            seen = sampled(self.view, self.affine, placed + normals) > 0.5
            out[part] = np.where(seen, inside - outside, 0.0).mean(axis=1)
        return out


def view_centre(view: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The LPS centroid (3,) of the field of view [k, j, i] on a grid (voxel -> LPS (4, 4))."""
    k, j, i = np.nonzero(view)
    return affine[:3, :3] @ np.array([i.mean(), j.mean(), k.mean()]) + affine[:3, 3]


def start_centres(centre: np.ndarray, offset_mm: float) -> np.ndarray:
    """The centre (3,) and, unless the offset is 0, the six points offset_mm from it along the axes
    (C, 3)."""
    if offset_mm == 0:
        return centre[None]
    return centre + offset_mm * np.concatenate([np.zeros((1, 3)), np.eye(3), -np.eye(3)])


def candidates(
    scorer: OutlineContrast, atlas: Atlas, centres: np.ndarray, volumes_ml: np.ndarray
) -> list[AtlasFit]:
    """PER_SIZE distinct orientations of the grid for the atlas brain at each of these brain volumes,
    each at the best of the centres (C, 3), best first within each size, with their scores."""
    grid = rotation_grid(GRID_ROTATIONS)
    rotations = np.tile(grid, (len(centres), 1, 1))
    shifts = np.repeat(centres - centres[0], len(grid), axis=0)
    start = AtlasFit(atlas.week, np.eye(3), atlas.brain_centre(), centres[0], 1.0, 0.0)
    fits = []
    for volume_ml in volumes_ml:
        size = (volume_ml / atlas.brain_ml) ** (1 / 3)
        scores = scorer.scores(replace(start, scale=size), rotations, shifts, np.ones(len(rotations)))
        fits += [
            replace(
                start,
                rotation=rotations[i],
                volume_centre=centres[0] + shifts[i],
                scale=size,
                correlation=float(scores[i]),
            )
            for i in distinct_best(scores, rotations, PER_SIZE)
        ]
    return fits


def moved_out(fits: list[AtlasFit]) -> AtlasFit:
    """The best-scoring placement, or, while there is one, the best of the clearly stepping larger ones
    around it (see the module's docstring)."""
    chosen = max(fits, key=lambda fit: fit.correlation)
    floor = OUTER_SHARE * chosen.correlation
    while True:
        larger = [
            fit
            for fit in fits
            if fit.correlation >= floor
            and OUTER_VOLUME[0] < fit.brain_ml / chosen.brain_ml < OUTER_VOLUME[1]
            and angle_deg(fit.rotation, chosen.rotation) < OUTER_ANGLE_DEG
        ]
        if not larger:
            return chosen
        chosen = max(larger, key=lambda fit: fit.correlation)


def find_outline(volume: sitk.Image, view: np.ndarray) -> AtlasFit:
    """The atlas brain placed on the brain of the volume; ``view`` [k, j, i] (bool, the volume's grid)
    marks what the stacks saw. Its ``correlation`` is the outline step. Raises OutlineNotFound."""
    if not view.any():
        raise OutlineNotFound("the field of view is empty")
    centre = view_centre(view, image_affine(volume))
    # The reconstruction fades over the last millimetres of the view: its border steps too.
    view = ndimage.binary_erosion(view)
    starts = []
    for scale in (COARSE, MEDIUM):
        scorers = {week: OutlineContrast(volume, view, week, scale) for week in OUTLINE_WEEKS}
        centres = start_centres(centre, scale.offset_mm)
        fits = []
        for week, scorer in scorers.items():
            atlas = load_atlas(week)
            fits += candidates(scorer, atlas, centres, atlas.brain_ml * np.array(SIZE_FACTORS))
        best = sorted(fits, key=lambda fit: -fit.correlation)[:POLISHED]
        polished = [polish(scorers[fit.week], fit, scale.steps) for fit in best]
        starts += sorted(polished, key=lambda fit: -fit.correlation)[:FINE_CANDIDATES]
    fine = {week: OutlineContrast(volume, view, week, FINE) for week in OUTLINE_WEEKS}
    chosen = moved_out([polish(fine[fit.week], fit, FINE.steps) for fit in starts])
    if chosen.correlation < MIN_STEP:
        raise OutlineNotFound(f"no brain outline in the volume (step {chosen.correlation:.3f} < {MIN_STEP})")
    if not PLAUSIBLE_ML[0] <= chosen.brain_ml <= PLAUSIBLE_ML[1]:
        raise OutlineNotFound(f"the best outline holds {chosen.brain_ml:.0f} ml, no brain's volume")
    return chosen


def placed_mask(fit: AtlasFit, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The atlas brain mask placed by the fit, on a grid (voxel -> LPS (4, 4), shape (nk, nj, ni))."""
    atlas = load_atlas(fit.week)
    k, j, i = np.indices(shape)
    points = np.stack([i, j, k], axis=-1) @ affine[:3, :3].T + affine[:3, 3]
    in_atlas = (points - fit.volume_centre) @ fit.rotation / fit.scale + fit.atlas_centre
    mask = sitk.GetArrayFromImage(atlas.mask).astype(np.float32)
    return sampled(mask, image_affine(atlas.mask), in_atlas) > 0.5
