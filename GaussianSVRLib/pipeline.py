"""The pipeline: read -> initialize -> optimize -> export, one call per step (``reconstruct``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import __version__
from .brain_search import find_brain
from .devices import choose_device, use_cpu_threads
from .errors import Cancelled
from .export.checkpoints import Previews
from .export.frame import Snapshot, snapshot, volume_image
from .export.paths import OUTPUT_KINDS, Outputs
from .export.report import build_report
from .export.results import Reconstruction, write_results
from .export.standard_space import in_standard_space
from .export.support import StackSlices, carried_stacks
from .fit.atlas_poses import RESTART_AGREEMENT
from .fit.bias import correct_bias
from .fit.initialize import Problem, atlas_posed_motion, data_stages, initial_models, prepare
from .fit.mask_propagation import has_mask, prepare_masks
from .fit.optimize import Hooks, optimize
from .fit.prediction import SliceTensors
from .fit.quality import SliceQuality, stack_agreements
from .fit.refit import needs_refit, refit, worst
from .io.roi import Box
from .io.stacks import Stack, normalized_intensities, read_stacks
from .model.gaussians import GaussianField
from .model.motion import SliceMotion
from .preflight import preflight
from .settings import Settings
from .timing import PROFILE

__all__ = ["Outputs", "Reconstruction", "reconstruct"]

log = logging.getLogger(__name__)

Events = Callable[..., None]


class Run:
    """What every step of a run shares: the protocol events, the stop check, timings and warnings."""

    def __init__(self, events: Events | None, should_stop: Callable[[], bool] | None) -> None:
        self.emit = events or (lambda kind, **fields: None)
        self.should_stop = should_stop or (lambda: False)
        self.started = time.monotonic()
        self.timings: dict[str, float] = {}
        self.warnings: list[str] = []
        self.cpu_threads = 0
        #: What the brain search found, for a run given neither masks nor a box.
        self.brain_search: dict | None = None

    def warn(self, text: str) -> None:
        log.warning("%s", text)
        self.warnings.append(text)

    def check(self) -> None:
        """Raise Cancelled when the run was asked to stop."""
        if self.should_stop():
            raise Cancelled

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        mark = time.monotonic()
        yield
        self.timings[f"{name}_s"] = self.timings.get(f"{name}_s", 0.0) + time.monotonic() - mark
        self.check()

    def hooks(self, stage: str) -> Hooks:
        """The optimizer's hooks for a fit before the run's own (its progress under ``stage``)."""

        def progress(step: int, total: int, loss: float, _: str, eta: float) -> None:
            self.progress(step, total, loss, stage, eta)

        return Hooks(progress=progress, should_stop=self.should_stop)

    def progress(self, step: int, total: int, loss: float, stage: str, eta: float) -> None:
        elapsed = round(time.monotonic() - self.started, 1)
        self.emit(
            "progress", iter=step, total=total, loss=loss, eta_s=round(eta, 1), elapsed_s=elapsed, stage=stage
        )


@dataclass
class Fit:
    """A run from its initialization on: the problem, the models being fitted, their previews."""

    problem: Problem
    field: GaussianField
    motion: SliceMotion
    previews: Previews
    quality: SliceQuality | None = None

    def hooks(self, run: Run) -> Hooks:
        return Hooks(progress=run.progress, checkpoint=self.previews.maybe, should_stop=run.should_stop)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.field.parameters(), *self.motion.parameters()]

    def replace_models(self, field_: GaussianField, motion: SliceMotion) -> None:
        """New values for the models, in place: the previews keep drawing the same objects."""
        self.restore([p.detach() for p in (*field_.parameters(), *motion.parameters())])

    def restore(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for parameter, value in zip(self.parameters(), values, strict=True):
                parameter.copy_(value)

    def round_hooks(self, run: Run, iterations: int) -> Callable[[int], Hooks]:
        """Hooks for refit round r (see fit/refit.py): its steps counted on from the rounds before, under
        the stage "refit"."""

        def hooks(r: int) -> Hooks:
            offset = r * iterations

            def progress(step: int, total: int, loss: float, _: str, eta: float) -> None:
                run.progress(offset + step, offset + total, loss, "refit", eta)

            def checkpoint(step: int) -> None:
                self.previews.maybe(offset + step)

            return Hooks(progress=progress, checkpoint=checkpoint, should_stop=run.should_stop)

        return hooks


def read_problem(
    stack_paths: Sequence[str],
    mask_paths: Sequence[str | None] | None,
    thicknesses: Sequence[float] | None,
    settings: Settings,
    volume_path: str | None,
    run: Run,
    device: torch.device,
    stacks: list[Stack] | None = None,
    roi: Box | None = None,
) -> Problem:
    """Stacks read and checked (unless given: read already by read_stacks from the same paths), masked
    (given, the box ``roi``, propagated, or, with neither masks nor box, found by the brain search),
    bias-corrected and normalized."""
    if stacks is None:
        stacks = read_stacks(
            list(stack_paths), list(mask_paths) if mask_paths else None, list(thicknesses or [])
        )
    run.check()
    if roi is None and not any(has_mask(stack) for stack in stacks):
        with run.stage("brain_search"):
            stacks, run.brain_search = find_brain(stacks, settings, device, run.hooks("brain search"))
        found_ml = run.brain_search["brain_volume_ml"]
        run.warn(
            f"no brain mask given: the brain was found automatically ({found_ml:.0f} ml); check its masks "
            "(--output-masks), or give masks or a box if they are wrong"
        )
    else:
        stacks = prepare_masks(stacks, settings.mask_dilation_mm, settings.seed, roi)
    # Normalized before N4 too, so that the correction sees the same numbers whatever the file's units.
    stacks = [normalized_intensities(stack) for stack in stacks]
    run.check()
    if settings.bias_correction == "n4":
        stacks = [normalized_intensities(correct_bias(stack)) for stack in stacks]
        run.check()
    return prepare(stacks, settings, volume_path)


def start_fit(problem: Problem, settings: Settings, outputs: Outputs, device: torch.device, run: Run) -> Fit:
    """The initial models and their previews; announces the run ("started")."""
    field_, motion = initial_models(problem, settings, device)
    previews = Previews(outputs.preview_dir, problem, settings, (field_, motion), device, run.emit, run.warn)
    slices = problem.slices
    run.emit(
        "started",
        device=str(device),
        n_stacks=len(problem.stacks),
        n_slices=slices.n_slices,
        n_pixels=slices.n_pixels,
        n_gaussians=field_.n,
        total=settings.iterations,
    )
    return Fit(problem, field_, motion, previews)


def refit_rounds(fit: Fit, stages: dict[str, SliceTensors], settings: Settings, run: Run, first: int) -> list:
    """fit/refit.py's rounds on ``fit``, in place, their steps counted on after round ``first``."""
    round_hooks = fit.round_hooks(run, settings.iterations)
    problem = fit.problem
    fit.quality, rounds = refit(
        fit.field, fit.motion, stages["fine"], problem.slices.slice_stack, len(problem.stacks), settings,
        fit.quality, lambda r: round_hooks(first + r), problem.time_pairs,
    )  # fmt: skip
    return rounds


def restart_on_atlas(
    fit: Fit, stages: dict[str, SliceTensors], settings: Settings, device: torch.device, run: Run, first: int
) -> dict | None:
    """After a fit and its refit rounds (``first`` rounds after the first fit) that leave a stack
    agreeing below RESTART_AGREEMENT, the fit once more from the start, from slice poses searched
    against the atlas (fit/atlas_poses.py), with refit rounds of its own; kept where its worst stack
    agrees better. Returns the report's record of it (stack agreements before and after, whether it
    was kept, its refit rounds, seconds), None where it did not run."""
    problem, slice_stack = fit.problem, fit.problem.slices.slice_stack
    before = stack_agreements(fit.quality, slice_stack, len(problem.stacks))
    if not (settings.atlas_prealign and settings.prealign and not settings.init_gaussians):
        return None
    if len(problem.stacks) < 2 or not needs_refit(before, settings.iterations, RESTART_AGREEMENT):
        return None
    started = time.monotonic()
    posed = atlas_posed_motion(problem, settings, device)
    if posed is None:
        return None
    saved = [parameter.detach().clone() for parameter in fit.parameters()]
    saved_quality = fit.quality
    fit.replace_models(*initial_models(problem, settings, device, posed))
    fit.quality = optimize(
        fit.field, fit.motion, stages, slice_stack, settings,
        fit.round_hooks(run, settings.iterations)(first + 1), problem.time_pairs,
    )  # fmt: skip
    rounds = refit_rounds(fit, stages, settings, run, first + 1)
    after = stack_agreements(fit.quality, slice_stack, len(problem.stacks))
    kept = (worst(after) or 0.0) > (worst(before) or 0.0)
    log.info("restart from slice poses on the atlas: worst stack agreement %s -> %s (%s)",
             worst(before), worst(after), "kept" if kept else "dropped")  # fmt: skip
    if not kept:
        fit.restore(saved)
        fit.quality = saved_quality
    return {"agreements_before": before, "agreements_after": after, "kept": kept,
            "refit_rounds": [round_.as_dict() for round_ in rounds],
            "seconds": round(time.monotonic() - started, 1)}  # fmt: skip


def output_brain(
    problem: Problem, state: Snapshot, quality: SliceQuality, settings: Settings
) -> list[StackSlices] | None:
    """The stacks, their kept slices carried into the output frame, whose agreed brain the volume is
    cut to (export/support.py); None when the settings keep the whole grid."""
    if not settings.cut_to_brain:
        return None
    return carried_stacks(problem.stacks, problem.slices, state.rotvec, state.translation, ~quality.excluded)


def report_of(
    fit: Fit, state: Snapshot, settings: Settings, device: torch.device, run: Run, cancelled: bool
) -> dict:
    run.timings["total_s"] = time.monotonic() - run.started
    run.timings["optimize_profile_s"] = PROFILE.as_dict()
    problem = fit.problem
    return build_report(
        version=__version__,
        settings=settings,
        device=str(device),
        stacks=problem.stacks,
        slices=problem.slices,
        reference=problem.reference,
        n_gaussians=fit.field.n,
        rotvec=state.rotvec,
        translation=state.translation,
        scale=state.scale,
        quality=fit.quality,
        timings=run.timings,
        cancelled=cancelled,
        warnings=run.warnings,
    ) | {"cpu_threads": run.cpu_threads}


def cancelled_run(fit: Fit | None, settings: Settings, device: torch.device, run: Run) -> Reconstruction:
    """A stopped run: no final output; its last preview is written and kept."""
    paths: dict[str, str | None] = dict.fromkeys(OUTPUT_KINDS)
    if fit is None or fit.quality is None:
        run.timings["total_s"] = time.monotonic() - run.started
        report = {
            "gaussiansvr_version": __version__,
            "cancelled": True,
            "timings": run.timings,
            "warnings": run.warnings,
        }
        return Reconstruction(None, {}, report, None, True, paths)
    fit.previews.write(-1)
    state = snapshot(fit.problem, fit.field, fit.motion)
    paths.update(fit.previews.written)
    return Reconstruction(
        None, state.gaussians(), report_of(fit, state, settings, device, run, True), fit.quality, True, paths
    )


def reconstruct(
    stack_paths: Sequence[str],
    mask_paths: Sequence[str | None] | None = None,
    thicknesses: Sequence[float] | None = None,
    settings: Settings | None = None,
    outputs: Outputs | None = None,
    events: Events | None = None,
    should_stop: Callable[[], bool] | None = None,
    stacks: list[Stack] | None = None,
    roi: Box | None = None,
) -> Reconstruction:
    """Reconstruct one volume from stacks; writes the requested outputs and returns the results.

    events(kind, **fields) receives the protocol messages of io/progress.py ("started", "progress",
    "checkpoint"); should_stop() is polled between steps and iterations and ends the run early (a
    cancel): the last preview is kept and no final output is written. Raises InputError (with the
    file or flag at fault) before any work for bad settings, outputs or inputs. ``stacks``: the stacks
    as read_stacks read them from these paths, when the caller has read them already. ``roi``: a box
    around the brain, the mask of every stack that has none.
    """
    settings, outputs, run = settings or Settings(), outputs or Outputs(), Run(events, should_stop)
    if (
        settings.init_gaussians
    ):  # a continued run is past the coarse stage: a half-resolution pass would blur it
        settings = settings.updated(coarse_to_fine=False)
    with preflight(stack_paths, mask_paths, settings, outputs) as warnings:
        for text in warnings:
            run.warn(text)
        device, fit = choose_device(settings.device), None
        run.cpu_threads = use_cpu_threads()
        torch.manual_seed(settings.seed)
        try:
            with run.stage("read"):
                problem = read_problem(
                    stack_paths, mask_paths, thicknesses, settings, outputs.volume, run, device, stacks, roi
                )
            with run.stage("initialize"):
                fit = start_fit(problem, settings, outputs, device, run)
            with run.stage("optimize"):
                stages = data_stages(problem, settings, device)
                fit.quality = optimize(
                    fit.field,
                    fit.motion,
                    stages,
                    problem.slices.slice_stack,
                    settings,
                    fit.hooks(run),
                    problem.time_pairs,
                )
            with run.stage("refit"):
                refits = refit_rounds(fit, stages, settings, run, 0)
            with run.stage("atlas_restart"):
                restart = restart_on_atlas(fit, stages, settings, device, run, len(refits))
            with run.stage("render"):
                restarted = 0 if restart is None else 1 + len(restart["refit_rounds"])
                fit.previews.at_end(settings.iterations * (1 + len(refits) + restarted))
                state = snapshot(problem, fit.field, fit.motion)
                brain = output_brain(problem, state, fit.quality, settings)
                if settings.output_space == "scanner":
                    image = volume_image(
                        state, problem.grid_affine, problem.grid_shape, settings, device, brain
                    )
            space = None
            if settings.output_space == "atlas":
                with run.stage("standard_space"):
                    image, space = in_standard_space(state, problem, settings, device, brain)
                if space.ambiguous:
                    run.warn(
                        f"the orientation in standard space is uncertain: a turned brain fits the atlas "
                        f"almost as well (correlation {space.margin:.3f} lower only); check the volume "
                        "against the scanner frame"
                    )
            report = report_of(fit, state, settings, device, run, cancelled=False)
            if report["verdict"]["status"] == "not_aligned":
                log.warning("%s", report["verdict"]["text"])
            if space is not None:
                report["standard_space"] = space.as_dict()
            if roi is not None:
                report["roi"] = roi.as_dict()
            if run.brain_search is not None:
                report["brain_search"] = run.brain_search
            report["refit_rounds"] = [round_.as_dict() for round_ in refits]
            report["atlas_restart"] = restart
            paths = write_results(outputs, problem, state, image, report, fit.quality, run.check, space)
        except Cancelled:
            return cancelled_run(fit, settings, device, run)
    return Reconstruction(image, state.gaussians(), report, fit.quality, False, paths)
