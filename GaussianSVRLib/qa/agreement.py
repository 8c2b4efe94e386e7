"""How well a stack agrees with a finished reconstruction: its slices against their prediction.

Given the Gaussians of a run (``Reconstruction.gaussians``, or the arrays of a file written by
``export.save_gaussians``: means (N, 3), covariances (N, 3, 3), intensities (N,), LPS mm, in the
output frame) and a Stack, which the run may not have seen (leave-one-stack-out):

1. stack level: the masked stack is registered rigidly (``init.register_rigid``) to the Gaussians
   rendered on a grid; of that start and the stack's header position, the one whose slices agree
   better (median NCC) is kept, so a failed registration cannot make things worse;
2. slice level: every slice's rigid motion and intensity scale are fitted by Adam to the frozen
   Gaussians, with the reconstruction's forward model (exact PSF by default) and slice-motion
   convention (motion.py: x = R (p - c) + c + t, c the slice centre);
3. per slice, the NCC between its observed pixels inside the stack's mask and their prediction; per
   stack, the median over slices.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ..fit.optimize import final_fit, learning_rate_factor
from ..fit.prediction import SliceTensors, neighbour_lists, predict
from ..fit.registration import register_rigid
from ..geometry import rigid_to_slice_motion
from ..io.slices import IN_PLANE_FWHM_FACTOR, coarsen_slices, extract_slices
from ..io.stacks import Stack
from ..model.gaussians import FrozenGaussians
from ..model.motion import SliceMotion
from ..model.psf import to_sym6
from ..model.volume import grid_covering, render

log = logging.getLogger(__name__)

#: Rendered voxels above this fraction of the rendering's 99th percentile (holes filled) form the
#: mask of the reconstruction for the stack-level registration.
RENDER_MASK_FRACTION = 0.1
#: Pixels predicted at once when only predicting (bounds the (batch, K) temporaries).
PREDICT_BATCH = 1 << 17


@dataclass(frozen=True)
class AgreementSettings:
    """How a stack is registered to the Gaussians and compared with them.

    iterations: Adam steps of the slice-level fit (0: stack level only), the first coarse_fraction
    of them on the slices at half resolution in-plane (stacks.coarsen_slices), 4 times cheaper;
    learning rates per step in rad, mm and log-scale units, halved at 50 % and again at 75 % of the
    full-resolution steps; refresh_every: steps between neighbour-list updates; render_resolution:
    voxel size (mm) of the rendering the stack is registered to; register: whether to try the
    stack-level registration at all.
    """

    iterations: int = 100
    k_neighbours: int = 16
    psf_mode: str = "exact"
    in_plane_fwhm: float = IN_PLANE_FWHM_FACTOR
    lr_rotation: float = 5e-3
    lr_translation: float = 5e-2
    lr_scale: float = 1e-2
    refresh_every: int = 20
    coarse_fraction: float = 0.5
    render_resolution: float = 2.0
    register: bool = True
    neighbour_backend: str = "auto"
    seed: int = 0


@dataclass
class Agreement:
    """Per slice (M,) of the stack's slices that have masked pixels, in slice order.

    slice_k: index of the slice in the stack; ncc: NCC of observed against predicted pixels (NaN
    when either is constant); n_pixels: masked pixels; rotvec (M, 3) rad and translation (M, 3) mm:
    the fitted slice motion into the Gaussians' frame; scale: the fitted intensity scale (observed
    over the Gaussians' units, up to one global factor); start: "registered" or "header".
    """

    slice_k: np.ndarray
    ncc: np.ndarray
    n_pixels: np.ndarray
    rotvec: np.ndarray
    translation: np.ndarray
    scale: np.ndarray
    start: str

    @property
    def median_ncc(self) -> float:
        """Median slice NCC of the stack (NaN if no slice has one)."""
        finite = self.ncc[np.isfinite(self.ncc)]
        return float(np.median(finite)) if finite.size else float("nan")


def frozen_gaussians(gaussians: Mapping[str, np.ndarray], device: torch.device) -> FrozenGaussians:
    """The Gaussians on the device, intensities divided by their median magnitude."""
    covariances = np.asarray(gaussians["covariances"], dtype=np.float64)
    intensities = np.asarray(gaussians["intensities"], dtype=np.float64)
    level = float(np.median(np.abs(intensities))) or 1.0

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32, device=device)

    return FrozenGaussians(
        means=tensor(gaussians["means"]),
        cov6=to_sym6(tensor(covariances)),
        det=tensor(np.linalg.det(covariances)),
        intensities=tensor(intensities / level),
    )


def rendered_stack(
    gaussians: Mapping[str, np.ndarray], direction: np.ndarray, settings: AgreementSettings
) -> Stack:
    """The Gaussians rendered (no PSF) on an isotropic grid with the given direction (3, 3), as a Stack
    whose mask is their support (see RENDER_MASK_FRACTION)."""
    means = torch.as_tensor(np.asarray(gaussians["means"]), dtype=torch.float32)
    affine, shape = grid_covering(means.numpy().astype(np.float64), direction, settings.render_resolution)
    volume = render(
        means,
        torch.as_tensor(np.asarray(gaussians["covariances"]), dtype=torch.float32),
        torch.as_tensor(np.asarray(gaussians["intensities"]), dtype=torch.float32),
        affine,
        shape,
        settings.k_neighbours,
        settings.neighbour_backend,
    )
    volume = np.clip(volume, 0.0, None)
    mask = ndimage.binary_fill_holes(volume > RENDER_MASK_FRACTION * np.percentile(volume[volume > 0], 99))
    return Stack("reconstruction", volume, mask, affine, settings.render_resolution)


def stack_level_start(
    gaussians: Mapping[str, np.ndarray], stack: Stack, centres: np.ndarray, settings: AgreementSettings
) -> tuple[np.ndarray, np.ndarray] | None:
    """Slice motions (rotvec (M, 3), translation (M, 3)) that put the stack where its rigid
    registration to the rendered Gaussians puts it, for slice centres (M, 3); None if it failed."""
    fixed = rendered_stack(gaussians, stack.direction, settings)
    try:
        matrix, offset = register_rigid(fixed, stack, settings.seed)
    except RuntimeError as error:
        log.warning("%s: registration to the reconstruction failed (%s)", stack.path, str(error)[:200])
        return None
    return rigid_to_slice_motion(matrix, offset, centres)


def fit_scales(
    field_: FrozenGaussians, motion: SliceMotion, data: SliceTensors, neighbours: torch.Tensor, mode: str
) -> None:
    """Set every slice's intensity scale (in place) so that its predicted pixels sum to its observed ones.

    Done at the start of each stage: a coarse stage's wider PSF reaches past the K nearest Gaussians
    more, so its predictions come out lower, and a scale carried over would start the next stage off.
    """
    with torch.no_grad():
        index = torch.arange(data.n_pixels, device=data.values.device)
        predicted = predict(field_, motion, data, index, neighbours, mode).double()
        observed = torch.zeros(motion.n, dtype=torch.float64, device=data.values.device)
        modelled = torch.zeros_like(observed)
        observed.index_add_(0, data.slice_id, data.values.double())
        modelled.index_add_(0, data.slice_id, predicted)
        ratio = torch.where((observed > 0) & (modelled > 0), observed / modelled.clamp_min(1e-30), 1.0)
        motion.log_scale.add_(torch.log(ratio).to(motion.log_scale.dtype))


def refine_slices(
    field_: FrozenGaussians, motion: SliceMotion, stages: dict[str, SliceTensors], settings: AgreementSettings
) -> None:
    """Fit every slice's motion and intensity scale (in place) to the frozen Gaussians by Adam.

    Full batch. stages: "fine" and optionally "coarse" (run first, for coarse_fraction of the
    steps, at full rate); the fine steps decay as in optimize.learning_rate_factor.
    """
    optimizer = torch.optim.Adam(
        [
            {"params": [motion.rotvec], "lr": settings.lr_rotation},
            {"params": [motion.translation], "lr": settings.lr_translation},
            {"params": [motion.log_scale], "lr": settings.lr_scale},
        ]
    )
    base = [group["lr"] for group in optimizer.param_groups]
    coarse = int(round(settings.iterations * settings.coarse_fraction)) if "coarse" in stages else 0
    for stage, steps in (("coarse", coarse), ("fine", settings.iterations - coarse)):
        if steps == 0:
            continue
        data = stages[stage]
        index = torch.arange(data.n_pixels, device=data.values.device)
        neighbours = None
        for step in range(steps):
            if step % settings.refresh_every == 0:
                neighbours = neighbour_lists(
                    field_, motion, data, settings.k_neighbours, settings.neighbour_backend
                )
            if step == 0:
                fit_scales(field_, motion, data, neighbours, settings.psf_mode)
            factor = learning_rate_factor(step, steps, stage)
            for group, lr in zip(optimizer.param_groups, base, strict=True):
                group["lr"] = lr * factor
            prediction = predict(field_, motion, data, index, neighbours, settings.psf_mode)
            loss = (prediction - data.values).abs().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def slice_ncc(
    field_: FrozenGaussians, motion: SliceMotion, data: SliceTensors, settings: AgreementSettings
) -> np.ndarray:
    """Per slice (M,): NCC of observed against predicted pixels (NaN where either is constant)."""
    neighbours = neighbour_lists(field_, motion, data, settings.k_neighbours, settings.neighbour_backend)
    fit = final_fit(field_, motion, data, neighbours, settings.psf_mode, PREDICT_BATCH)
    return fit.ncc


def stack_agreement(
    gaussians: Mapping[str, np.ndarray],
    stack: Stack,
    settings: AgreementSettings | None = None,
    device: torch.device | str = "cpu",
) -> Agreement:
    """Register the stack's slices to the Gaussians and measure their agreement (module docstring)."""
    settings = settings or AgreementSettings()
    device = torch.device(device)
    torch.manual_seed(settings.seed)
    slices = extract_slices([stack], settings.in_plane_fwhm)
    positive = slices.values[slices.values > 0]
    norm = float(np.median(positive)) if positive.size else 1.0
    data = SliceTensors.from_slices(slices, norm, device)
    field_ = frozen_gaussians(gaussians, device)
    m = slices.n_slices
    starts = {"header": (np.zeros((m, 3)), np.zeros((m, 3)))}
    if settings.register:
        registered = stack_level_start(gaussians, stack, slices.slice_centre, settings)
        if registered is not None:
            starts["registered"] = registered

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32, device=device)

    best: tuple[float, str, SliceMotion] | None = None
    for name, (rotvec, translation) in starts.items():
        motion = SliceMotion(tensor(slices.slice_centre), tensor(rotvec), tensor(translation))
        ncc = slice_ncc(field_, motion, data, settings)
        score = float(np.nanmedian(ncc)) if np.isfinite(ncc).any() else -np.inf
        log.info("%s: %s start, median slice NCC %.3f", stack.path, name, score)
        if best is None or score > best[0]:
            best = (score, name, motion)
    _, start, motion = best
    if settings.iterations > 0:
        stages = {"fine": data}
        if settings.coarse_fraction > 0:
            coarse = coarsen_slices(slices, [stack], 2)
            stages["coarse"] = SliceTensors.from_slices(coarse, norm, device)
        refine_slices(field_, motion, stages, settings)
    ncc = slice_ncc(field_, motion, data, settings)
    return Agreement(
        slice_k=slices.slice_k.copy(),
        ncc=ncc,
        n_pixels=np.bincount(slices.pixel_slice, minlength=m),
        rotvec=motion.rotvec.detach().cpu().numpy().astype(np.float64),
        translation=motion.translation.detach().cpu().numpy().astype(np.float64),
        scale=motion.intensity_scale().detach().cpu().numpy().astype(np.float64),
        start=start,
    )
