"""K-nearest-neighbour search of query points among Gaussian centres: one interface, four backends.

``knn(database (N, 3), queries (Q, 3), k)`` returns (Q, k) int64 indices into ``database`` on the
queries' device; the order within a row is unspecified. Every backend is exact (up to float32
rounding of near-ties):

- ``"faiss"``: ``IndexFlatL2`` on CPU, ``GpuIndexFlatL2`` when the queries are on CUDA and the
  installed faiss has GPU support. faiss is imported lazily: importing it next to torch can clash
  over OpenMP in some processes.
- ``"kdtree"``: ``scipy.spatial.cKDTree`` queried on all cores (CPU only; other devices round-trip).
- ``"grid"``: centres binned into a uniform grid in torch (any device); each query takes the top-k
  of the centres in the (2 r + 1)^3 block of cells around its own (r = ``GRID_FIRST_RING``) and
  keeps them when the k-th distance is within the distance from the query to the block's faces
  (then no centre outside can be closer). Queries that fail -- sparse regions, fewer than k
  candidates, queries far outside the centres -- are redone with the block widened (r doubled)
  until proven; a block spanning the whole grid always is. So the result is exact, never padded;
  only the cost grows for queries far from every centre. On the CPU each round is the fused numba
  kernel of grid_kernel.py (kernels.enabled()), elsewhere torch.
- ``"torch"``: brute force in query chunks (squared distances by one matrix product, ``topk``, the
  shortlist re-ranked by exact differences); the reference and the fallback on devices without
  a faster option.

All backends process queries in chunks so that temporaries stay under ``MAX_CHUNK_BYTES``.
``choose_backend`` picks the fastest backend per device, as measured by bench/bench_neighbours.py.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch

from ..devices import cpu_threads
from . import grid_kernel, kernels

BACKENDS = ("faiss", "kdtree", "grid", "torch")
#: Upper bound on the temporaries of one query chunk (bytes).
MAX_CHUNK_BYTES = 1 << 30
#: Half-width of the first grid block in cells (2: 5x5x5 cells), and the distance it covers around
#: a query's cell as a multiple of the radius expected to hold k centres (cell = factor R / ring).
#: 1.2 proves > 99 % of the queries in the first round on brain-shaped data; 5^3 cells of 0.6 R hold
#: ~40 % fewer candidates than 3^3 cells of 1.2 R and measured ~15 % faster on CPU.
GRID_FIRST_RING = 2
GRID_CELL_FACTOR = 1.2
#: Query x candidate slots per grid chunk (each slot costs up to ~100 bytes of temporaries).
_GRID_CHUNK_SLOTS = MAX_CHUNK_BYTES // 128
#: Extra brute-force candidates re-ranked with exact differences.
_RERANK_SPARE = 8
#: Squared norm given to the padding slots of a grid chunk so they are never among the k nearest.
_FAR = 1.0e18


def knn(database: torch.Tensor, queries: torch.Tensor, k: int, backend: str = "auto") -> torch.Tensor:
    """Indices (Q, k) int64 of the k nearest rows of ``database`` (N, 3) for each row of ``queries`` (Q, 3).

    The result is on the queries' device; rows are not sorted by distance. ``backend`` is one of
    ``BACKENDS`` or ``"auto"`` (``choose_backend`` of the queries' device). Raises ValueError on bad
    shapes or when k is not in 1..N.
    """
    _check_inputs(database, queries, k)
    if backend == "auto":
        backend = choose_backend(queries.device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-NN backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    if backend == "faiss" and _import_faiss() is None:
        backend = "kdtree" if queries.device.type == "cpu" else "torch"
        warnings.warn(f"faiss is not installed; k-NN falls back to {backend!r}", stacklevel=2)
    search: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] = {
        "faiss": _knn_faiss,
        "kdtree": _knn_kdtree,
        "grid": _knn_grid,
        "torch": _knn_torch,
    }[backend]
    with torch.no_grad():
        return search(database.detach(), queries.detach(), k).to(queries.device)


def choose_backend(device: torch.device | str) -> str:
    """The fastest available backend for queries on ``device`` (see docs/benchmarks.md)."""
    device = torch.device(device)
    if device.type == "cpu":
        return "grid" if kernels.enabled() else "kdtree"
    if device.type == "cuda":
        faiss = _import_faiss()
        if faiss is not None and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
            return "faiss"
    return "torch"


def _check_inputs(database: torch.Tensor, queries: torch.Tensor, k: int) -> None:
    for name, points in (("database", database), ("queries", queries)):
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"k-NN {name} must have shape (n, 3), got {tuple(points.shape)}")
        if not points.is_floating_point():
            raise ValueError(f"k-NN {name} must be a floating-point tensor, got {points.dtype}")
    if not 1 <= k <= database.shape[0]:
        raise ValueError(f"k-NN needs 1 <= k <= number of database points ({database.shape[0]}), got k={k}")


def _compute_dtype(database: torch.Tensor, queries: torch.Tensor) -> torch.dtype:
    """float32 or float64: half precision cannot hold squared distances of brain-sized clouds."""
    return torch.promote_types(torch.promote_types(database.dtype, queries.dtype), torch.float32)


def _chunk_size(bytes_per_query: int) -> int:
    return max(1, MAX_CHUNK_BYTES // max(1, bytes_per_query))


@functools.cache
def _import_faiss():
    """The faiss module with its OpenMP threads set to the usable cores, or None when not installed."""
    torch_threads = torch.get_num_threads()
    try:
        import faiss
    except ImportError:
        return None
    faiss.omp_set_num_threads(cpu_threads())
    # torch and faiss may share one OpenMP runtime: keep torch's own setting.
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    return faiss


def _as_float32_numpy(points: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(points.to("cpu", torch.float32).numpy())


def _knn_faiss(database: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    faiss = _import_faiss()
    if queries.device.type == "cuda" and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        device = queries.device.index if queries.device.index is not None else torch.cuda.current_device()
        resources = faiss.StandardGpuResources()
        config = faiss.GpuIndexFlatConfig()
        config.device = device
        index = faiss.GpuIndexFlatL2(resources, 3, config)
    else:
        index = faiss.IndexFlatL2(3)
    index.add(_as_float32_numpy(database))
    query_points = _as_float32_numpy(queries)
    out = torch.empty((len(query_points), k), dtype=torch.int64)
    step = _chunk_size(k * 12)  # labels int64 + distances float32
    for start in range(0, len(query_points), step):
        _, labels = index.search(query_points[start : start + step], k)
        out[start : start + step] = torch.from_numpy(labels)
    return out


def _knn_kdtree(database: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    from scipy.spatial import cKDTree

    # Unbalanced, uncompacted, 32-point leaves: the fastest build + query measured (see module doc).
    tree = cKDTree(
        database.to("cpu", torch.float64).numpy(), leafsize=32, balanced_tree=False, compact_nodes=False
    )
    query_points = queries.to("cpu", torch.float64).numpy()
    out = torch.empty((len(query_points), k), dtype=torch.int64)
    # indices int64 + distances float64 from scipy, the copy into the result, scipy's own buffers
    step = _chunk_size(k * 40)
    for start in range(0, len(query_points), step):
        _, indices = tree.query(query_points[start : start + step], k=k, workers=cpu_threads())
        out[start : start + step] = torch.from_numpy(indices).reshape(-1, k)
    return out


def _knn_torch(database: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    dtype = _compute_dtype(database, queries)
    base = database.to(queries.device, dtype)
    # |p|^2 - 2 q.p loses precision with the magnitude of the coordinates: centre them first.
    centroid = base.mean(0)
    base = base - centroid
    base_sq = base.square().sum(1)
    out = torch.empty((len(queries), k), dtype=torch.int64, device=queries.device)
    # Per query: a distance row (4-8 bytes per centre) plus topk's working copy.
    step = _chunk_size(3 * base.shape[0] * base.element_size())
    wider = min(k + _RERANK_SPARE, base.shape[0])
    for start in range(0, len(queries), step):
        chunk = queries[start : start + step].to(dtype) - centroid
        dist = torch.addmm(base_sq, chunk, base.T, alpha=-2.0)  # |q|^2 does not change the ranking
        shortlist = dist.topk(wider, dim=1, largest=False, sorted=False).indices
        # |p|^2 - 2 q.p is off by ~1e-4 mm^2 in float32: re-rank a few spare candidates exactly.
        exact = (base[shortlist] - chunk[:, None, :]).square().sum(-1)
        best = exact.topk(k, dim=1, largest=False, sorted=False).indices
        out[start : start + step] = shortlist.gather(1, best)
    return out


class _Grid:
    """Centres binned into cubic cells of edge ``cell`` (mm). ``points_t`` (3, N) are the centres
    sorted by cell id (``order`` maps sorted rows back to database rows); cell c holds sorted rows
    ``starts[c]:ends[c]``. Cell ids run fastest along z, so the cells of a block that share (x, y)
    form one contiguous run of sorted rows."""

    def __init__(self, database: torch.Tensor, cell: float) -> None:
        self.cell = cell
        self.origin = database.min(0).values
        extent = database.max(0).values - self.origin
        self.dims = (extent / cell).floor().long() + 1
        ids = self.cell_ids(self.cell_coords(database))
        self.order = torch.argsort(ids)
        self.points_t = database[self.order].T.contiguous()  # (3, N): gathers read rows
        counts = torch.bincount(ids, minlength=int(self.dims.prod()))
        self.ends = torch.cumsum(counts, 0)
        self.starts = self.ends - counts

    def cell_coords(self, points: torch.Tensor) -> torch.Tensor:
        """Integer cell coordinates (P, 3) of points (P, 3), clamped into the grid."""
        coords = ((points - self.origin) / self.cell).floor().long()
        return torch.minimum(coords.clamp_min(0), self.dims - 1)

    def cell_ids(self, coords: torch.Tensor) -> torch.Tensor:
        return (coords[..., 0] * self.dims[1] + coords[..., 1]) * self.dims[2] + coords[..., 2]

    def coords_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Cell coordinates (C, 3) of cell ids (C,): the inverse of ``cell_ids``."""
        plane = self.dims[1] * self.dims[2]
        return torch.stack([ids // plane, (ids % plane) // self.dims[2], ids % self.dims[2]], 1)

    def blocks(self, coords: torch.Tensor, ring: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs of sorted rows covering the (2 ring + 1)^3 block around cells (U, 3), clipped to the
        grid: starts and lengths (U, R), one run per (x, y) column of the block."""
        # Columns counted from the block's first in-grid column, so a wide ring costs no more
        # than the grid's own columns.
        widths = [min(2 * ring + 1, int(d)) for d in self.dims[:2]]
        steps = torch.cartesian_prod(*(torch.arange(w, device=coords.device) for w in widths))
        low = (coords[:, None, :2] - ring).clamp_min(0)
        columns = low + steps  # (U, R, 2)
        valid = (columns <= torch.minimum(coords[:, None, :2] + ring, self.dims[:2] - 1)).all(-1)
        columns = torch.minimum(columns, self.dims[:2] - 1)
        z_low = (coords[:, None, 2] - ring).clamp_min(0).expand(-1, columns.shape[1])
        z_high = torch.minimum(coords[:, None, 2] + ring, self.dims[2] - 1).expand(-1, columns.shape[1])
        first = self.cell_ids(torch.cat([columns, z_low[..., None]], -1))
        last = self.cell_ids(torch.cat([columns, z_high[..., None]], -1))
        starts = self.starts[first]
        return starts, torch.where(valid, self.ends[last] - starts, 0)

    def margins(self, queries: torch.Tensor, coords: torch.Tensor, ring: int) -> torch.Tensor:
        """Distance (Q,) from each query to the nearest face of its block that has cells beyond it;
        every centre outside the block is at least this far away."""
        low = self.origin + (coords - ring) * self.cell
        high = self.origin + (coords + ring + 1) * self.cell
        inf = torch.full_like(queries, math.inf)
        below = torch.where(coords - ring > 0, queries - low, inf)
        above = torch.where(coords + ring < self.dims - 1, high - queries, inf)
        return torch.minimum(below, above).min(1).values

    def search(self, queries: torch.Tensor, k: int, ring: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (Q, k) among the centres in the (2 ring + 1)^3 block around each query's cell, and
        whether each row is proven exact (Q,): the k-th distance is within the block's margin."""
        if queries.device.type == "cpu" and kernels.enabled():
            return grid_kernel.search(
                self.points_t.T, self.order, self.starts, self.ends, self.dims, self.origin, self.cell,
                queries, k, ring,
            )  # fmt: skip
        coords = self.cell_coords(queries)
        cells, query_cell = _unique_inverse(self.cell_ids(coords))
        cell_coords = self.coords_of(cells)
        run_starts, run_lengths = self.blocks(cell_coords, ring)
        totals = run_lengths.sum(1)
        # Cells in order of candidate count, queries grouped by cell in that order: a chunk of cells
        # is padded only to its own largest candidate count.
        cell_order = torch.argsort(totals)
        cell_rank = torch.empty_like(cell_order)
        cell_rank[cell_order] = torch.arange(len(cell_order), device=cell_order.device)
        query_rank = cell_rank[query_cell]
        query_order = torch.argsort(query_rank)
        sorted_totals = totals[cell_order].cpu().numpy()
        query_ends = torch.cumsum(torch.bincount(query_rank, minlength=len(cells)), 0).cpu().numpy()
        kth = queries.new_empty(len(queries))
        indices = torch.empty((len(queries), k), dtype=torch.int64, device=queries.device)
        for first, last in _cell_chunks(query_ends, sorted_totals, max(k, 1), _GRID_CHUNK_SLOTS):
            cells_here = cell_order[first:last]
            q_first = int(query_ends[first - 1]) if first > 0 else 0
            rows = query_order[q_first : int(query_ends[last - 1])]
            local = query_rank[rows] - first
            centres = self.origin + (cell_coords[cells_here] + 0.5) * self.cell
            runs = run_starts[cells_here], run_lengths[cells_here]
            dist, positions = self._chunk(queries[rows] - centres[local], local, centres, *runs, k)
            kth[rows] = dist.max(1).values
            indices[rows] = self.order.take(positions)
        exact = kth <= self.margins(queries, coords, ring).square() * (1 - grid_kernel.PROOF_SLACK)
        return indices, exact

    def _chunk(
        self,
        relative: torch.Tensor,
        local: torch.Tensor,
        centres: torch.Tensor,
        run_starts: torch.Tensor,
        run_lengths: torch.Tensor,
        k: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances and sorted-row positions (Qc, k) of the k best candidates for queries
        given relative to their cell centre (Qc, 3), ``local`` (Qc,) indexing cells of this chunk
        (C,) with centres (C, 3) and runs (C, R)."""
        width = max(int(run_lengths.sum(1).max()), k)
        run_ends = torch.cumsum(run_lengths, 1)
        slot = torch.arange(width, device=relative.device).expand(len(centres), -1)
        run = torch.searchsorted(run_ends, slot.contiguous(), right=True)
        filled = run < run_lengths.shape[1]
        run = run.clamp_max(run_lengths.shape[1] - 1)
        positions = run_starts.gather(1, run) + slot - (run_ends - run_lengths).gather(1, run)
        positions = torch.where(filled, positions, 0)
        # Coordinates relative to the cell centre keep |c|^2 - 2 q.c accurate in float32.
        cand = self.points_t.index_select(1, positions.flatten()).view(3, *positions.shape)
        cand = cand.permute(1, 0, 2) - centres[:, :, None]  # (C, 3, width)
        cand_sq = torch.where(filled, cand.square().sum(1), _FAR)
        packed = torch.cat([cand, cand_sq[:, None, :]], 1)  # (C, 4, width)
        weights = torch.cat([-2.0 * relative, torch.ones_like(relative[:, :1])], 1)[:, None, :]  # (Qc, 1, 4)
        dist = torch.bmm(weights, packed.index_select(0, local)).squeeze(1)  # (Qc, width): |c|^2 - 2 q.c
        best, cols = dist.topk(k, dim=1, largest=False, sorted=False)
        best = best + relative.square().sum(1, keepdim=True)
        return best, positions.take(local[:, None] * width + cols)


def _unique_inverse(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(values, return_inverse=True)`` for 1-D integers, several times faster on CPU."""
    sorted_values, order = torch.sort(values)
    first = torch.ones_like(sorted_values, dtype=torch.bool)
    first[1:] = sorted_values[1:] != sorted_values[:-1]
    inverse = torch.empty_like(order)
    inverse[order] = torch.cumsum(first, 0) - 1
    return sorted_values[first], inverse


def _cell_chunks(
    query_ends: np.ndarray, totals: np.ndarray, k: int, max_slots: int
) -> Iterator[tuple[int, int]]:
    """Consecutive ranges [first, last) of cells sorted by candidate count ``totals`` (C,) whose
    queries (cumulative counts ``query_ends`` (C,)) x widest count stay under max_slots (a single
    cell may exceed it)."""
    first = 0
    n = len(totals)
    while first < n:
        before = query_ends[first - 1] if first > 0 else 0
        cost = (query_ends[first:] - before) * np.maximum(totals[first:], k)
        last = first + max(1, int(np.searchsorted(cost, max_slots, side="right")))
        yield first, last
        first = last


def _grid_cell_size(database: torch.Tensor, k: int) -> float:
    """Cell edge (mm): GRID_CELL_FACTOR times the radius expected to hold k centres at the density
    of the occupied volume, divided by the first ring; never more than 8 N + 1000 cells."""
    n = database.shape[0]
    extent = database.max(0).values - database.min(0).values
    # Occupied volume measured on cells holding ~4 centres on average over the bounding box,
    # so that the empty corners around a brain-shaped cloud do not count as sparse regions.
    probe = max(float((extent.prod() * 4.0 / n) ** (1.0 / 3.0)), 1e-6)
    coords = ((database - database.min(0).values) / probe).floor().long()
    ids = (coords[:, 0] * (coords[:, 1].max() + 1) + coords[:, 1]) * (coords[:, 2].max() + 1) + coords[:, 2]
    occupied = len(_unique_inverse(ids)[0]) * probe**3
    radius = (3.0 * k * occupied / (4.0 * math.pi * n)) ** (1.0 / 3.0)
    cell = max(GRID_CELL_FACTOR * radius / GRID_FIRST_RING, 1e-6)
    # Flat or degenerate clouds would otherwise ask for a huge, mostly empty grid.
    while float(((extent / cell).floor() + 1).prod()) > 8 * n + 1000:
        cell *= 1.25
    return cell


def _knn_grid(database: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    device = queries.device
    dtype = _compute_dtype(database, queries)
    base = database.to(device, dtype)
    grid = _Grid(base, _grid_cell_size(base, k))
    queries = queries.to(dtype)
    ring = GRID_FIRST_RING
    out, exact = grid.search(queries, k, ring)
    pending = torch.nonzero(~exact).flatten()
    # Widen the block for the queries it could not prove; a block spanning the whole grid has no
    # face with cells beyond it, so the last round is exact for every query.
    while len(pending) > 0:
        ring *= 2
        indices, exact = grid.search(queries.index_select(0, pending), k, ring)
        out[pending] = indices
        pending = pending[~exact]
    return out
