"""Judging slices: weights from robust statistics of their residuals, exclusions and their reasons.

Numpy only: the report and the QC picture read these facts without importing the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Robust z-score below which a slice keeps full weight; weights fall linearly to 0 at outlier_z.
FULL_WEIGHT_Z = 2.0


#: Slices whose intensity scale differs from their stack's median by more than this factor are outliers.
SCALE_OUTLIER_FACTOR = 2.0


#: The spread of residuals is taken as at least this fraction of their median: when every slice fits
#: to the noise level the MAD is tiny and would flag slices that are only slightly worse.
MIN_RELATIVE_SPREAD = 0.1


#: Slices with fewer masked pixels than this are not judged (weight 1, never excluded): a handful of
#: pixels at the brain's edge gives neither a meaningful residual nor a meaningful intensity scale.
MIN_JUDGED_PIXELS = 50


#: A stack whose agreement (median slice NCC with the reconstruction) is below this gets a warning,
#: however few of its slices were rejected. The standard preset gives 0.96-0.98 on every stack of the
#: phantom and of data/sub01 (slices rejected for motion there: 0.88-0.92); a stack median below
#: 0.85 means the stack as a whole disagrees with the others (motion throughout, artefacts, a failed
#: registration).
LOW_AGREEMENT = 0.85


#: A run shorter than this has not fitted the motion enough for its agreement to say whether the stacks
#: could be brought together (a quick check of an install); the preview preset runs 150 iterations.
MIN_JUDGED_ITERATIONS = 100


#: Reason codes of excluded slices, with the plain-language words the report uses for them.
REASON_WORDS = {"motion": "motion", "dropout": "signal drop-out", "intensity": "too bright"}


@dataclass
class SliceQuality:
    """Per-slice outcome (M,): relative residual, weight, exclusion and its reason.

    reason is a sentence and reason_code one of REASON_WORDS' keys (None for a kept slice); n_pixels
    (M,) counts the pixels the slice was judged on. ncc (M,) is the normalized cross-correlation
    between each slice's observed and predicted pixels (NaN until the final pass), and predicted
    (P,) the final prediction of every fine-stage pixel, in the optimizer's intensity units (input /
    intensity normalization), slice scale included; None when the run was cancelled. pose_moves
    (M,) counts how often the pose search moved each slice.
    """

    residual: np.ndarray
    weight: np.ndarray
    excluded: np.ndarray
    reason: list[str | None] = field(default_factory=list)
    reason_code: list[str | None] = field(default_factory=list)
    n_pixels: np.ndarray | None = None
    ncc: np.ndarray | None = None
    predicted: np.ndarray | None = None
    pose_moves: np.ndarray | None = None


def residual_z(residual: np.ndarray, n_pixels: np.ndarray, judged: np.ndarray) -> np.ndarray:
    """Robust z-scores (M,) of the residuals (M,), each shrunk by its slice's pixel count (M,).

    A residual over n pixels scatters about 1/sqrt(n): a small slice at the brain's edge (few pixels,
    most of them partial-volumed) is noisier, not worse. Deviations from the median are scaled by
    min(1, sqrt(n / n_median)) before the robust spread is taken, so small slices need a larger
    deviation to be flagged while slices of typical size keep the plain robust z.
    Median and spread come from the judged slices (M,) bool only.
    """
    z = np.zeros(len(residual))
    if not judged.any():
        return z
    median = np.median(residual[judged])
    shrink = np.minimum(1.0, np.sqrt(n_pixels / max(float(np.median(n_pixels[judged])), 1.0)))
    deviation = (residual - median) * shrink
    mad = 1.4826 * np.median(np.abs(deviation[judged]))
    z[judged] = deviation[judged] / max(mad, MIN_RELATIVE_SPREAD * abs(median), 1e-12)
    return z


def robust_weights(
    residual: np.ndarray,
    scale: np.ndarray,
    slice_stack: np.ndarray,
    outlier_z: float,
    n_pixels: np.ndarray | None = None,
) -> SliceQuality:
    """Slice weights from robust statistics of the per-slice residuals (M,) and intensity scales (M,).

    z: see residual_z (n_pixels (M,) defaults to equal counts); weight 1 up to FULL_WEIGHT_Z,
    falling linearly to 0 at outlier_z, where the slice is excluded for "motion" (anything that
    breaks a slice's agreement with the volume; motion during its acquisition is the usual cause).
    A slice whose intensity scale is off its stack's median by more than SCALE_OUTLIER_FACTOR is
    excluded too, as a "dropout" (signal loss, which the scale absorbs) or "intensity" (too bright).
    Slices with a NaN residual or fewer than MIN_JUDGED_PIXELS pixels keep weight 1.
    """
    m = len(residual)
    n_pixels = np.full(m, MIN_JUDGED_PIXELS) if n_pixels is None else np.asarray(n_pixels)
    judged = np.isfinite(residual) & (n_pixels >= MIN_JUDGED_PIXELS)
    z = residual_z(residual, n_pixels, judged)
    weight = np.where(judged, np.clip((outlier_z - z) / (outlier_z - FULL_WEIGHT_Z), 0.0, 1.0), 1.0)
    excluded = np.zeros(m, dtype=bool)
    reason: list[str | None] = [None] * m
    code: list[str | None] = [None] * m
    median = np.median(residual[judged]) if judged.any() else 0.0
    for i in np.nonzero(judged & (z > outlier_z))[0]:
        excluded[i], code[i] = True, "motion"
        reason[i] = (
            f"residual {residual[i]:.3f} is {z[i]:.1f} robust SD above the median {median:.3f} "
            "(motion or another artefact)"
        )
    for s in np.unique(slice_stack):
        on_stack = np.nonzero((slice_stack == s) & (n_pixels >= MIN_JUDGED_PIXELS))[0]
        if len(on_stack) == 0:
            continue
        ratio = scale[on_stack] / np.median(scale[on_stack])
        for i, r in zip(on_stack, ratio, strict=True):
            if 1.0 / SCALE_OUTLIER_FACTOR <= r <= SCALE_OUTLIER_FACTOR:
                continue
            excluded[i], code[i] = True, "dropout" if r < 1.0 else "intensity"
            reason[i] = f"intensity x{r:.2f} of its stack ({REASON_WORDS[code[i]]})"
    weight[excluded] = 0.0
    return SliceQuality(
        residual=residual,
        weight=weight,
        excluded=excluded,
        reason=reason,
        reason_code=code,
        n_pixels=n_pixels,
        ncc=np.full(m, np.nan),
    )


def stack_agreement(quality: SliceQuality, on_stack: np.ndarray) -> float | None:
    """Median NCC (with the reconstruction) of a stack's slices (M,) bool that have enough pixels to
    be judged; None when there is none (e.g. a cancelled run)."""
    ncc = quality.ncc if quality.ncc is not None else np.full(len(on_stack), np.nan)
    n_pixels = quality.n_pixels if quality.n_pixels is not None else np.full(len(on_stack), MIN_JUDGED_PIXELS)
    values = ncc[on_stack & (n_pixels >= MIN_JUDGED_PIXELS) & np.isfinite(ncc)]
    return float(np.median(values)) if len(values) else None


def stack_agreements(quality: SliceQuality, slice_stack: np.ndarray, n_stacks: int) -> list[float | None]:
    """Every stack's agreement (stack_agreement), from the slices' stack indices (M,)."""
    return [stack_agreement(quality, slice_stack == s) for s in range(n_stacks)]
