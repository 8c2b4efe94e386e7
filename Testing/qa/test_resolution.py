"""The loss analysis: the effective resolution, the PSNR against the blurred truth, PSNR by depth."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from GaussianSVRLib.qa.resolution import blurred, loss_analysis


@pytest.fixture(scope="module")
def truth(phantom_fine) -> tuple[sitk.Image, sitk.Image]:
    return phantom_fine


def like(reference: sitk.Image, array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.CopyInformation(reference)
    return image


@pytest.mark.parametrize("fwhm", [1.5, 2.5])
def test_a_blurred_truth_has_the_resolution_of_its_blur(truth, fwhm):
    volume, mask = truth
    array = sitk.GetArrayFromImage(volume).astype(np.float64)
    result = 0.5 * blurred(array, fwhm, (1.2, 1.2, 1.2)) + 10.0  # any affine intensity map
    analysis = loss_analysis(like(volume, result), volume, mask, align=False)
    assert analysis["effective_fwhm_mm"] == pytest.approx(fwhm, abs=0.05)
    assert analysis["psnr_vs_blurred"] > 60.0
    depths = analysis["psnr_by_depth"]
    assert list(depths) == ["0-1.6", "1.6-3.2", "3.2-6.4", "6.4-"]
    assert depths["0-1.6"] < depths["6.4-"]  # blur costs most at the brain's edge


def test_artifacts_lower_the_psnr_against_the_blurred_truth_not_the_resolution(truth):
    volume, mask = truth
    array = sitk.GetArrayFromImage(volume).astype(np.float64)
    clean = blurred(array, 2.0, (1.2, 1.2, 1.2))
    specks = np.zeros_like(clean)
    inside = np.argwhere(sitk.GetArrayFromImage(mask) > 0)
    chosen = inside[np.random.default_rng(0).choice(len(inside), 100, replace=False)]
    specks[tuple(chosen.T)] = 0.5 * array.max()
    analysis = loss_analysis(like(volume, clean + specks), volume, mask, align=False)
    assert analysis["effective_fwhm_mm"] == pytest.approx(2.0, abs=0.4)
    assert 15.0 < analysis["psnr_vs_blurred"] < 40.0


def test_an_error_at_the_edge_shows_in_the_first_band_only(truth):
    volume, mask = truth
    array = sitk.GetArrayFromImage(volume).astype(np.float64)
    inside = sitk.GetArrayFromImage(mask) > 0
    edge = inside & ~ndimage.binary_erosion(inside)
    noisy = array + edge * np.random.default_rng(1).normal(0, 0.05 * array.max(), array.shape)
    depths = loss_analysis(like(volume, noisy), volume, mask, align=False)["psnr_by_depth"]
    assert depths["0-1.6"] < 40.0
    assert all(value > depths["0-1.6"] + 20.0 for key, value in depths.items() if key != "0-1.6")
