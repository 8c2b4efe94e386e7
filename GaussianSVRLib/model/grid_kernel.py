"""Fused CPU kernel (numba) for the grid k-NN backend of neighbours.py: one pass per query.

The torch grid search pads every query to the largest candidate count of its chunk and sorts
(Q, width) distance tables; here each query walks the cells of its block itself and keeps its k
best in a small array, so the work is the candidates it actually has. Same block, same proof (the
k-th distance within the margin to the block's faces) and so the same exact result. numba is
optional and imported on first use, as for kernels.py; call kernels.available() first.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import kernels

#: Queries per work item (handed to threads dynamically: the machine may be shared).
QUERY_CHUNK = 1024
#: Relative slack of the proof (here and in the torch search): float rounding must not prove a near-tie.
PROOF_SLACK = 1e-5

#: The numba module once _compiled() has imported it: this module must import without numba.
numba = None


def _rank(points, starts, ends, nx, ny, nz, cx, cy, cz, ring, x, y, z, k, bound, best_d, best_i):
    """The k nearest (best_d, best_i (k,)) of the candidates within bound of (x, y, z) in the block
    around cell (cx, cy, cz); returns how many were found (at most k) and the slot of the worst."""
    count = 0
    worst, slot = bound, 0
    z_low, z_high = max(cz - ring, 0), min(cz + ring, nz - 1)
    for ix in range(max(cx - ring, 0), min(cx + ring, nx - 1) + 1):
        for iy in range(max(cy - ring, 0), min(cy + ring, ny - 1) + 1):
            column = (ix * ny + iy) * nz
            for row in range(starts[column + z_low], ends[column + z_high]):
                dx = points[row, 0] - x
                dy = points[row, 1] - y
                dz = points[row, 2] - z
                d = dx * dx + dy * dy + dz * dz
                if d >= worst:
                    continue
                if count < k:
                    best_d[count] = d
                    best_i[count] = row
                    count += 1
                    if count < k:
                        continue
                else:
                    best_d[slot] = d
                    best_i[slot] = row
                worst, slot = best_d[0], 0
                for s in range(1, k):
                    if best_d[s] > worst:
                        worst, slot = best_d[s], s
    return count, slot


def _search_kernel(points, order, starts, ends, dims, origin, cell, queries, k, ring, out, proven, chunk):
    """The k nearest of points (N, 3), sorted by cell id (z fastest), for every query (Q, 3): out
    (Q, k) their database rows (order (N,) maps sorted rows to them); proven (Q,) whether the k-th
    distance is within the block's margin."""
    n_queries = queries.shape[0]
    nx, ny, nz = dims[0], dims[1], dims[2]
    for t in numba.prange((n_queries + chunk - 1) // chunk):
        best_d = np.empty(k)
        best_i = np.empty(k, np.int64)
        previous = -1  # the last query of this chunk whose k best were found
        worst_slot = 0
        for q in range(t * chunk, min((t + 1) * chunk, n_queries)):
            x, y, z = queries[q, 0], queries[q, 1], queries[q, 2]
            cx = min(max(int(np.floor((x - origin[0]) / cell)), 0), nx - 1)
            cy = min(max(int(np.floor((y - origin[1]) / cell)), 0), ny - 1)
            cz = min(max(int(np.floor((z - origin[2]) / cell)), 0), nz - 1)
            # The previous query's k best are all within its k-th distance plus the step between
            # the two: if the block holds k candidates within that bound, they are its k best. Only
            # those are ranked, so few candidates of a slice's next pixel reach the ranking.
            bound = np.inf
            if previous >= 0:
                step = np.sqrt(
                    (x - queries[previous, 0]) ** 2
                    + (y - queries[previous, 1]) ** 2
                    + (z - queries[previous, 2]) ** 2
                )
                bound = (np.sqrt(best_d[worst_slot]) + step) ** 2 * (1.0 + PROOF_SLACK)
            count, worst_slot = _rank(
                points, starts, ends, nx, ny, nz, cx, cy, cz, ring, x, y, z, k, bound, best_d, best_i
            )
            if count < k and bound < np.inf:
                count, worst_slot = _rank(
                    points, starts, ends, nx, ny, nz, cx, cy, cz, ring, x, y, z, k, np.inf, best_d, best_i
                )
            worst = best_d[worst_slot] if count == k else np.inf
            previous = q if count == k else -1
            margin = np.inf
            for axis, c, n in ((0, cx, nx), (1, cy, ny), (2, cz, nz)):
                v = queries[q, axis]
                if c - ring > 0:
                    margin = min(margin, v - (origin[axis] + (c - ring) * cell))
                if c + ring < n - 1:
                    margin = min(margin, origin[axis] + (c + ring + 1) * cell - v)
            proven[q] = count == k and worst <= margin * margin * (1.0 - PROOF_SLACK)
            for s in range(count):
                out[q, s] = order[best_i[s]]
            for s in range(count, k):
                out[q, s] = 0


@functools.cache
def _compiled():
    global numba
    import numba

    # The kernel calls _rank by its global name, which must be compiled before the kernel is.
    global _rank
    _rank = numba.njit(cache=True)(_rank)
    return numba.njit(parallel=True, fastmath=False, cache=True)(_search_kernel)


def search(
    points_sorted: torch.Tensor,
    order: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    dims: torch.Tensor,
    origin: torch.Tensor,
    cell: float,
    queries: torch.Tensor,
    k: int,
    ring: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Database rows (Q, k) of the k nearest of points_sorted (N, 3) in the (2 ring + 1)^3 block of
    cells around each query (Q, 3), and whether each row is proven exact (Q,).

    starts, ends (C,): each cell's rows of points_sorted; dims (3,) cells per axis, z fastest;
    origin (3,) the grid's corner, cell its edge (mm); order (N,) the database row of each sorted
    row. CPU tensors; arithmetic in float64.
    """
    kernel = _compiled()
    kernels.use_torch_threads()

    def array(tensor: torch.Tensor, dtype) -> np.ndarray:
        return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=dtype)

    out = np.empty((queries.shape[0], k), np.int64)
    proven = np.empty(queries.shape[0], np.bool_)
    with numba.parallel_chunksize(1):
        kernel(
            array(points_sorted, np.float64),
            array(order, np.int64),
            array(starts, np.int64),
            array(ends, np.int64),
            array(dims, np.int64),
            array(origin, np.float64),
            float(cell),
            array(queries, np.float64),
            k,
            ring,
            out,
            proven,
            QUERY_CHUNK,
        )
    return torch.from_numpy(out), torch.from_numpy(proven)
