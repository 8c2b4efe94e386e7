"""The final outputs of a run: where they go, and writing them as one set.

Every file is staged first (written under a temporary name and read back), then, unless the run was
cancelled meanwhile, all are renamed into place together: a run leaves either its whole set of
outputs or none of them, and an earlier set stays untouched until the new one is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..atlas.registration import StandardSpace
from ..fit.initialize import Problem
from ..fit.quality import SliceQuality
from ..fit.registration import mask_image
from ..io.gaussians_file import write_npz, write_vtp
from ..io.outputs import OutputSet, save_image, save_json, save_png, save_transform
from .frame import Snapshot, continuation
from .paths import OUTPUT_KINDS, Outputs
from .qc import qc_image

#: Ellipsoids drawn in the final .vtp (those carrying the most signal).
FINAL_GLYPHS = 5000


@dataclass
class Reconstruction:
    """What a run produced: the volume, the Gaussians (world), the report and the slice quality.

    A cancelled run has no volume; its paths point at the last preview, if any.
    """

    volume: sitk.Image | None
    gaussians: dict[str, np.ndarray]
    report: dict[str, Any]
    quality: SliceQuality | None
    cancelled: bool = False
    paths: dict[str, str | None] = field(default_factory=dict)


def write_results(
    outputs: Outputs,
    problem: Problem,
    state: Snapshot,
    image: sitk.Image,
    report: dict[str, Any],
    quality: SliceQuality,
    before_commit: Callable[[], None],
    space: StandardSpace | None = None,
) -> dict[str, str | None]:
    """Stage every requested output, call ``before_commit`` (which raises to cancel: nothing is then
    written), then put them all in place. Returns the written paths by kind (None: not asked for).

    ``space``: where an atlas-space volume lies; its transform is the "transform" output.
    """
    files = outputs.files()
    if space is None:
        files.pop("transform", None)
    paths: dict[str, str | None] = {
        kind: str(files[kind]) if kind in files else None for kind in OUTPUT_KINDS
    }
    masks = outputs.mask_files([stack.path for stack in problem.stacks])
    report["outputs"] = dict(paths) | ({"masks": [str(path) for path in masks]} if masks else {})
    if masks:
        masks[0].parent.mkdir(exist_ok=True)
    with OutputSet() as staged:
        for stack, path in zip(problem.stacks, masks, strict=False):  # no masks: no mask_dir
            staged.add(path, partial(save_image, mask_image(stack)))
        if "volume" in files:
            staged.add(files["volume"], partial(save_image, image))
        if "gaussians" in files:
            staged.add(
                files["gaussians"], partial(write_npz, **state.gaussians(), **continuation(problem, state))
            )
            staged.add(files["ellipsoids"], partial(write_vtp, **state.gaussians(), max_count=FINAL_GLYPHS))
        if "qc" in files and quality.predicted is not None:
            picture = qc_image(report, problem.stacks, problem.slices, quality.predicted)
            staged.add(files["qc"], partial(save_png, picture))
        if "transform" in files and space is not None:
            staged.add(files["transform"], partial(save_transform, space.fit.transform()))
        if "report" in files:
            staged.add(files["report"], partial(save_json, report))
        before_commit()
        staged.commit()
    return paths
