"""Rigid registration of a brain volume to a bundled atlas, from any starting orientation.

A reconstruction comes out tilted however the fetus lay, so no starting pose can be trusted: every
orientation of an even grid over all rotations is scored at 4 mm (correlation of the smoothed
volumes inside the atlas brain, centres and sizes matched); the best distinct few are polished by a
pattern search over rotation, shift and scale at 4 mm, and the best of them at 1.6 mm. The scale it
finds gives the brain volume, hence an age; the output keeps the patient's size and uses only the
rotation and the shift.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from ..geometry import image_affine
from . import interpolation
from .bundled import DEFAULT_WEEK, Atlas, estimate_week, load_atlas, nearest_week
from .orientations import angle_deg, rotation_grid

GRID_ROTATIONS = 600
SEARCH_SPACING_MM = 4.0
#: Smoothing (mm, Gaussian sigma) of both volumes for the search: it sees shapes, not texture.
SEARCH_SMOOTHING_MM = 3.0
#: Sizes tried for the atlas brain, relative to the volume's foreground: that often holds more than
#: the brain (a mask's margin, fluid in a box), rarely less.
SEARCH_SIZES = np.array([0.7, 0.8, 0.9, 1.0, 1.1])
#: How many of the best-scoring orientations are refined, and how far apart they must be.
CANDIDATES = 6
DISTINCT_DEG = 30.0
#: The atlas brain grown by this margin is where the volumes are compared (the edge of the brain
#: against its dark surroundings is the strongest cue).
COMPARE_MARGIN_MM = 4.0
#: Pattern-search steps (degrees, and as many mm) of the candidates at 4 mm, then of the best at 1.6 mm.
COARSE_STEPS = (8.0, 4.0, 2.0)
FINE_STEPS = (2.0, 1.0, 0.5)
FINE_SMOOTHING_MM = 1.0
FINE_CANDIDATES = 3
#: A chosen orientation that correlates with the atlas by less than this more than the best turned
#: one is ambiguous (on the bundled real stacks the margin is 0.024, on simulated ones above 0.1).
CLEAR_MARGIN = 0.01
#: Placements scored at once (memory: SCORE_CHUNK x sample points x 3 doubles, a few tens of MB).
SCORE_CHUNK = 256
#: Voxels above this fraction of the volume's 99th percentile are its foreground.
FOREGROUND_FRACTION = 0.15


@dataclass(frozen=True)
class AtlasFit:
    """The atlas frame placed on a volume: ``x_volume = rotation (x_atlas - atlas_centre) + volume_centre``.

    scale: the volume's brain over the atlas's, in length (the registration's similarity factor);
    correlation: the normalized correlation of the two inside the atlas brain after the fit.
    """

    week: int
    rotation: np.ndarray
    atlas_centre: np.ndarray
    volume_centre: np.ndarray
    scale: float
    correlation: float

    @property
    def brain_ml(self) -> float:
        """The volume's brain volume: the atlas's, scaled."""
        return load_atlas(self.week).brain_ml * self.scale**3

    def matrix(self) -> np.ndarray:
        """The rigid map (4, 4) from atlas LPS to volume LPS (no scaling)."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.rotation
        matrix[:3, 3] = self.volume_centre - self.rotation @ self.atlas_centre
        return matrix

    def transform(self) -> sitk.Euler3DTransform:
        """The same map as an ITK transform (the resampling transform of an atlas-space output)."""
        transform = sitk.Euler3DTransform()
        transform.SetCenter(tuple(float(v) for v in self.atlas_centre))
        transform.SetMatrix(tuple(float(v) for v in self.rotation.ravel()))
        transform.SetTranslation(tuple(float(v) for v in self.volume_centre - self.atlas_centre))
        return transform


@dataclass(frozen=True)
class StandardSpace:
    """Where a volume sits in standard space, and how its age was found."""

    fit: AtlasFit
    week: float
    week_estimated: bool
    #: How much better the chosen orientation correlated than the best one more than DISTINCT_DEG
    #: from it, both on the atlas of the search (before any change of week: correlations with
    #: different atlases do not compare).
    margin: float

    @property
    def ambiguous(self) -> bool:
        return self.margin < CLEAR_MARGIN

    def as_dict(self) -> dict:
        return {
            "atlas": f"bundled fetal atlas, week {self.fit.week}",
            "gestational_age_weeks": round(self.week, 1),
            "gestational_age_source": "estimated from the brain volume" if self.week_estimated else "given",
            "brain_volume_ml": round(float(self.fit.brain_ml), 1),
            "atlas_to_scanner": np.round(self.fit.matrix(), 6).tolist(),
            "correlation": round(self.fit.correlation, 4),
            "margin_over_turned": round(self.margin, 4),
        }


def foreground(volume: sitk.Image) -> np.ndarray:
    """The volume's brain [k, j, i]: its largest bright connected region, holes filled."""
    values = sitk.GetArrayViewFromImage(volume)
    positive = values[values > 0]
    if positive.size == 0:
        raise ValueError("the volume is empty")
    bright = sitk.GetImageFromArray(
        (values > FOREGROUND_FRACTION * np.percentile(positive, 99)).astype(np.uint8)
    )
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(bright), sortByObjectSize=True) == 1
    return sitk.GetArrayFromImage(sitk.BinaryFillhole(largest)).astype(bool)


def region_moments(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, float]:
    """The LPS centroid (3,) and the volume (ml) of a mask [k, j, i] on a grid (voxel -> LPS (4, 4))."""
    k, j, i = np.nonzero(mask)
    centre = affine[:3, :3] @ np.array([i.mean(), j.mean(), k.mean()]) + affine[:3, 3]
    return centre, float(mask.sum() * abs(np.linalg.det(affine[:3, :3])) / 1000)


def smoothed(image: sitk.Image, sigma_mm: float) -> sitk.Image:
    return sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), sigma_mm)


class Comparison:
    """The atlas against the volume at one scale: the smoothed atlas sampled on a grid inside its grown
    brain, and the smoothed volume to interpolate where the atlas is placed."""

    def __init__(self, atlas: Atlas, volume: sitk.Image, spacing_mm: float, smoothing_mm: float) -> None:
        factor = max(1, int(round(spacing_mm / atlas.t2.GetSpacing()[0])))
        image = sitk.GetArrayFromImage(smoothed(atlas.t2, smoothing_mm))[::factor, ::factor, ::factor]
        radius = int(np.ceil(COMPARE_MARGIN_MM / atlas.mask.GetSpacing()[0]))
        grown = sitk.BinaryDilate(atlas.mask > 0, [radius] * 3, sitk.sitkBall)
        inside = sitk.GetArrayFromImage(grown)[::factor, ::factor, ::factor] > 0
        k, j, i = np.nonzero(inside)
        affine = image_affine(atlas.t2)
        self.points = (np.stack([i, j, k], 1) * factor) @ affine[:3, :3].T + affine[:3, 3]
        values = image[inside]
        self.values = (values - values.mean()) / (values.std() + 1e-12)
        self.volume = sitk.GetArrayFromImage(smoothed(volume, smoothing_mm))
        self.affine = image_affine(volume)

    def scores(
        self, fit: AtlasFit, rotations: np.ndarray, shifts: np.ndarray, scales: np.ndarray
    ) -> np.ndarray:
        """The correlation (M,) of the atlas placed by the fit with each of M changes: a rotation (M, 3, 3)
        on the left of the fit's, a shift (M, 3) of its centre and a factor (M,) on its scale.

        Scored SCORE_CHUNK changes at a time: the search's 3000 placements of every sample point at
        once would take a gigabyte.
        """
        local = self.points - fit.atlas_centre
        # Placements go straight to the volume's (k, j, i) indices, all of a chunk in one matrix product.
        to_index = np.linalg.inv(self.affine[:3, :3])[::-1]
        maps = to_index @ ((scales * fit.scale)[:, None, None] * (rotations @ fit.rotation))
        offsets = (fit.volume_centre + shifts - self.affine[:3, 3]) @ to_index.T
        scores = np.empty(len(maps))
        for start in range(0, len(maps), SCORE_CHUNK):
            part = slice(start, start + SCORE_CHUNK)
            count = len(maps[part])
            index = (local @ maps[part].reshape(-1, 3).T).reshape(len(local), count, 3) + offsets[part]
            samples = interpolation.linear(self.volume, index.reshape(-1, 3)).reshape(len(local), count)
            samples -= samples.mean(axis=0)
            norms = np.linalg.norm(samples, axis=0) * np.sqrt(self.values.size) + 1e-12
            scores[part] = (self.values @ samples) / norms
        return scores


def sampled(array: np.ndarray, affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Linear samples of an array [k, j, i] on a grid (voxel -> LPS (4, 4)) at LPS points (..., 3)."""
    index = (points - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    return interpolation.linear(array, index.reshape(-1, 3)[:, ::-1]).reshape(points.shape[:-1])


def distinct_best(scores: np.ndarray, rotations: np.ndarray, count: int) -> list[int]:
    """Indices of the best-scoring rotations, each DISTINCT_DEG away from the ones before."""
    chosen: list[int] = []
    for index in np.argsort(-scores):
        if all(angle_deg(rotations[index], rotations[c]) > DISTINCT_DEG for c in chosen):
            chosen.append(int(index))
        if len(chosen) == count:
            break
    return chosen


def starting_fit(brain: np.ndarray, affine: np.ndarray, atlas: Atlas) -> AtlasFit:
    """The atlas unturned on a brain [k, j, i] (a grid's voxel -> LPS (4, 4)): centres and sizes matched."""
    centre, millilitres = region_moments(brain, affine)
    size = (millilitres / atlas.brain_ml) ** (1 / 3)
    return AtlasFit(atlas.week, np.eye(3), atlas.brain_centre(), centre, size, 0.0)


def search(
    comparison: Comparison, start: AtlasFit, sizes: np.ndarray = SEARCH_SIZES, count: int = CANDIDATES
) -> list[AtlasFit]:
    """The ``count`` best distinct orientations of the atlas, best first: every rotation of the grid at
    every size (factors on the start's), about the start's centres."""
    grid = rotation_grid(GRID_ROTATIONS)
    rotations = np.tile(grid, (len(sizes), 1, 1))
    factors = np.repeat(sizes, len(grid))
    scores = comparison.scores(start, rotations, np.zeros((len(rotations), 3)), factors)
    return [
        replace(start, rotation=rotations[r], scale=start.scale * factors[r], correlation=float(scores[r]))
        for r in distinct_best(scores, rotations, count)
    ]


def best_polished(comparison: Comparison, starts: list[AtlasFit]) -> list[AtlasFit]:
    """The starts polished coarsely (COARSE_STEPS), best first."""
    polished = [polish(comparison, start, COARSE_STEPS) for start in starts]
    return sorted(polished, key=lambda fit: -fit.correlation)


def turned_best(fits: list[AtlasFit]) -> float:
    """The correlation of the best of fits[1:] turned more than DISTINCT_DEG from fits[0] (-1 if none)."""
    turned = [fit.correlation for fit in fits[1:] if angle_deg(fit.rotation, fits[0].rotation) > DISTINCT_DEG]
    return max(turned, default=-1.0)


def moves(angle_deg_: float, shift_mm: float, scale_step: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 14 single steps of a pattern search over rotation (3 axes), shift (3) and scale, each way."""
    rotations, shifts, scales = [], [], []
    for sign in (1.0, -1.0):
        for axis in range(3):
            rotvec = np.zeros(3)
            rotvec[axis] = sign * np.radians(angle_deg_)
            rotations.append(Rotation.from_rotvec(rotvec).as_matrix())
            shifts.append(np.zeros(3))
            scales.append(1.0)
            shift = np.zeros(3)
            shift[axis] = sign * shift_mm
            rotations.append(np.eye(3))
            shifts.append(shift)
            scales.append(1.0)
        rotations.append(np.eye(3))
        shifts.append(np.zeros(3))
        scales.append(1.0 + sign * scale_step)
    return np.array(rotations), np.array(shifts), np.array(scales)


def polish(comparison: Comparison, fit: AtlasFit, steps: tuple[float, ...]) -> AtlasFit:
    """A pattern search from the fit: the best single step while one improves, then smaller steps
    (each ``step`` in degrees; shifts of the same number of mm, scales of step / 100)."""
    for step in steps:
        rotations, shifts, scales = moves(step, step, step / 100)
        while True:
            scores = comparison.scores(fit, rotations, shifts, scales)
            best = int(np.argmax(scores))
            if scores[best] <= fit.correlation + 1e-6:
                break
            fit = replace(
                fit,
                rotation=rotations[best] @ fit.rotation,
                volume_centre=fit.volume_centre + shifts[best],
                scale=fit.scale * scales[best],
                correlation=float(scores[best]),
            )
    return fit


def rescored(comparison: Comparison, fit: AtlasFit) -> AtlasFit:
    score = comparison.scores(fit, np.eye(3)[None], np.zeros((1, 3)), np.ones(1))[0]
    return replace(fit, correlation=float(score))


def register(volume: sitk.Image, atlas: Atlas) -> tuple[AtlasFit, float]:
    """The atlas on the volume from any starting orientation: a search over all orientations, the best
    few polished coarsely, the best FINE_CANDIDATES of those finely. Returns the best fit and the
    correlation of the best one turned more than DISTINCT_DEG away from it (how clear the choice was)."""
    coarse = Comparison(atlas, volume, SEARCH_SPACING_MM, SEARCH_SMOOTHING_MM)
    start = starting_fit(foreground(volume), image_affine(volume), atlas)
    polished = best_polished(coarse, search(coarse, start))
    fine = Comparison(atlas, volume, atlas.t2.GetSpacing()[0], FINE_SMOOTHING_MM)
    fits = sorted((refine(fine, fit) for fit in polished[:FINE_CANDIDATES]), key=lambda fit: -fit.correlation)
    return fits[0], turned_best(fits)


def refine(fine: Comparison, fit: AtlasFit) -> AtlasFit:
    """The fit polished at the atlas's own resolution."""
    return polish(fine, rescored(fine, fit), FINE_STEPS)


def rebased(fit: AtlasFit, atlas: Atlas) -> AtlasFit:
    """The fit moved to another week's atlas (same orientation, centres matched, sizes rescaled)."""
    scale = fit.scale * (load_atlas(fit.week).brain_ml / atlas.brain_ml) ** (1 / 3)
    return replace(fit, week=atlas.week, atlas_centre=atlas.brain_centre(), scale=scale)


def standard_space(volume: sitk.Image, week: float | None = None) -> StandardSpace:
    """The volume's brain placed on the atlas of its age: ``week`` when given, else the age estimated
    from the brain volume that a first registration (to the middle week) finds."""
    fit, runner_up = register(volume, load_atlas(nearest_week(week) if week is not None else DEFAULT_WEEK))
    margin = fit.correlation - runner_up
    estimated = week is None
    if estimated:
        week = estimate_week(fit.brain_ml)
        if nearest_week(week) != fit.week:
            matched = load_atlas(nearest_week(week))
            fit = refine(
                Comparison(matched, volume, matched.t2.GetSpacing()[0], FINE_SMOOTHING_MM),
                rebased(fit, matched),
            )
    return StandardSpace(fit, float(week), estimated, margin)
