"""One reconstruction as seen from the scene: export the inputs, run the worker, show its checkpoints
in the same nodes, load the results, and undo the scene changes if the worker fails.

Call ``poll()`` regularly on the main thread (the widget's timer, or ``wait()`` in scripts and the
self-test); nothing here runs MRML code on another thread. Slicer-specific presentation (pausing the
renderer, choosing what the slice views show) comes in as callables, so the session runs with the
``slicer-core`` wheel as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import command, engine_path, nodes
from .inputs import InputProblem, StackInput, export_roi, export_stacks
from .run_state import WITH_RESULT, Outcome, RunState, Throttle
from .runner import DEFAULT_GRACE_S, EventKind, WorkerEvent, WorkerProcess

log = logging.getLogger(__name__)
#: The worker's lines go to Python logging under this name too (Slicer's application log).
worker_log = logging.getLogger("GaussianSVR.worker")

#: Checkpoints are shown at most this often (seconds); the final result always is.
PREVIEW_INTERVAL_S = 2.0


@dataclass
class GlyphStyle:
    """How the Gaussians are drawn: ellipsoid size in standard deviations, how many, shown or not."""

    scale: float = 1.0
    max_count: int = 2000
    visible: bool = True


@dataclass
class Request:
    """Everything one run needs from the scene and the user."""

    stacks: Sequence[StackInput]
    settings: Mapping[str, object]
    output_volume: Any = None  # an existing scalar volume node, or None for a new one
    gaussians_model: Any = None  # an existing model node, or None for a new one
    output_name: str = "GaussianSVR reconstruction"
    output_folder: Path | None = None
    glyphs: GlyphStyle = field(default_factory=GlyphStyle)
    init_gaussians: Path | None = None  # an earlier run's Gaussians (.npz) to continue from
    roi: Any = None  # a markups ROI node around the brain: the mask of the stacks without one


class ReconstructionSession:
    """One run. ``start()`` once, then ``poll()`` until ``finished``; ``cancel()`` any time.

    work_dir: an empty folder for the exported inputs, previews and (without output_folder) outputs;
    python: the interpreter command for the worker; env: the worker's base environment;
    render_blocker: a context manager factory that pauses rendering during scene updates;
    on_first_preview: called with the output volume node the first time it holds voxels.
    """

    def __init__(
        self,
        scene,
        request: Request,
        work_dir: Path,
        python: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        render_blocker: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        on_first_preview: Callable[[Any], None] | None = None,
        preview_interval_s: float = PREVIEW_INTERVAL_S,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        self.scene = scene
        self.request = request
        self.work_dir = Path(work_dir)
        self.python = list(python) if python is not None else command.python_command()
        self.env = dict(os.environ if env is None else env)
        self.render_blocker = render_blocker
        self.on_first_preview = on_first_preview
        self.grace_s = grace_s
        self.state = RunState()
        self.throttle = Throttle(preview_interval_s)
        self.changes = nodes.SceneChanges(scene)
        self.output_volume = request.output_volume
        self.gaussians_model = request.gaussians_model
        self.report: dict[str, Any] | None = None
        self.files: command.RunFiles | None = None
        self.worker: WorkerProcess | None = None
        self._gaussians: nodes.Gaussians | None = None
        self._shown_checkpoint: dict[str, Any] | None = None
        self._finalized = False
        self.previews_shown = 0

    # -- running ------------------------------------------------------------------------------

    def start(self) -> None:
        """Export the inputs and start the worker. Raises InputProblem for inputs the user must fix."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        roi = self.request.roi
        stack_files = export_stacks(self.request.stacks, self.work_dir)
        roi_file = export_roi(roi, self.work_dir) if roi is not None else None
        output_dir = self.request.output_folder or self.work_dir
        self.files = command.RunFiles.in_folders(
            Path(output_dir), self.work_dir, command.safe_file_name(self._output_name())
        )
        self.files.preview_dir.mkdir(parents=True, exist_ok=True)
        args = command.reconstruct_command(
            self.python, stack_files, self.files, self.request.settings, self.request.init_gaussians, roi_file
        )
        engine_dir = engine_path.find_engine_dir()
        log.info("GaussianSVR worker: %s", " ".join(args))
        self.worker = WorkerProcess(
            args,
            env=command.worker_environment(self.env, engine_dir),
            cwd=self.work_dir,
            stop_file=self.files.stop_file,
            grace_s=self.grace_s,
        )
        self.worker.start()

    @property
    def finished(self) -> bool:
        return self._finalized

    def poll(self) -> RunState:
        """Handle the worker's new events; show a checkpoint if one is due; finish once it has exited."""
        if self.worker is None or self._finalized:
            return self.state
        for event in self.worker.poll():
            self.state.handle(event)
            log_event(event)
        if self.state.protocol_error is not None and not self.state.cancel_requested:
            self.cancel()  # a worker from another version: its files cannot be trusted either
        if self.state.finished:
            self._finalize()
        elif self.state.checkpoint is not None and self.throttle.ready():
            self._show_checkpoint(self.state.checkpoint)
        return self.state

    def wait(self, timeout_s: float | None = None, interval_s: float = 0.1, process_events=None) -> RunState:
        """Poll until the run finishes (or ``timeout_s`` passes); ``process_events`` keeps a GUI alive."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._finalized and (deadline is None or time.monotonic() < deadline):
            self.poll()
            if process_events is not None:
                process_events()
            time.sleep(interval_s)
        return self.state

    def cancel(self) -> None:
        """Ask the worker to stop; it writes a last checkpoint, which is kept. Returns at once."""
        if self.worker is not None and not self._finalized:
            self.state.cancel_requested = True
            self.worker.cancel()

    def clean_up(self) -> Path | None:
        """Remove the work folder of a finished run, unless the run failed: then it is kept for a
        diagnosis (the exported inputs and the engine's files) and returned."""
        if not self._finalized:
            return None
        if self.state.outcome in (Outcome.FAILED, Outcome.BAD_INPUT):
            return self.work_dir
        shutil.rmtree(self.work_dir, ignore_errors=True)
        return None

    def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel and end the worker now (scene or application closing); the scene is not touched."""
        if self.worker is not None and not self._finalized:
            self.state.cancel_requested = True
            self.worker.stop(timeout_s)
            for event in self.worker.poll():
                self.state.handle(event)
            self._finalized = True

    @property
    def continuable_gaussians(self) -> Path | None:
        """The Gaussians (.npz) a later run can continue from: the result of a finished run, or the
        last checkpoint of a cancelled one; None if this run left none."""
        source = None
        if self.state.outcome in WITH_RESULT and self.files is not None:
            source = self.files.gaussians_npz
        elif self.state.outcome is Outcome.CANCELLED and self.state.checkpoint is not None:
            source = Path(self.state.checkpoint.get("gaussians") or "")
        return source if source is not None and source.is_file() else None

    @property
    def qc_picture(self) -> Path | None:
        """The QC picture of a finished run, if the engine wrote one."""
        path = self.state.done.get("qc") if self.state.outcome in WITH_RESULT else None
        return Path(path) if path and Path(path).is_file() else None

    # -- scene updates --------------------------------------------------------------------------

    def restyle_gaussians(self, style: GlyphStyle) -> None:
        """Redraw the ellipsoids with a new scale, count or visibility (from the last Gaussians shown)."""
        self.request.glyphs = style
        if self.gaussians_model is not None and self.scene.IsNodePresent(self.gaussians_model):
            nodes.set_model_visibility(self.gaussians_model, style.visible)
            if self._gaussians is not None and style.visible:
                with self.render_blocker():
                    nodes.update_model_node(
                        self.gaussians_model,
                        nodes.ellipsoid_polydata(self._gaussians, style.scale, style.max_count),
                    )

    def _output_name(self) -> str:
        node = self.request.output_volume
        return node.GetName() if node is not None else self.request.output_name

    def _show_checkpoint(self, message: Mapping[str, Any]) -> None:
        if message is self._shown_checkpoint:
            return
        self.throttle.mark()
        try:
            self._show_files(message.get("volume"), message.get("gaussians"))
        except (OSError, RuntimeError, ValueError) as error:
            # A preview is a convenience: a bad one is logged and the run goes on.
            self.state.add_log(f"preview not shown: {error}")
        self._shown_checkpoint = message

    def _show_files(self, volume_path: str | None, gaussians_path: str | None) -> None:
        first = self.previews_shown == 0
        with self.render_blocker():
            if volume_path:
                volume = self._volume_node()
                nodes.load_volume_into(volume, volume_path)
            if gaussians_path and Path(gaussians_path).is_file():
                self._gaussians = nodes.read_gaussians(gaussians_path)
                style = self.request.glyphs
                model = self._model_node()
                nodes.update_model_node(
                    model, nodes.ellipsoid_polydata(self._gaussians, style.scale, style.max_count)
                )
                nodes.set_model_visibility(model, style.visible)
        self.previews_shown += 1
        if first and volume_path and self.on_first_preview is not None:
            self.on_first_preview(self.output_volume)

    def _volume_node(self):
        if self.output_volume is None or not self.scene.IsNodePresent(self.output_volume):
            self.output_volume = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", self._output_name())
            self.changes.created(self.output_volume)
        else:
            self.changes.will_modify(self.output_volume)
        return self.output_volume

    def _model_node(self):
        if self.gaussians_model is None or not self.scene.IsNodePresent(self.gaussians_model):
            self.gaussians_model = self.scene.AddNewNodeByClass(
                "vtkMRMLModelNode", f"{self._output_name()} Gaussians"
            )
            self.changes.created(self.gaussians_model)
        else:
            self.changes.will_modify(self.gaussians_model)
        return self.gaussians_model

    def _align_with_standard_space(self, atlas_to_scanner) -> None:
        """The volume came out in standard space: the stacks, their masks and the ellipsoids (all in
        the scanner's frame) go under one transform that lines them up with it, and the views turn
        to its planes."""
        inputs = [stack.volume for stack in self.request.stacks] + [
            stack.mask for stack in self.request.stacks if stack.mask is not None
        ]
        children = [node for node in [*inputs, self.gaussians_model] if node is not None]
        nodes.place_under_transform(
            self.scene,
            f"{self._output_name()} scanner to standard",
            nodes.scanner_to_standard_ras(atlas_to_scanner),
            children,
        )
        if self.on_first_preview is not None:
            self.on_first_preview(self.output_volume)

    def _finalize(self) -> None:
        self._finalized = True
        if self.state.outcome in WITH_RESULT:
            done = self.state.done
            npz = None if done.get("gaussians") is None else str(Path(done["gaussians"]).with_suffix(".npz"))
            try:
                self._show_files(done.get("volume"), npz)
            except (OSError, RuntimeError, ValueError) as error:
                self.state.error = f"the result could not be loaded: {error}"  # the outcome becomes FAILED
            self.report = _read_report(done.get("report"))
        outcome = self.state.outcome
        if outcome in WITH_RESULT:
            if self.report is not None and "standard_space" in self.report:
                self._align_with_standard_space(self.report["standard_space"]["atlas_to_scanner"])
            return
        if outcome is Outcome.CANCELLED:
            if self.state.checkpoint is not None and self.state.checkpoint is not self._shown_checkpoint:
                self._show_checkpoint(self.state.checkpoint)
        else:
            self.changes.rollback()
            self.output_volume = self.request.output_volume
            self.gaussians_model = self.request.gaussians_model


def log_event(event: WorkerEvent) -> None:
    """Pass a worker event on to Python logging: log lines as info, errors as errors."""
    if event.kind is EventKind.LOG:
        worker_log.info("%s", event.text)
    elif event.kind is EventKind.PROTOCOL_ERROR:
        worker_log.error("%s", event.text)
    elif event.kind is EventKind.MESSAGE and event.message.get("type") == "error":
        worker_log.error("%s", event.message.get("message"))
    elif event.kind is EventKind.EXITED and event.returncode:
        worker_log.warning("the engine exited with code %s", event.returncode)


def output_folder(save: bool, folder: str | Path | None) -> Path | None:
    """The folder a run also saves its outputs to (None: not asked for); InputProblem for a folder that
    is not chosen or does not exist (an empty choice would otherwise mean the temporary work folder)."""
    if not save:
        return None
    text = str(folder or "").strip()
    if text in ("", "."):
        raise InputProblem(
            "Also save to folder is ticked, but no folder is chosen: choose one, or untick it."
        )
    path = Path(text).expanduser()
    if not path.is_absolute() or not path.is_dir():
        raise InputProblem(f"The output folder {path} does not exist.")
    return path


def copy_atomically(source: Path, destination: Path) -> Path:
    """Copy source over destination through a temporary name (a reader never sees half a file)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.tmp")
    shutil.copyfile(source, temporary)
    os.replace(temporary, destination)
    return destination


def _read_report(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
