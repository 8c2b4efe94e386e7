"""When each slice of a stack was acquired: its rank in the stack's acquisition order.

A fetal head moves between slices, and the slices acquired one after the other are the ones whose
motion is alike; with the usual interleaved order (1, 3, 5, ..., then 2, 4, ...) they are not
neighbours in space. The order comes from the BIDS sidecar's SliceTiming (seconds per slice along the
image's third axis) when it has one, else from the stated default (settings.slice_order).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..settings import SliceOrder
from .stacks import Stack, is_number, sidecar_path, sidecar_value

log = logging.getLogger(__name__)


def sidecar_slice_timing(path: str | Path, n_slices: int) -> np.ndarray | None:
    """SliceTiming (n_slices,) seconds from the image's BIDS sidecar, if it has a usable one; a value
    that is no list of n_slices finite numbers is ignored with a warning."""
    value = sidecar_value(path, "SliceTiming")
    if value is None or value == []:  # dcm2niix writes an empty list when the scanner gave no times
        return None
    numbers = isinstance(value, list) and all(is_number(v) for v in value)
    if not numbers or len(value) != n_slices or not np.all(np.isfinite(value)):
        log.warning(
            "%s: SliceTiming is not a list of %d numbers (one per slice), ignored: the slice order "
            "default applies",
            sidecar_path(path),
            n_slices,
        )
        return None
    return np.asarray(value, dtype=np.float64)


def default_order(n_slices: int, order: SliceOrder, interleave: int) -> np.ndarray:
    """The acquisition rank (n_slices,) of every slice k: ascending, descending, or interleaved by
    ``interleave`` (2: slices 0, 2, 4, ... first, then 1, 3, 5, ...)."""
    k = np.arange(n_slices)
    if order == "ascending":
        return k
    if order == "descending":
        return k[::-1].copy()
    sequence = np.concatenate([k[start::interleave] for start in range(interleave)])
    ranks = np.empty(n_slices, dtype=np.int64)
    ranks[sequence] = k
    return ranks


def acquisition_ranks(stack: Stack, order: SliceOrder, interleave: int) -> np.ndarray:
    """The rank (n_slices,) of every slice of the stack in its acquisition: from its sidecar's
    SliceTiming (ties in slice order), else the default order."""
    timing = sidecar_slice_timing(stack.path, stack.n_slices)
    if timing is None:
        return default_order(stack.n_slices, order, interleave)
    ranks = np.empty(stack.n_slices, dtype=np.int64)
    ranks[np.argsort(timing, kind="stable")] = np.arange(stack.n_slices)
    return ranks


def time_pairs(slice_stack: np.ndarray, slice_k: np.ndarray, ranks: list[np.ndarray]) -> np.ndarray:
    """The pairs (Q, 2) of slice ids acquired one after the other in the same stack (slices without
    pixels are skipped: their neighbours in time pair up); ranks[s] is stack s's acquisition_ranks."""
    pairs = []
    for s, stack_ranks in enumerate(ranks):
        ids = np.nonzero(slice_stack == s)[0]
        in_time = ids[np.argsort(stack_ranks[slice_k[ids]], kind="stable")]
        pairs.append(np.stack([in_time[:-1], in_time[1:]], axis=1))
    return np.concatenate(pairs).astype(np.int64) if pairs else np.zeros((0, 2), np.int64)
