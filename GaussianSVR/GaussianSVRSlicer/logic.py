"""The module's logic without Slicer's application: the run request built from the parameters (the one
place), starting and following a reconstruction in a scene, what outlives a run (the Gaussians to
continue from, the QC picture), and the pip workers. Slicer's services (its temporary folder, the
renderer pause, what the views show) are passed in, so that it runs with the ``slicer-core`` wheel.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import command, deps, params
from .inputs import InputProblem, StackInput
from .runner import WorkerProcess
from .session import GlyphStyle, ReconstructionSession, Request, copy_atomically, output_folder
from .table_rows import rows_of

#: Files kept between runs in the module's temporary folder, by kind.
KEPT_FILES = {"gaussians": "last_gaussians.npz", "qc": "last_qc.png"}


def stack_inputs(p: Any) -> list[StackInput]:
    """The table rows of a parameter node that are used: a volume chosen and Use ticked."""
    return [
        StackInput(row.volume, row.mask, row.thickness)
        for row in rows_of(p)
        if row.volume is not None and row.include
    ]


def engine_values(p: Any) -> dict[str, object]:
    """The engine settings of a parameter node, by parameter name."""
    return {spec.name: getattr(p, spec.name) for spec in params.ENGINE_SETTINGS}


def glyph_style(p: Any) -> GlyphStyle:
    return GlyphStyle(p.glyphScale, p.maxGlyphs, p.showGaussians)


class Logic:
    """Starts and follows reconstructions in ``scene``; one run at a time.

    temporary_dir: where runs get their work folders and what outlives a run is kept; show_result(volume
    node, first stack node): what the views show once a run has a volume.
    """

    def __init__(
        self,
        scene,
        temporary_dir: Path,
        render_blocker: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        show_result: Callable[[Any, Any], None] | None = None,
        python: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.scene = scene
        self.folder = Path(temporary_dir) / "GaussianSVR"
        self.render_blocker = render_blocker
        self.show_result = show_result
        self.python = list(python) if python is not None else command.python_command()
        self.env = dict(os.environ if env is None else env)
        self.session: ReconstructionSession | None = None

    @property
    def running(self) -> bool:
        return self.session is not None and not self.session.finished

    def kept_path(self, kind: str) -> Path:
        """Where the last run's Gaussians ("gaussians") and QC picture ("qc") are kept between runs."""
        return self.folder / KEPT_FILES[kind]

    def request(self, p: Any) -> Request:
        """The run a parameter node describes; InputProblem for a choice the user has to fix first."""
        init_gaussians = None
        if p.continueFromLast:
            init_gaussians = self.kept_path("gaussians")
            if not init_gaussians.is_file():
                raise InputProblem(
                    "There is no earlier result to continue from: untick Continue, or run a reconstruction "
                    "first."
                )
        return Request(
            stacks=stack_inputs(p),
            settings=engine_values(p),
            output_volume=p.outputVolume,
            gaussians_model=p.gaussiansModel,
            output_folder=output_folder(p.saveToFolder, p.outputFolder),
            glyphs=glyph_style(p),
            init_gaussians=init_gaussians,
            roi=p.roi,
        )

    def start(self, request: Request) -> ReconstructionSession:
        """Export the inputs and start the worker; returns the session (poll it, or ``wait()`` on it)."""
        if self.running:
            raise RuntimeError("A reconstruction is already running.")
        work_dir = self.folder / time.strftime("run-%Y%m%d-%H%M%S")
        first_stack = request.stacks[0].volume if request.stacks else None
        run = ReconstructionSession(
            self.scene,
            request,
            work_dir,
            python=self.python,
            env=self.env,
            render_blocker=self.render_blocker,
            on_first_preview=None
            if self.show_result is None
            else lambda volume: self.show_result(volume, first_stack),
        )
        try:
            run.start()
        except BaseException:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise
        self.session = run  # the previous one is kept until here: its Gaussians can still be restyled
        return run

    def cancel(self) -> None:
        if self.session is not None:
            self.session.cancel()

    def stop(self) -> None:
        """End a running worker now (the scene or Slicer is closing) and remove its work folder."""
        if self.session is not None and self.running:
            self.session.stop()
            shutil.rmtree(self.session.work_dir, ignore_errors=True)

    def keep_results(self) -> dict[str, Path]:
        """Keep what outlives the finished run's work folder: the Gaussians to continue from and the QC
        picture. Returns the kept paths by kind."""
        run = self.session
        if run is None or self.running:
            return {}
        sources = {"gaussians": run.continuable_gaussians, "qc": run.qc_picture}
        return {
            kind: copy_atomically(source, self.kept_path(kind)) for kind, source in sources.items() if source
        }

    def start_pip(self, requirement: str) -> WorkerProcess:
        """pip-install ``requirement`` in a separate process (Slicer's own packages pinned), started."""
        self.folder.mkdir(parents=True, exist_ok=True)
        constraints = self.folder / "constraints.txt"
        constraints.write_text(deps.constraints_text(deps.probe().protected), encoding="utf-8")
        worker = WorkerProcess([*self.python, *deps.pip_install_arguments(requirement, str(constraints))])
        worker.start()
        return worker
