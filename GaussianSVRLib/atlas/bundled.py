"""The standard-space atlases shipped in the package (data/standard, made by make_standard_atlases.py).

One T2 atlas volume and brain mask per week of gestation, 1.6 mm, in the atlas's own LPS frame: that
frame is the standard anatomical orientation the reconstruction can be written in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ATLAS_DIR = Path(__file__).resolve().parent.parent / "data" / "standard"
#: The atlas week used before the age is known (the middle of the range).
DEFAULT_WEEK = 28


@dataclass(frozen=True)
class Atlas:
    """One atlas: week of gestation, T2 volume (float32) and brain mask (uint8) on one grid."""

    week: int
    t2: sitk.Image
    mask: sitk.Image

    @property
    def name(self) -> str:
        return f"GA{self.week}"

    @property
    def brain_ml(self) -> float:
        return float(sitk.GetArrayViewFromImage(self.mask).sum() * np.prod(self.mask.GetSpacing()) / 1000)

    def brain_centre(self) -> np.ndarray:
        """The LPS centroid (3,) of the brain mask."""
        k, j, i = np.nonzero(sitk.GetArrayViewFromImage(self.mask))
        index = np.stack([i, j, k], axis=1).mean(axis=0)
        return np.asarray(self.mask.TransformContinuousIndexToPhysicalPoint(index.tolist()))


@cache
def weeks() -> tuple[int, ...]:
    """The weeks of gestation with a bundled atlas, ascending."""
    found = (re.fullmatch(r"GA(\d+)_T2w\.nii\.gz", path.name) for path in ATLAS_DIR.iterdir())
    return tuple(sorted(int(match.group(1)) for match in found if match))


@cache
def load_atlas(week: int) -> Atlas:
    """The bundled atlas of that week (an exact week from ``weeks()``)."""
    t2 = sitk.ReadImage(str(ATLAS_DIR / f"GA{week}_T2w.nii.gz"), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(ATLAS_DIR / f"GA{week}_brainmask.nii.gz"), sitk.sitkUInt8)
    return Atlas(week, t2, mask)


def nearest_week(week: float) -> int:
    """The bundled week closest to ``week`` (the earliest or latest one outside their range)."""
    return min(weeks(), key=lambda w: (abs(w - week), w))


@cache
def growth_curve() -> tuple[float, float]:
    """(a, b) of log(brain ml) = a + b * week, fitted to the bundled atlases: the weekly volumes are not
    monotonic (the atlas switches from the non-operated to the operated cohort), a curve smooths that."""
    table = [(w, load_atlas(w).brain_ml) for w in weeks()]
    b, a = np.polyfit([w for w, _ in table], np.log([ml for _, ml in table]), 1)
    return float(a), float(b)


def estimate_week(brain_ml: float) -> float:
    """The week of gestation whose expected brain volume is ``brain_ml`` (from the growth curve)."""
    a, b = growth_curve()
    return (float(np.log(brain_ml)) - a) / b
