"""Live previews during a run: the volume at reduced resolution, the Gaussians (continuable) and their
ellipsoids, written together into the preview folder, each file whole.

A preview is a convenience: one that cannot be written (a full disk, a folder removed under the run)
turns previews off with a warning, and the run goes on to its final outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from ..fit.initialize import Problem
from ..io.gaussians_file import write_npz, write_vtp
from ..io.outputs import OutputError, OutputSet, problem_of, save_image
from ..model.gaussians import GaussianField
from ..model.motion import SliceMotion
from ..settings import Settings
from .frame import continuation, preview_grid, snapshot, volume_image
from .paths import preview_paths

#: Ellipsoids drawn in a preview (the final output draws more).
PREVIEW_GLYPHS = 3000
#: The first preview is due this soon after the optimization starts (or sooner with a shorter interval),
#: so that a viewer sees the volume early; a run that ends before writes one at its end.
FIRST_PREVIEW_S = 3.0


class Previews:
    """Writes a preview when one is due (FIRST_PREVIEW_S after the start, then every
    ``checkpoint_interval_s`` seconds) or when asked.

    emit(kind, **fields) receives the "checkpoint" message; warn(text) the reason previews stopped.
    ``written`` holds the paths of the last preview written (empty before the first).
    """

    def __init__(
        self,
        folder: str | None,
        problem: Problem,
        settings: Settings,
        models: tuple[GaussianField, SliceMotion],
        device: torch.device,
        emit: Callable[..., None],
        warn: Callable[[str], None],
    ) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.problem, self.settings, self.models, self.device = problem, settings, models, device
        self.emit, self.warn = emit, warn
        self.last = time.monotonic()
        self.written: dict[str, str] = {}

    def maybe(self, step: int) -> None:
        interval = self.settings.checkpoint_interval_s
        due = interval if self.written else min(interval, FIRST_PREVIEW_S)
        if time.monotonic() - self.last >= due:
            self.write(step)

    def at_end(self, step: int) -> None:
        """The run's last iteration: a preview if none was written yet (a short run)."""
        if not self.written:
            self.write(step)

    def write(self, step: int) -> None:
        if self.folder is None:
            return
        paths = preview_paths(self.folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            state = snapshot(self.problem, *self.models)
            image = volume_image(state, *preview_grid(self.problem), self.settings, self.device)
            with OutputSet() as staged:
                staged.add(paths["volume"], partial(save_image, image))
                staged.add(
                    paths["gaussians"],
                    partial(write_npz, **state.gaussians(), **continuation(self.problem, state)),
                )
                staged.add(
                    paths["ellipsoids"], partial(write_vtp, **state.gaussians(), max_count=PREVIEW_GLYPHS)
                )
                staged.commit()
        except (OutputError, OSError) as error:
            self.folder = None
            folder = paths["volume"].parent
            self.warn(
                f"{folder}: previews stopped, one could not be written ({problem_of(error)}); the run goes on"
            )
            return
        self.written = {kind: str(path) for kind, path in paths.items()}
        self.emit("checkpoint", iter=step, **self.written)
        self.last = time.monotonic()
