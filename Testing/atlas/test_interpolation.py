"""The atlas searches' linear interpolation against scipy's map_coordinates (order 1, constant)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from GaussianSVRLib.atlas import interpolation


@pytest.mark.parametrize("kernel", ["fused", "torch"])
@pytest.mark.parametrize("shape", [(7, 9, 11), (1, 6, 5), (4, 1, 1)])
def test_values_match_scipy_inside_at_the_edges_and_outside(kernel, shape, monkeypatch) -> None:
    """Random points over and beyond the index range, the corners and the last index of every axis;
    "torch" is the fallback without the numba kernel (scipy itself)."""
    monkeypatch.setenv("GAUSSIANSVR_KERNEL", kernel)
    rng = np.random.default_rng(0)
    array = rng.normal(size=shape)
    top = np.array(shape, dtype=float) - 1.0
    inside_and_beyond = rng.uniform(-1.5, 1.0, size=(2000, 3)) * (top + 1.0) + rng.uniform(0, 1, (2000, 3))
    corners = np.array(np.meshgrid(*[(0.0, t) for t in top], indexing="ij")).reshape(3, -1).T
    edges = np.concatenate([corners, corners - 1e-9, corners + 1e-9, top / 2.0 + 0.0 * corners])
    index = np.concatenate([inside_and_beyond, edges])
    expected = ndimage.map_coordinates(array, index.T, order=1, cval=-7.0, output=np.float64)
    found = interpolation.linear(array, index, cval=-7.0)
    assert found.shape == (len(index),) and found.dtype == np.float64
    np.testing.assert_allclose(found, expected, rtol=1e-12, atol=1e-12)
    assert (found == -7.0).sum() > 10 and (found != -7.0).sum() > 10  # both sides were tried
