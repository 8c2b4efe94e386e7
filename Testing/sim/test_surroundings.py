"""The synthetic head and uterus around a brain: geometry kept, brain untouched, layers in order."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from GaussianSVRLib.sim.surroundings import LAYERS, surround


@pytest.fixture(scope="module")
def surrounded(phantom_fine):
    volume, mask = phantom_fine
    return volume, mask, *surround(volume, mask, seed=3, margin_mm=20.0)


def test_the_brain_keeps_its_voxels_and_its_place(surrounded):
    volume, mask, result, grown = surrounded
    assert result.GetSpacing() == volume.GetSpacing() and result.GetDirection() == volume.GetDirection()
    assert all(r > v for r, v in zip(result.GetSize(), volume.GetSize(), strict=True))
    resampled = sitk.Resample(result, volume, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
    inside = sitk.GetArrayFromImage(mask) > 0
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(resampled)[inside], sitk.GetArrayFromImage(volume)[inside]
    )
    moved_mask = sitk.Resample(grown, volume, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(moved_mask) > 0, inside)


def test_outside_the_brain_a_dark_skull_then_bright_fluid_then_tissue(surrounded):
    _, _, result, grown = surrounded
    values = sitk.GetArrayFromImage(result)
    inside = sitk.GetArrayFromImage(grown) > 0
    distance = ndimage.distance_transform_edt(~inside, sampling=result.GetSpacing()[::-1])
    brain = float(np.median(values[inside]))
    skull = float(np.median(values[(distance > 0.5) & (distance < 1.5)]))
    fluid = float(np.median(values[(distance > 6.0) & (distance < 9.0)]))
    far = float(np.median(values[distance > 18.0]))
    assert skull < 0.3 * brain < fluid and far < fluid
    assert skull == pytest.approx(LAYERS[0].level * brain, rel=0.6)
    assert (values[~inside] > 0).mean() > 0.99  # nowhere black: the brain is not alone


def test_the_surroundings_follow_the_seed(surrounded):
    volume, mask, result, _ = surrounded
    again, _ = surround(volume, mask, seed=3, margin_mm=20.0)
    other, _ = surround(volume, mask, seed=4, margin_mm=20.0)
    assert np.array_equal(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(result))
    assert not np.array_equal(sitk.GetArrayFromImage(other), sitk.GetArrayFromImage(result))
