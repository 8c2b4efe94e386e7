"""The pipeline: read -> initialize -> optimize -> export."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__
from .devices import choose_device
from .errors import InputError
from .export.qc import write_qc_png
from .export.report import build_report
from .fit.bias import correct_bias
from .fit.initialize import (
    in_plane_gradient,
    initial_intensity_gain,
    initial_scales,
    reference_index,
    sample_centres,
)
from .fit.mask_propagation import prepare_masks
from .fit.optimize import Hooks, SliceQuality, optimize
from .fit.prediction import SliceTensors
from .fit.registration import prealign
from .fit.warmstart import warm_start, warm_start_arrays
from .geometry import kabsch, matrix_to_rotvec, set_image_geometry
from .io.gaussians_file import save_gaussians, write_ellipsoids
from .io.outputs import write_image, write_json
from .io.slices import SliceSet, coarsen_slices, extract_slices
from .io.stacks import Stack, read_stacks
from .model import forward
from .model.gaussians import GaussianField, transform_state
from .model.motion import SliceMotion, compose_rigid
from .model.neighbours import knn
from .model.volume import check_grid_fits, grid_covering, render
from .settings import Settings

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Preview volumes are rendered this much coarser than the output (but never finer than it).
PREVIEW_COARSENING = 2.0
PREVIEW_GLYPHS = 3000
#: Bounds of the automatic Gaussian count.
MIN_GAUSSIANS = 500
MAX_GAUSSIANS = 200_000

Events = Callable[..., None]
#: A rigid map (R (3, 3), b (3,)) from the anatomy frame to the output frame (see gauge).
Frame = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Outputs:
    """Where results go; None skips an output. gaussians: the .npz and .vtp share its stem."""

    volume: str | None = None
    gaussians: str | None = None
    report: str | None = None
    preview_dir: str | None = None
    qc: str | None = None

    def gaussian_paths(self) -> tuple[str, str] | None:
        if self.gaussians is None:
            return None
        stem = Path(self.gaussians)
        stem = stem.with_suffix("") if stem.suffix in (".npz", ".vtp") else stem
        return str(stem.with_suffix(".npz")), str(stem.with_suffix(".vtp"))


@dataclass
class Reconstruction:
    """What a run produced: the volume, the Gaussians (world), the report and the slice quality.

    A cancelled run has no volume; its paths point at the last preview, if any.
    """

    volume: sitk.Image | None
    gaussians: dict[str, np.ndarray]
    report: dict[str, Any]
    quality: SliceQuality
    cancelled: bool = False
    paths: dict[str, str | None] = field(default_factory=dict)


def writable(folder: Path) -> bool:
    """Whether a file can be created in the folder: tried, since os.access is wrong for root, read-only
    file systems and ACLs."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_outputs(outputs: Outputs) -> None:
    """Refuse unusable output paths before any work: wrong extension, missing or read-only folder."""
    if outputs.volume is not None and not outputs.volume.lower().endswith(IMAGE_EXTENSIONS):
        raise InputError(outputs.volume, f"output volume must end with one of {', '.join(IMAGE_EXTENSIONS)}")
    if outputs.qc is not None and not outputs.qc.lower().endswith(".png"):
        raise InputError(outputs.qc, "the quality-control image must end with .png")
    paths = [outputs.volume, outputs.report, outputs.qc] + list(outputs.gaussian_paths() or [])
    for path in filter(None, paths):
        folder = Path(path).resolve().parent
        if not folder.is_dir():
            raise InputError(path, "output folder does not exist")
        if not writable(folder):
            raise InputError(path, "output folder is not writable")
    if outputs.preview_dir is not None:
        preview = Path(outputs.preview_dir)
        if preview.exists() and not (preview.is_dir() and writable(preview)):
            raise InputError(preview, "preview folder is not a writable folder")
        if not preview.exists() and not writable(preview.resolve().parent):
            raise InputError(preview, "preview folder cannot be created")


@dataclass
class Problem:
    """Everything the optimizer needs, prepared from the stacks."""

    stacks: list[Stack]
    slices: SliceSet
    reference: int
    intensity_norm: float
    grid_affine: np.ndarray
    grid_shape: tuple[int, int, int]
    n_gaussians: int


def prepare(stacks: list[Stack], settings: Settings, volume_path: str | None) -> Problem:
    """Slices, reference stack, intensity normalization and the output grid (checked for size)."""
    slices = extract_slices(stacks, settings.in_plane_fwhm)
    if settings.reference_stack is not None and not 0 <= settings.reference_stack < len(stacks):
        raise InputError(None, f"reference stack {settings.reference_stack} does not exist")
    reference = reference_index(stacks) if settings.reference_stack is None else settings.reference_stack
    positive = slices.values[slices.values > 0]
    norm = float(np.median(positive)) if len(positive) else 1.0
    affine, shape = grid_covering(slices.positions, stacks[reference].direction, settings.output_resolution)
    check_grid_fits(shape, settings.output_resolution, volume_path)
    n_gaussians = settings.n_gaussians or automatic_gaussian_count(
        stacks[reference], settings.gaussians_per_ml
    )
    return Problem(stacks, slices, reference, norm, affine, shape, n_gaussians)


def automatic_gaussian_count(stack: Stack, per_ml: float) -> int:
    """Gaussians for the brain volume of a stack's mask (ml), within [MIN_GAUSSIANS, MAX_GAUSSIANS]."""
    millilitres = float(stack.mask.sum()) * float(np.prod(stack.spacing)) / 1000.0
    return int(np.clip(round(per_ml * millilitres), MIN_GAUSSIANS, MAX_GAUSSIANS))


def initial_models(
    problem: Problem, settings: Settings, device: torch.device
) -> tuple[GaussianField, SliceMotion]:
    """Pre-aligned slice motion and content-adaptive Gaussians, in the reference stack's frame."""
    if settings.init_gaussians:
        return warm_start(
            settings.init_gaussians,
            problem.stacks,
            problem.slices,
            problem.reference,
            problem.intensity_norm,
            settings.seed,
            device,
        )
    slices = problem.slices
    rng = np.random.default_rng(settings.seed)
    if settings.prealign and len(problem.stacks) > 1:
        rotvec, translation = prealign(problem.stacks, slices, problem.reference, settings.seed)
    else:
        rotvec = np.zeros((slices.n_slices, 3))
        translation = np.zeros((slices.n_slices, 3))

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32, device=device)

    motion = SliceMotion(tensor(slices.slice_centre), tensor(rotvec), tensor(translation))
    thickness = np.array([problem.stacks[s].thickness for s in slices.slice_stack])
    gradient = in_plane_gradient(problem.stacks, slices)
    chosen, nominal = sample_centres(
        slices, gradient, problem.n_gaussians, settings.edge_fraction, thickness, rng
    )
    with torch.no_grad():
        slice_id = torch.as_tensor(slices.pixel_slice[chosen], device=device)
        centres = motion.move(tensor(nominal), slice_id, motion.rotations())
    scales = initial_scales(centres.cpu().numpy().astype(np.float64))
    values = tensor(slices.values[chosen] / problem.intensity_norm)
    field_ = GaussianField(centres, tensor(scales)[:, None].repeat(1, 3), values)
    with torch.no_grad():
        means, cov6, det, intensities = field_.packed()
        neighbours = knn(means, means, min(settings.k_neighbours, field_.n), settings.neighbour_backend)
        mixture = forward.evaluate(means, neighbours, means, cov6, det, intensities, None, "none")
        if settings.psf_mode != "normalized":
            # A normalized field predicts the weighted mean of its intensities: no overlap to undo.
            field_.intensities.mul_(initial_intensity_gain(values, mixture))
    return field_, motion


def gauge(problem: Problem, motion: SliceMotion) -> Frame:
    """The rigid map (R (3, 3), b (3,)) that takes the anatomy frame back onto the reference stack.

    The global frame of a reconstruction is arbitrary (volume and all slices can move together);
    fixing it so that the reference stack's slices sit, on average, where its header puts them
    makes the output overlay the input stacks.
    """
    slices = problem.slices
    on_reference = np.nonzero(slices.slice_stack[slices.pixel_slice] == problem.reference)[0]
    sample = on_reference[:: max(1, len(on_reference) // 20000)]
    device = motion.centres.device
    with torch.no_grad():
        nominal = torch.as_tensor(slices.positions[sample], dtype=torch.float32, device=device)
        slice_id = torch.as_tensor(slices.pixel_slice[sample], device=device)
        moved = motion.move(nominal, slice_id, motion.rotations())
    rotation, offset = kabsch(
        moved.cpu().numpy().astype(np.float64), nominal.cpu().numpy().astype(np.float64)
    )
    return (
        torch.as_tensor(rotation, dtype=torch.float32, device=device),
        torch.as_tensor(offset, dtype=torch.float32, device=device),
    )


def world_gaussians(
    problem: Problem, field_: GaussianField, motion: SliceMotion, frame: Frame
) -> dict[str, torch.Tensor]:
    """The Gaussians in the output frame and in input intensity units."""
    rotation, offset = frame
    state = transform_state(field_.state(), rotation, offset)
    reference_scale = motion.intensity_scale().detach()[
        torch.as_tensor(problem.slices.slice_stack == problem.reference)
    ]
    state["intensities"] = state["intensities"] * problem.intensity_norm * reference_scale.median()
    return state


def world_motion(motion: SliceMotion, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    """Slice rotation vectors (M, 3) and translations (M, 3) in the output frame."""
    rotation, offset = frame
    with torch.no_grad():
        rotations, translation = compose_rigid(
            rotation, offset, motion.rotations(), motion.translation, motion.centres
        )
    return matrix_to_rotvec(rotations.cpu().numpy().astype(np.float64)), translation.cpu().numpy()


def volume_image(
    state: dict[str, torch.Tensor], affine: np.ndarray, shape: tuple[int, int, int], settings: Settings
) -> sitk.Image:
    array = render(
        state["means"],
        state["covariances"],
        state["intensities"],
        affine,
        shape,
        settings.k_neighbours,
        settings.neighbour_backend,
        normalized=settings.psf_mode == "normalized",
    )
    return set_image_geometry(sitk.GetImageFromArray(np.clip(array, 0, None)), affine)


def preview_grid(problem: Problem, settings: Settings) -> tuple[np.ndarray, tuple[int, int, int]]:
    factor = PREVIEW_COARSENING
    affine = problem.grid_affine.copy()
    affine[:3, :3] *= factor
    shape = tuple(int(np.ceil(n / factor)) for n in problem.grid_shape)
    return affine, shape  # type: ignore[return-value]


def write_gaussians(
    state: dict[str, torch.Tensor], npz: str, vtp: str, max_glyphs: int, **extra: np.ndarray
) -> None:
    arrays = {key: value.detach().cpu().numpy() for key, value in state.items()}
    save_gaussians(npz, arrays["means"], arrays["covariances"], arrays["intensities"], **extra)
    write_ellipsoids(vtp, arrays["means"], arrays["covariances"], arrays["intensities"], max_count=max_glyphs)


def reconstruct(
    stack_paths: list[str],
    mask_paths: list[str] | None = None,
    thicknesses: list[float] | None = None,
    settings: Settings | None = None,
    outputs: Outputs | None = None,
    events: Events | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Reconstruction:
    """Reconstruct one volume from stacks; writes the requested outputs and returns the results.

    events(kind, **fields) receives the protocol messages of progress.py ("started", "progress",
    "checkpoint"); should_stop() is polled between iterations and ends the run early (a cancel),
    keeping the last preview and writing no final output.
    """
    settings = settings or Settings()
    if settings.init_gaussians:
        # A continued run is past the coarse stage: a half-resolution pass would only blur it.
        settings = settings.updated(coarse_to_fine=False)
    outputs = outputs or Outputs()
    emit = events or (lambda kind, **fields: None)
    timings: dict[str, float] = {}
    started = time.monotonic()
    check_outputs(outputs)
    device = choose_device(settings.device)
    torch.manual_seed(settings.seed)

    stacks = prepare_masks(
        read_stacks(stack_paths, mask_paths, thicknesses), settings.mask_dilation_mm, settings.seed
    )
    if settings.bias_correction == "n4":
        stacks = [correct_bias(stack) for stack in stacks]
    problem = prepare(stacks, settings, outputs.volume)
    timings["read_s"] = time.monotonic() - started

    mark = time.monotonic()
    field_, motion = initial_models(problem, settings, device)
    timings["initialize_s"] = time.monotonic() - mark
    stages = {"fine": SliceTensors.from_slices(problem.slices, problem.intensity_norm, device)}
    if settings.coarse_to_fine:
        coarse = coarsen_slices(problem.slices, stacks, 2)
        stages["coarse"] = SliceTensors.from_slices(coarse, problem.intensity_norm, device)
    emit(
        "started",
        device=str(device),
        n_stacks=len(stacks),
        n_slices=problem.slices.n_slices,
        n_pixels=problem.slices.n_pixels,
        n_gaussians=field_.n,
        total=settings.iterations,
    )

    preview_paths: dict[str, str] = {}
    last_checkpoint = [time.monotonic()]

    def checkpoint(step: int, force: bool = False) -> None:
        if outputs.preview_dir is None:
            return
        if not force and time.monotonic() - last_checkpoint[0] < settings.checkpoint_interval_s:
            return
        folder = Path(outputs.preview_dir)
        folder.mkdir(parents=True, exist_ok=True)
        frame = gauge(problem, motion)
        state = world_gaussians(problem, field_, motion, frame)
        scale = motion.intensity_scale().detach().cpu().numpy()
        continuation = warm_start_arrays(
            problem.stacks, problem.slices, problem.reference, *world_motion(motion, frame), scale
        )
        affine, shape = preview_grid(problem, settings)
        paths = {
            "volume": str(folder / "preview.nii.gz"),
            "gaussians": str(folder / "preview_gaussians.npz"),
            "ellipsoids": str(folder / "preview_gaussians.vtp"),
        }
        write_image(volume_image(state, affine, shape, settings), paths["volume"])
        write_gaussians(state, paths["gaussians"], paths["ellipsoids"], PREVIEW_GLYPHS, **continuation)
        preview_paths.update(paths)
        emit("checkpoint", iter=step, **paths)
        last_checkpoint[0] = time.monotonic()

    def progress(step: int, total: int, loss: float, stage: str, eta: float) -> None:
        emit(
            "progress",
            iter=step,
            total=total,
            loss=loss,
            eta_s=round(eta, 1),
            elapsed_s=round(time.monotonic() - started, 1),
            stage=stage,
        )

    stop = should_stop or (lambda: False)
    mark = time.monotonic()
    quality = optimize(
        field_,
        motion,
        stages,
        problem.slices.slice_stack,
        settings,
        Hooks(progress=progress, checkpoint=checkpoint, should_stop=stop),
    )
    timings["optimize_s"] = time.monotonic() - mark
    cancelled = stop()
    if cancelled:
        checkpoint(-1, force=True)

    mark = time.monotonic()
    frame = gauge(problem, motion)
    state = world_gaussians(problem, field_, motion, frame)
    image = None if cancelled else volume_image(state, problem.grid_affine, problem.grid_shape, settings)
    timings["render_s"] = time.monotonic() - mark
    rotvec, translation = world_motion(motion, frame)
    scale = motion.intensity_scale().detach().cpu().numpy()
    timings["total_s"] = time.monotonic() - started
    report = build_report(
        version=__version__,
        settings=settings,
        device=str(device),
        stacks=stacks,
        slices=problem.slices,
        reference=problem.reference,
        n_gaussians=field_.n,
        rotvec=rotvec,
        translation=translation,
        scale=scale,
        quality=quality,
        timings=timings,
        cancelled=cancelled,
    )
    paths: dict[str, str | None] = {
        "volume": None,
        "gaussians": None,
        "ellipsoids": None,
        "report": None,
        "qc": None,
    }
    if not cancelled:
        if outputs.volume is not None:
            write_image(image, outputs.volume)
            paths["volume"] = outputs.volume
        gaussian_paths = outputs.gaussian_paths()
        if gaussian_paths is not None:
            write_gaussians(
                state,
                *gaussian_paths,
                max_glyphs=5000,
                **warm_start_arrays(stacks, problem.slices, problem.reference, rotvec, translation, scale),
            )
            paths["gaussians"], paths["ellipsoids"] = gaussian_paths
        if outputs.qc is not None and quality.predicted is not None:
            predicted = quality.predicted * problem.intensity_norm
            write_qc_png(outputs.qc, report, stacks, problem.slices, predicted)
            paths["qc"] = outputs.qc
        report["outputs"] = dict(paths)
        if outputs.report is not None:
            write_json(report, outputs.report)
            paths["report"] = outputs.report
    else:
        paths.update({key: preview_paths.get(key) for key in ("volume", "gaussians", "ellipsoids")})
    arrays = {key: value.detach().cpu().numpy() for key, value in state.items()}
    return Reconstruction(image, arrays, report, quality, cancelled, paths)
