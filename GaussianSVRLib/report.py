"""The JSON report: settings, timings, and per slice its transform, scale, weight and verdict."""

from __future__ import annotations

from typing import Any

import numpy as np

from .optimize import SliceQuality
from .settings import Settings
from .stacks import SliceSet, Stack

#: A stack losing more than this fraction of its slices gets a re-acquisition advice.
REACQUIRE_FRACTION = 0.3


def stack_verdict(index: int, n_slices: int, n_excluded: int) -> str:
    """A plain-language sentence on one stack's slices."""
    if n_excluded == 0:
        return f"stack {index + 1}: all {n_slices} slices used"
    verdict = f"stack {index + 1}: {n_excluded} of {n_slices} slices rejected"
    if n_excluded > REACQUIRE_FRACTION * n_slices:
        verdict += ", consider re-acquiring"
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
        }
        for i in range(slices.n_slices)
    ]
    per_stack = []
    for s, stack in enumerate(stacks):
        on_stack = slices.slice_stack == s
        n_slices = int(on_stack.sum())
        n_excluded = int(quality.excluded[on_stack].sum())
        per_stack.append(
            {
                "path": stack.path,
                "thickness": stack.thickness,
                "spacing": [float(v) for v in stack.spacing],
                "n_slices": n_slices,
                "n_excluded": n_excluded,
                "mean_residual": finite_mean(quality.residual[on_stack]),
                "reference": s == reference,
                "verdict": stack_verdict(s, n_slices, n_excluded),
            }
        )
    return {
        "gaussiansvr_version": version,
        "device": device,
        "cancelled": cancelled,
        "settings": settings.as_dict(),
        "timings": {key: round(value, 3) for key, value in timings.items()},
        "n_pixels": slices.n_pixels,
        "n_gaussians": n_gaussians,
        "slices": per_slice,
        "stacks": per_stack,
    }
