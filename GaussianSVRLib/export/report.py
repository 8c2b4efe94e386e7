"""The JSON report: settings, timings, and per slice its transform, scale, weight and verdict."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..fit.quality import (
    LOW_AGREEMENT,
    MIN_JUDGED_ITERATIONS,
    REASON_WORDS,
    SliceQuality,
    stack_agreement,
)
from ..io.slices import SliceSet
from ..io.stacks import Stack
from ..settings import Settings

#: A stack losing more than this fraction of its slices gets a re-acquisition advice.
REACQUIRE_FRACTION = 0.3


def run_verdict(agreements: list[float | None], iterations: int) -> dict[str, Any]:
    """Whether the stacks were brought together, from each stack's agreement (None: not judged) after
    a run of ``iterations``.

    One stack that disagrees is down-weighted and the others make the volume; when at least half of
    the judged stacks (two or more) disagree, no majority shaped the volume: it mixes poses that do
    not fit one anatomy (blurred or doubled), and the run says so instead of passing it as a success.
    Returns status ("ok", "not_aligned" or "not_judged"), the disagreeing stacks (indices from 0) and a
    sentence.
    """
    judged = [a for a in agreements if a is not None]
    low = [s for s, a in enumerate(agreements) if a is not None and a < LOW_AGREEMENT]
    if iterations < MIN_JUDGED_ITERATIONS:
        return {
            "status": "not_judged",
            "stacks": [],
            "text": f"a run of fewer than {MIN_JUDGED_ITERATIONS} iterations is too short to judge",
        }
    if len(judged) < 2 or 2 * len(low) < len(judged):
        return {"status": "ok", "stacks": low, "text": "the stacks were brought together"}
    listed = ", ".join(f"{s + 1} ({agreements[s]:.2f})" for s in low)
    text = (
        f"the stacks could not be brought together: {len(low)} of {len(judged)} stacks agree poorly with "
        f"the volume (stacks {listed}; agreement below {LOW_AGREEMENT:.2f}), so it is likely blurred or "
        "doubled. The fetus probably moved more than the reconstruction can follow, or a mask is wrong: "
        "check the masks, leave out the worst stacks or re-acquire them"
    )
    return {"status": "not_aligned", "stacks": low, "text": text}


def reason_counts(codes: list[str | None]) -> dict[str, int]:
    """Rejected slices per reason code, every code of REASON_WORDS present (0 if unused)."""
    return {code: sum(c == code for c in codes) for code in REASON_WORDS}


def stack_status(n_slices: int, n_excluded: int, agreement: float | None) -> str:
    """The stack's status: "reacquire" (too many slices rejected), "warning" (low agreement) or "ok"."""
    if n_excluded > REACQUIRE_FRACTION * n_slices:
        return "reacquire"
    if agreement is not None and agreement < LOW_AGREEMENT:
        return "warning"
    return "ok"


def stack_verdict(
    index: int,
    n_slices: int,
    n_excluded: int,
    counts: dict[str, int] | None = None,
    agreement: float | None = None,
) -> str:
    """A plain-language sentence on one stack: slices used or rejected and why, agreement, advice."""
    if n_excluded == 0:
        verdict = f"stack {index + 1}: all {n_slices} slices used"
    else:
        verdict = f"stack {index + 1}: {n_excluded} of {n_slices} slices rejected"
        used = {code: n for code, n in (counts or {}).items() if n}
        if len(used) == 1:
            verdict += f" for {REASON_WORDS[next(iter(used))]}"
        elif used:
            verdict += f" ({', '.join(f'{n} for {REASON_WORDS[code]}' for code, n in used.items())})"
    if agreement is not None:
        verdict += f", agreement {agreement:.2f}"
    status = stack_status(n_slices, n_excluded, agreement)
    if status == "reacquire":
        verdict += ", consider re-acquiring"
    elif status == "warning":
        verdict += f" (low, below {LOW_AGREEMENT:.2f}): check this stack, consider re-acquiring"
    return verdict


def finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def finite_mean(values: np.ndarray) -> float | None:
    """Mean of the finite values, or None when there are none (e.g. a run cancelled early)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else None


def build_report(
    *,
    version: str,
    settings: Settings,
    device: str,
    stacks: list[Stack],
    slices: SliceSet,
    reference: int,
    n_gaussians: int,
    rotvec: np.ndarray,
    translation: np.ndarray,
    scale: np.ndarray,
    quality: SliceQuality,
    timings: dict[str, float],
    cancelled: bool,
    warnings: list[str] | None = None,
) -> dict[str, Any]:
    """The report as a JSON-ready dict (see progress.py's clients and the README for the schema)."""
    per_slice = [
        {
            "stack": int(slices.slice_stack[i]),
            "k": int(slices.slice_k[i]),
            "centre": [float(v) for v in slices.slice_centre[i]],
            "rotation": [float(v) for v in rotvec[i]],
            "translation": [float(v) for v in translation[i]],
            "scale": float(scale[i]),
            "weight": float(quality.weight[i]),
            "residual": finite_or_none(quality.residual[i]),
            "excluded": bool(quality.excluded[i]),
            "reason": quality.reason[i],
            "reason_code": quality.reason_code[i] if quality.reason_code else None,
            "ncc": None if quality.ncc is None else finite_or_none(quality.ncc[i]),
            "n_pixels": None if quality.n_pixels is None else int(quality.n_pixels[i]),
            "pose_moves": 0 if quality.pose_moves is None else int(quality.pose_moves[i]),
        }
        for i in range(slices.n_slices)
    ]
    per_stack = []
    for s, stack in enumerate(stacks):
        on_stack = slices.slice_stack == s
        n_slices = int(on_stack.sum())
        n_excluded = int(quality.excluded[on_stack].sum())
        counts = reason_counts([quality.reason_code[i] for i in np.nonzero(on_stack)[0]])
        agreement = stack_agreement(quality, on_stack)
        per_stack.append(
            {
                "path": stack.path,
                "thickness": stack.thickness,
                "spacing": [float(v) for v in stack.spacing],
                "n_slices": n_slices,
                "n_excluded": n_excluded,
                "rejected_by_reason": counts,
                "mean_residual": finite_mean(quality.residual[on_stack]),
                "agreement": agreement,
                "reference": s == reference,
                "status": stack_status(n_slices, n_excluded, agreement),
                "verdict": stack_verdict(s, n_slices, n_excluded, counts, agreement),
            }
        )
    return {
        "gaussiansvr_version": version,
        "device": device,
        "cancelled": cancelled,
        "settings": settings.as_dict(),
        "timings": {
            key: value if isinstance(value, dict) else round(value, 3) for key, value in timings.items()
        },
        "warnings": list(warnings or []),
        "n_pixels": slices.n_pixels,
        "n_gaussians": n_gaussians,
        "slices": per_slice,
        "stacks": per_stack,
        "verdict": run_verdict([stack["agreement"] for stack in per_stack], settings.iterations),
    }
