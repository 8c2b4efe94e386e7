"""The brain found by its outline: in a head, turned any way, of an age the search's atlases do not
hold; nothing found in a volume without an outline; the choice between nested outlines."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from testkit import random_turn, rigid

from GaussianSVRLib.atlas.bundled import load_atlas
from GaussianSVRLib.atlas.outline import OutlineNotFound, find_outline, moved_out, placed_mask
from GaussianSVRLib.atlas.registration import AtlasFit
from GaussianSVRLib.geometry import image_affine, set_image_geometry
from GaussianSVRLib.sim.surroundings import surround

GRID_MM = 1.6


def on_search_grid(volume: sitk.Image, mask: sitk.Image, matrix: np.ndarray) -> tuple[sitk.Image, np.ndarray]:
    """The volume and its mask turned by a rigid map (4, 4) and resampled at GRID_MM."""
    moved = set_image_geometry(
        sitk.GetImageFromArray(sitk.GetArrayFromImage(volume)), matrix @ image_affine(volume)
    )
    moved_mask = set_image_geometry(sitk.GetImageFromArray(sitk.GetArrayFromImage(mask)), image_affine(moved))
    size = [int(n * s / GRID_MM) for n, s in zip(volume.GetSize(), volume.GetSpacing(), strict=True)]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing((GRID_MM,) * 3)
    grid.SetDirection(moved.GetDirection())
    grid.SetOrigin(moved.GetOrigin())
    image = sitk.Resample(moved, grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    truth = sitk.Resample(moved_mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return image, sitk.GetArrayFromImage(truth) > 0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_the_brain_is_found_in_its_head_turned_any_way_at_an_age_the_search_does_not_hold():
    """The bundled 32-week brain (the search tries weeks 22, 26, 30 and 34) in a synthetic head and
    uterus, turned, all of it in view: the thin dark skull between the brain and bright fluid is what
    outlines it there (a search from the view's centre alone found 200-630 ml on such cases)."""
    atlas = load_atlas(32)
    volume, mask = surround(atlas.t2, atlas.mask, seed=3, margin_mm=14.0)
    image, truth = on_search_grid(
        volume, mask, rigid(random_turn(3), image_affine(volume)[:3, 3], np.zeros(3))
    )
    fit = find_outline(image, np.ones(truth.shape, bool))
    found = placed_mask(fit, image_affine(image), truth.shape)
    assert dice(found, truth) > 0.85
    assert fit.brain_ml == pytest.approx(atlas.brain_ml, rel=0.15)


def test_a_volume_without_an_outline_is_refused():
    atlas = load_atlas(24)
    flat = sitk.Image(atlas.t2.GetSize(), sitk.sitkFloat32) + 100.0
    flat.CopyInformation(atlas.t2)
    with pytest.raises(OutlineNotFound, match="no brain outline"):
        find_outline(flat, np.ones(sitk.GetArrayViewFromImage(flat).shape, bool))
    with pytest.raises(OutlineNotFound, match="empty"):
        find_outline(atlas.t2, np.zeros(sitk.GetArrayViewFromImage(flat).shape, bool))


def fit(ml_scale: float, step: float, turn_deg: float = 0.0) -> AtlasFit:
    from scipy.spatial.transform import Rotation

    rotation = Rotation.from_rotvec([0.0, 0.0, np.radians(turn_deg)]).as_matrix()
    return AtlasFit(28, rotation, np.zeros(3), np.zeros(3), ml_scale ** (1 / 3), step)


def test_the_choice_moves_out_to_a_larger_clear_outline_but_not_to_the_uterus():
    """The cortex's edge (best) gives way to the skull's a little further out when that steps at least
    OUTER_SHARE as clearly; an outline three times larger (the uterus) or turned away is never taken."""
    cortex, skull, uterus = fit(1.0, 0.10), fit(1.5, 0.08), fit(3.0, 0.09)
    assert moved_out([cortex, skull, uterus]) is skull
    assert moved_out([cortex, fit(1.5, 0.05), uterus]) is cortex
    assert moved_out([cortex, fit(1.5, 0.08, turn_deg=90.0)]) is cortex
