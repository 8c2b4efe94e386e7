"""Refitting: more rounds of fitting while a stack still disagrees with the volume (large motion).

After large motion the first fit often ends with stacks whose slices have not all found their poses:
the pose searches of the schedule ran while the volume was still a blur of misplaced slices. Another
round at full resolution, with a volume that the other slices have sharpened, slice motion from its
first step and pose searches again, brings most of them in, and a round after that sharpens the
volume further (docs/benchmarks_robustness.md); a round costs as much as the first fit, so rounds run
only after a fit that left a stack agreeing poorly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..model.gaussians import GaussianField
from ..model.motion import SliceMotion
from ..settings import Settings
from .optimize import Hooks, optimize
from .prediction import SliceTensors
from .quality import LOW_AGREEMENT, MIN_JUDGED_ITERATIONS, SliceQuality, stack_agreements

#: A round that raises the worst stack agreement by less than this is the last: more of the same will
#: not bring that stack in.
MIN_GAIN = 0.01


@dataclass(frozen=True)
class RefitRound:
    """One extra round: every stack's agreement before and after it, and its duration."""

    before: list[float | None]
    after: list[float | None]
    seconds: float

    def as_dict(self) -> dict:
        return {
            "agreements_before": self.before,
            "agreements_after": self.after,
            "seconds": round(self.seconds, 1),
        }


def worst(agreements: list[float | None]) -> float | None:
    judged = [a for a in agreements if a is not None]
    return min(judged) if judged else None


def needs_refit(agreements: list[float | None], iterations: int, below: float = LOW_AGREEMENT) -> bool:
    """Whether a run of ``iterations`` whose stacks agree as given is worth another round: one stack at
    least agrees ``below`` the given level, in a run long enough to be judged (a quick check of an
    install is not)."""
    lowest = worst(agreements)
    return iterations >= MIN_JUDGED_ITERATIONS and lowest is not None and lowest < below


def refit(
    field_: GaussianField,
    motion: SliceMotion,
    fine: SliceTensors,
    slice_stack: np.ndarray,
    n_stacks: int,
    settings: Settings,
    quality: SliceQuality,
    hooks: Callable[[int], Hooks],
    time_pairs: np.ndarray | None = None,
) -> tuple[SliceQuality, list[RefitRound]]:
    """Up to settings.refit_rounds more rounds after a fit that ended with ``quality`` with a stack that
    agrees poorly, for as long as each round raises the worst agreement by MIN_GAIN at least (a stack
    just brought in still sharpens the volume that the others are fitted to).

    fine: the full-resolution slice pixels; hooks(r): the optimizer's hooks for round r (from 1). A
    round is settings.iterations steps of the fine stage with slice motion from the first step.
    Returns the last round's slice quality (``quality`` without a round; pose_moves counted over every
    round) and the rounds.
    """
    before = stack_agreements(quality, slice_stack, n_stacks)
    if not needs_refit(before, settings.iterations):
        return quality, []
    round_settings = settings.updated(motion_start=0.0)
    rounds: list[RefitRound] = []
    moves = np.zeros(len(slice_stack), dtype=np.int64) if quality.pose_moves is None else quality.pose_moves
    while len(rounds) < settings.refit_rounds:
        started = time.monotonic()
        quality = optimize(
            field_, motion, {"fine": fine}, slice_stack, round_settings, hooks(len(rounds) + 1), time_pairs
        )
        if quality.pose_moves is not None:
            moves = moves + quality.pose_moves
        quality.pose_moves = moves
        after = stack_agreements(quality, slice_stack, n_stacks)
        rounds.append(RefitRound(before, after, time.monotonic() - started))
        lowest, previous = worst(after), worst(before)
        if lowest is None or previous is None or lowest - previous < MIN_GAIN:
            break
        before = after
    return quality, rounds
