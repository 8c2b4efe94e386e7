"""Specks: bright voxels beyond a margin outside the brain."""

from __future__ import annotations

import numpy as np
import pytest

from GaussianSVRLib.qa.specks import bright_outside


def ball(shape, centre, radius_voxels) -> np.ndarray:
    k, j, i = np.indices(shape)
    return (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius_voxels**2


def test_only_bright_voxels_beyond_the_margin_count():
    shape = (40, 40, 40)
    brain = ball(shape, (20, 20, 20), 10)
    volume = np.where(brain, 100.0, 0.0)
    volume[20, 20, 31] = 500.0  # 1 voxel outside: within a 3 mm margin at 0.5 mm voxels
    volume[20, 20, 38] = 500.0  # 8 voxels = 4 mm out
    volume[2, 2, 2] = 50.0  # beyond the margin but dimmer than the brain's median
    assert bright_outside(volume, brain, (0.5, 0.5, 0.5), margin_mm=3.0) == 1
    # In millimetres, not voxels: at 1 mm voxels the first speck is 1 mm out, the second 8 mm.
    assert bright_outside(volume, brain, (1.0, 1.0, 1.0), margin_mm=3.0) == 1
    assert bright_outside(volume, brain, (0.1, 0.1, 0.1), margin_mm=3.0) == 0
    known = np.ones(shape, bool)
    known[:, :, 35:] = False
    assert bright_outside(volume, brain, (0.5, 0.5, 0.5), known, margin_mm=3.0) == 0


def test_an_empty_brain_is_refused():
    with pytest.raises(ValueError, match="empty"):
        bright_outside(np.ones((4, 4, 4)), np.zeros((4, 4, 4), bool), (1.0, 1.0, 1.0))
