"""Where a reconstruction loses against its ground truth: blur (resolution) or artifacts.

The effective resolution is the FWHM of the isotropic Gaussian blur of the ground truth that best
matches the reconstruction inside the mask (least squares, after the same rigid alignment and
affine intensity fit as ``metrics.evaluate``); the PSNR against that blurred truth measures what
blur does not explain (artifacts). PSNR by depth from the mask boundary tells the edge from the
interior.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, optimize

from .metrics import Compared, compare, fit_intensity
from .specks import bright_outside

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: The blurs searched (mm of FWHM), and how closely the best is found.
FWHM_RANGE_MM = (0.0, 4.0)
FWHM_TOLERANCE_MM = 0.01
#: Depth bands (mm from the mask boundary, inside) of psnr_by_depth.
DEPTH_BANDS_MM = (0.0, 1.6, 3.2, 6.4, math.inf)


def band_names() -> list[str]:
    """The names of the depth bands ("0-1.6", ..., "6.4-"), as psnr_by_depth keys them."""
    bands = zip(DEPTH_BANDS_MM[:-1], DEPTH_BANDS_MM[1:], strict=True)
    return [f"{low:g}-{high:g}" if math.isfinite(high) else f"{low:g}-" for low, high in bands]


def blurred(volume: np.ndarray, fwhm_mm: float, spacing_kji: tuple[float, float, float]) -> np.ndarray:
    """An isotropic Gaussian blur of the given FWHM (mm) of a volume [k, j, i] with that voxel spacing."""
    if fwhm_mm <= 0:
        return volume
    return ndimage.gaussian_filter(
        volume, [fwhm_mm / FWHM_PER_SIGMA / s for s in spacing_kji], mode="nearest"
    )


def fitted_error(x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """x (N,) mapped by its least-squares affine intensity fit onto target (N,), minus target."""
    a, b = fit_intensity(x, target)
    return a * x + b - target


def psnr(error: np.ndarray, peak: float) -> float:
    mse = float(np.mean(error**2))
    return 10.0 * math.log10(peak**2 / mse) if mse > 0 else math.inf


def effective_resolution(compared: Compared) -> tuple[float, float]:
    """(FWHM mm, PSNR dB against the truth blurred by it): the blur of the truth that the
    reconstruction matches best inside the mask."""
    spacing = compared.grid.GetSpacing()[::-1]
    x, inside, peak = compared.x[compared.inside], compared.inside, float(compared.y[compared.inside].max())

    def mse(fwhm: float) -> float:
        return float(np.mean(fitted_error(x, blurred(compared.y, fwhm, spacing)[inside]) ** 2))

    best = optimize.minimize_scalar(
        mse, bounds=FWHM_RANGE_MM, method="bounded", options={"xatol": FWHM_TOLERANCE_MM}
    )
    fwhm = float(best.x) if mse(best.x) < mse(0.0) else 0.0
    return fwhm, psnr(fitted_error(x, blurred(compared.y, fwhm, spacing)[inside]), peak)


def psnr_by_depth(compared: Compared) -> dict[str, float]:
    """PSNR (dB, peak: the truth's maximum in the mask) of the fitted reconstruction in each band of
    DEPTH_BANDS_MM, by depth from the mask boundary ("0-1.6", ..., "6.4-")."""
    spacing = compared.grid.GetSpacing()[::-1]
    inside = compared.inside
    # Distance to the nearest voxel outside, minus half a voxel: the boundary lies between voxels.
    depth = ndimage.distance_transform_edt(inside, sampling=spacing) - 0.5 * min(spacing)
    a, b = fit_intensity(compared.x[inside], compared.y[inside])
    error = a * compared.x + b - compared.y
    peak = float(compared.y[inside].max())
    bands = {}
    for name, low, high in zip(band_names(), DEPTH_BANDS_MM[:-1], DEPTH_BANDS_MM[1:], strict=True):
        band = inside & (depth >= low) & (depth < high)
        bands[name] = psnr(error[band], peak) if band.any() else math.nan
    return bands


def loss_analysis(
    reconstruction: sitk.Image, reference: sitk.Image, mask: sitk.Image, *, align: bool = True
) -> dict[str, Any]:
    """effective_fwhm_mm, psnr_vs_blurred (dB), psnr_by_depth (dB by band) and bright_outside (the
    specks of specks.py, voxels of the reference's grid) of a reconstruction."""
    compared = compare(reconstruction, reference, mask, align=align)
    fwhm, against_blurred = effective_resolution(compared)
    spacing = compared.grid.GetSpacing()[::-1]
    return {
        "effective_fwhm_mm": fwhm,
        "psnr_vs_blurred": against_blurred,
        "psnr_by_depth": psnr_by_depth(compared),
        "bright_outside": bright_outside(compared.x, compared.inside, spacing),
    }
