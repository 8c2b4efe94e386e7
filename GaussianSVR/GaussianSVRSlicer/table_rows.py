"""The stack table's rows as the parameter node holds them: one list entry per row in four lists (the
parameter-node wrapper binds no widget to a list of nodes, so the table is wired by hand). Pure Python."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    """A stack (volume node or None), its mask (label map, segmentation or None), its slice thickness (mm),
    and whether it is used."""

    volume: object | None
    mask: object | None
    thickness: float
    include: bool = True


def rows_of(p: Any) -> list[Row]:
    """The rows of a parameter node (``stacks``, ``masks``, ``thicknesses``, ``includeStacks``); lists
    shorter than ``stacks`` (an older scene) are padded with no mask, 1 mm and Use ticked."""
    n = len(p.stacks)
    masks = list(p.masks) + [None] * (n - len(p.masks))
    thicknesses = list(p.thicknesses) + [1.0] * (n - len(p.thicknesses))
    include = list(p.includeStacks) + [True] * (n - len(p.includeStacks))
    return [Row(p.stacks[i], masks[i], float(thicknesses[i]), bool(include[i])) for i in range(n)]


def same_rows(first: Sequence[Row], second: Sequence[Row], tolerance: float = 5e-3) -> bool:
    """Whether two tables hold the same nodes, include boxes and thicknesses (the spin box rounds)."""
    return len(first) == len(second) and all(
        _same_node(a.volume, b.volume)
        and _same_node(a.mask, b.mask)
        and a.include == b.include
        and abs(a.thickness - b.thickness) <= tolerance
        for a, b in zip(first, second, strict=True)
    )


def _same_node(first, second) -> bool:
    if first is None or second is None:
        return first is second
    return first.GetID() == second.GetID()
