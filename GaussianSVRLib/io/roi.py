"""A region of interest: the box that holds the brain, from six numbers or a Slicer markups ROI file.

A box stands in for a brain mask on the stacks that have none (mask_propagation.prepare_masks).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..geometry import LPS_TO_RAS, apply_affine


@dataclass(frozen=True)
class Box:
    """An oriented box in LPS: its centre (3,), its axes as the columns of a rotation (3, 3), and its
    full size along each axis (3,), in mm."""

    centre: np.ndarray
    axes: np.ndarray
    size: np.ndarray

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Whether each LPS point (..., 3) lies inside (boolean (...))."""
        local = (points - self.centre) @ self.axes
        return np.all(np.abs(local) <= self.size / 2, axis=-1)

    def as_dict(self) -> dict[str, list[float]]:
        return {
            "centre_lps": self.centre.tolist(),
            "axes_lps": self.axes.tolist(),
            "size_mm": self.size.tolist(),
        }


def box_from_corners(values: Sequence[float], source: str = "--roi") -> Box:
    """The axis-aligned box between two opposite LPS corners (x0, y0, z0, x1, y1, z1), in either order."""
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        raise InputError(source, f"needs six finite numbers x0 y0 z0 x1 y1 z1 (LPS mm), got {list(values)}")
    low, high = np.minimum(values[:3], values[3:]), np.maximum(values[:3], values[3:])
    if np.any(high - low <= 0):
        raise InputError(source, f"the box {list(values)} is flat: every side must be longer than 0 mm")
    return Box((low + high) / 2, np.eye(3), high - low)


def numbers(entry: dict, key: str, count: int, path: str | Path) -> np.ndarray:
    values = entry.get(key)
    if (
        not isinstance(values, list)
        or len(values) != count
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
        )
    ):
        raise InputError(path, f'the ROI\'s "{key}" must be {count} finite numbers')
    return np.asarray(values, dtype=np.float64)


def read_slicer_roi(path: str | Path) -> Box:
    """The first ROI of a 3D Slicer markups JSON file (.mrk.json), in LPS whatever system it was saved in.

    Slicer writes "orientation" as the row-major rotation from the ROI's axes to the file's coordinate
    system, "center" in that system and "size" along the ROI's axes.
    """
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "ROI file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(path, f"not a readable markups JSON file ({error})") from None
    markups = document.get("markups") if isinstance(document, dict) else None
    rois = [m for m in markups or [] if isinstance(m, dict) and m.get("type") == "ROI"]
    if not rois:
        raise InputError(path, "holds no markups ROI (a Slicer .mrk.json file with a markup of type ROI)")
    roi = rois[0]
    system = roi.get("coordinateSystem", "LPS")
    if system not in ("LPS", "RAS"):
        raise InputError(path, f'unknown coordinateSystem "{system}" (LPS or RAS)')
    centre = numbers(roi, "center", 3, path)
    axes = numbers(roi, "orientation", 9, path).reshape(3, 3) if "orientation" in roi else np.eye(3)
    size = numbers(roi, "size", 3, path)
    if np.any(size <= 0):
        raise InputError(path, f"the ROI is flat (size {size.tolist()} mm)")
    if not np.allclose(axes @ axes.T, np.eye(3), atol=1e-4):
        raise InputError(path, 'the ROI\'s "orientation" is not a rotation')
    if system == "RAS":
        flip = LPS_TO_RAS[:3, :3]
        centre, axes = flip @ centre, flip @ axes
    return Box(centre, axes, size)


def box_mask(box: Box, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The voxels [k, j, i] of a grid (voxel -> LPS affine (4, 4), shape (nk, nj, ni)) whose centres
    lie in the box."""
    k, j, i = np.indices(shape)
    return box.contains(apply_affine(affine, np.stack([i, j, k], -1).astype(np.float64)))
