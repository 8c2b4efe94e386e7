"""The stacks' vote on where the atlas lies: a check of the stack-to-reference registrations, and a
second start for a stack the fetus turned far away from.

The correlation of two thick-slice stacks has optima tens of degrees from the truth: on a simulated
case with stacks turned 30 degrees apart (and ±15 degrees of motion inside each), a stack registered
from its header came out 47 degrees off, and starts spread over all rotations scored wrong poses
better. The atlas is one sharp brain that every orientation of a stack can be scored against
(atlas/registration.py, coarse), but a single stack's fit is not to be trusted either: on the bundled
real stacks one of six fits was 120 degrees off, the turned fit scoring 0.01 below it.

So the stacks vote. Each stack's atlas fit, carried into the reference frame by its registration,
says where the atlas lies there; registrations that are right agree (within CLUSTER_DEG: the fits of
stacks with motion inside them scatter by up to about 30 degrees). A stack outside the largest group
is registered again from the group's orientation and keeps the new result only where two judges
prefer it (fit/registration.checked_on_atlas): the atlas on the stack, turned as the group says, and
the stack's correlation with the reference stack. A stack whose own fit is wrong starts far off and
loses on the second.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from ..atlas.bundled import Atlas, estimate_week, load_atlas, nearest_week
from ..atlas.orientations import angle_deg
from ..atlas.registration import (
    SEARCH_SMOOTHING_MM,
    AtlasFit,
    Comparison,
    best_polished,
    rescored,
    search,
    starting_fit,
)

#: Orientations polished per stack (the search's best distinct ones).
STACK_CANDIDATES = 3
#: Spacing (mm) of the atlas points a stack is scored at: coarser than the volume's search, because
#: only a start within the registration's basin is needed.
STACK_SPACING_MM = 6.0
#: Atlas orientations in the reference frame this close (degrees) agree.
CLUSTER_DEG = 30.0

#: A rigid map x_reference = A x_stack + b: (A (3, 3), b (3,)).
Rigid = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class AtlasPlacement:
    """Where the stacks' vote put the atlas in the reference frame: its brain centre at ``centre``
    (3,), turned by ``rotation`` (3, 3), scaled by ``scale``."""

    atlas: Atlas
    rotation: np.ndarray
    centre: np.ndarray
    scale: float


@dataclass(frozen=True)
class StackOrientation:
    """The atlas on one stack and the comparison it was scored with (to score other placements)."""

    fit: AtlasFit
    comparison: Comparison

    def score(self, rotation: np.ndarray) -> float:
        """The correlation of the atlas turned to ``rotation`` (3, 3) about the fit's centres."""
        return rescored(self.comparison, replace(self.fit, rotation=rotation)).correlation


def stack_atlas(mask: np.ndarray, affine: np.ndarray, week: float | None) -> Atlas:
    """The atlas of ``week``, else of the week whose brain volume is that of the mask [k, j, i]."""
    if week is None:
        millilitres = float(mask.sum()) * abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
        week = estimate_week(millilitres)
    return load_atlas(nearest_week(week))


def orient(volume: sitk.Image, mask: np.ndarray, affine: np.ndarray, atlas: Atlas) -> StackOrientation:
    """The atlas on a stack (its masked voxels ``volume``, its mask [k, j, i] on the grid ``affine``
    (4, 4)) from any starting orientation, at the size of the mask's brain."""
    comparison = Comparison(atlas, volume, STACK_SPACING_MM, SEARCH_SMOOTHING_MM)
    starts = search(comparison, starting_fit(mask, affine, atlas), np.ones(1), STACK_CANDIDATES)
    return StackOrientation(best_polished(comparison, starts)[0], comparison)


def largest_group(rotations: dict[int, np.ndarray]) -> set[int]:
    """The stacks (keys) whose rotations (3, 3) lie within CLUSTER_DEG of the one with the most such
    neighbours; empty unless more than half of them, and at least two, agree so."""
    groups = [{t for t, other in rotations.items() if angle_deg(rotation, other) <= CLUSTER_DEG}
              for rotation in rotations.values()]  # fmt: skip
    largest = max(groups, key=len, default=set())
    return largest if len(largest) >= 2 and 2 * len(largest) > len(rotations) else set()


def checked(
    registrations: dict[int, Rigid], orientations: dict[int, StackOrientation]
) -> tuple[np.ndarray, np.ndarray, set[int]] | None:
    """The group's atlas orientation (3, 3) and brain centre (3,) in the reference frame, and the stacks
    outside the group, from the stacks' registrations (the reference's the identity) and atlas fits;
    None where no group forms (then nothing can be checked)."""
    placed = {s: registrations[s][0] @ o.fit.rotation for s, o in orientations.items()}
    group = largest_group(placed)
    if not group:
        return None
    member = max(group, key=lambda s: sum(angle_deg(placed[s], placed[t]) <= CLUSTER_DEG for t in group))
    centre = np.mean([registrations[s][0] @ orientations[s].fit.volume_centre + registrations[s][1]
                      for s in group], axis=0)  # fmt: skip
    return placed[member], centre, set(orientations) - group


def group_start(rotation: np.ndarray, centre: np.ndarray, orientation: StackOrientation) -> Rigid:
    """The map that takes a stack's atlas fit onto the group's orientation and brain centre."""
    matrix = Rotation.from_matrix(rotation @ orientation.fit.rotation.T).as_matrix()
    return matrix, centre - matrix @ orientation.fit.volume_centre
