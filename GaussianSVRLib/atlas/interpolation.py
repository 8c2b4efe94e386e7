"""Linear interpolation of a 3-D array at many points, as scipy's ``map_coordinates(order=1,
mode="constant")`` computes it, on every core.

The atlas searches score thousands of placements of thousands of points; scipy's generic
interpolator runs on one core and was most of a brain search's time. The numba kernel (used where
model.kernels.enabled()) gives the same values: points outside the array's index range get cval,
points inside interpolate between in-range voxels only.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from ..model import kernels

#: Points per work item of the kernel.
POINT_CHUNK = 4096


def _linear_kernel(array, index, cval, out, chunk):
    """out (P,): array (K, J, I) linearly interpolated at index (P, 3) (k, j, i), cval outside."""
    n_k, n_j, n_i = array.shape
    n_points = index.shape[0]
    for t in numba.prange((n_points + chunk - 1) // chunk):
        for p in range(t * chunk, min((t + 1) * chunk, n_points)):
            z, y, x = index[p, 0], index[p, 1], index[p, 2]
            if not (0.0 <= z <= n_k - 1 and 0.0 <= y <= n_j - 1 and 0.0 <= x <= n_i - 1):
                out[p] = cval
                continue
            k0, j0, i0 = int(z), int(y), int(x)
            fz, fy, fx = z - k0, y - j0, x - i0
            k1, j1, i1 = min(k0 + 1, n_k - 1), min(j0 + 1, n_j - 1), min(i0 + 1, n_i - 1)
            c00 = array[k0, j0, i0] * (1.0 - fx) + array[k0, j0, i1] * fx
            c01 = array[k0, j1, i0] * (1.0 - fx) + array[k0, j1, i1] * fx
            c10 = array[k1, j0, i0] * (1.0 - fx) + array[k1, j0, i1] * fx
            c11 = array[k1, j1, i0] * (1.0 - fx) + array[k1, j1, i1] * fx
            c0 = c00 * (1.0 - fy) + c01 * fy
            c1 = c10 * (1.0 - fy) + c11 * fy
            out[p] = c0 * (1.0 - fz) + c1 * fz


#: The numba module once _compiled() has imported it: this module must import without numba.
numba = None


@functools.cache
def _compiled():
    global numba
    import numba

    return numba.njit(parallel=True, cache=True)(_linear_kernel)


def linear(array: np.ndarray, index: np.ndarray, cval: float = 0.0) -> np.ndarray:
    """array (K, J, I) at fractional indices index (P, 3), ordered (k, j, i) like the array's axes;
    float64 (P,), cval outside the index range."""
    index = np.ascontiguousarray(index, dtype=np.float64)
    if not kernels.enabled():
        return ndimage.map_coordinates(array, index.T, order=1, cval=cval, output=np.float64)
    kernel = _compiled()
    kernels.use_torch_threads()
    out = np.empty(index.shape[0])
    with numba.parallel_chunksize(1):
        kernel(np.ascontiguousarray(array), index, float(cval), out, POINT_CHUNK)
    return out
