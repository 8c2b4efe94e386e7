"""The optimization loop: schedule, pixel batches, neighbour refresh, slice weights, checkpoints."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..model.gaussians import GaussianField
from ..model.motion import SliceMotion
from ..settings import Settings
from ..timing import PROFILE
from .losses import scale_penalty, trajectory_penalty, weighted_l1
from .pose_search import search_poses, slices_to_search
from .prediction import SliceTensors, neighbour_lists, predict
from .quality import MIN_JUDGED_PIXELS, SliceQuality, robust_weights

#: Fractions of the schedule at which badly fitting slices get a multi-start pose search (see
#: pose_search.py), through the coarse stage and the fine stage until the learning rate decays; six
#: searches recovered more slices than three at large motion (docs/benchmarks.md).
POSE_SEARCH_AT = (0.15, 0.25, 0.35, 0.45, 0.55, 0.65)


#: Loss weight of an excluded slice: not zero, so that its motion gradient can be restored (see
#: unweight_motion_gradients) while its pull on the Gaussians is negligible.
EXCLUDED_LOSS_WEIGHT = 1e-3


log = logging.getLogger(__name__)


@dataclass
class Hooks:
    """How the loop talks to its caller; every hook is optional."""

    progress: Callable[[int, int, float, str, float], None] | None = None
    checkpoint: Callable[[int], None] | None = None
    should_stop: Callable[[], bool] | None = None


def pixels_per_slice(data: SliceTensors, m: int) -> np.ndarray:
    """Number of pixels (M,) of every slice."""
    return torch.bincount(data.slice_id, minlength=m).cpu().numpy()


@dataclass
class SliceFit:
    """The final pass: per slice (M,) relative L1 residual, NCC and level (observed over predicted
    mean, 1 where undefined), and every pixel's prediction (P,)."""

    residual: np.ndarray
    ncc: np.ndarray
    level: np.ndarray
    predicted: np.ndarray


def final_fit(
    field_: GaussianField,
    motion: SliceMotion,
    data: SliceTensors,
    neighbours: torch.Tensor,
    mode: str,
    batch: int,
) -> SliceFit:
    """Predict every pixel once; per slice sum|pred - I| / sum|I|, the NCC of pred against I and
    sum I / sum pred.

    Slices without signal get a NaN residual, slices whose observed or predicted pixels are constant
    a NaN NCC.
    """
    m = motion.n
    device = data.values.device
    # Per slice: sum|e|, sum|I|, n, sum I, sum p, sum I^2, sum p^2, sum I p (float64 against cancellation).
    sums = torch.zeros(8, m, dtype=torch.float64, device=device)
    predicted = torch.empty(data.n_pixels, dtype=torch.float32, device=device)
    with torch.no_grad():
        for start in range(0, data.n_pixels, batch):
            index = torch.arange(start, min(start + batch, data.n_pixels), device=device)
            p = predict(field_, motion, data, index, neighbours.index_select(0, index), mode)
            predicted[index] = p
            x, y = data.values.index_select(0, index).double(), p.double()
            terms = torch.stack([(y - x).abs(), x.abs(), torch.ones_like(x), x, y, x * x, y * y, x * y])
            sums.index_add_(1, data.slice_id.index_select(0, index), terms)
    error, magnitude, n, sx, sy, sxx, syy, sxy = sums.cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        residual = np.where(magnitude > 0, error / np.maximum(magnitude, 1e-300), np.nan)
        n = np.maximum(n, 1.0)
        var_x, var_y = sxx - sx * sx / n, syy - sy * sy / n
        covariance = sxy - sx * sy / n
        tiny = 1e-12 * np.maximum(sxx, syy)
        ncc = np.where((var_x > tiny) & (var_y > tiny), covariance / np.sqrt(var_x * var_y), np.nan)
        level = np.where((sx > 0) & (sy > 0), sx / np.maximum(sy, 1e-300), 1.0)
    return SliceFit(
        residual=residual, ncc=np.clip(ncc, -1.0, 1.0), level=level, predicted=predicted.cpu().numpy()
    )


def unweight_motion_gradients(motion: SliceMotion, loss_weight: torch.Tensor) -> None:
    """Undo the slice weights (M,) in the gradients of the per-slice parameters.

    Slice weights decide how much a slice shapes the volume, not whether it is registered: a slice
    down-weighted while it was misregistered must keep moving towards the volume so that it can be
    re-admitted. Each slice's motion and scale only see that slice's pixels, so dividing their
    gradients by the slice weight gives exactly the unweighted gradient.
    """
    for parameter in (motion.rotvec, motion.translation, motion.log_scale):
        if parameter.grad is not None:
            factor = 1.0 / loss_weight
            parameter.grad.mul_(factor.reshape(-1, *([1] * (parameter.grad.dim() - 1))))


def pose_search(
    field_: GaussianField,
    motion: SliceMotion,
    data: SliceTensors,
    quality: SliceQuality,
    settings: Settings,
    optimizer: torch.optim.Optimizer,
) -> np.ndarray:
    """Run the multi-start pose search on the down-weighted slices; returns the moved slices (S,).

    quality must come from robust_weights with pixel counts (as in the loop).
    A moved slice loses its momentum (Adam's first moment), which points the way the slice was
    heading from its old pose; the second moment stays, as the gradients' size does not change.
    """
    # Slices excluded for their intensity are not misplaced: their pose is not the problem.
    misplaced = np.array([code not in ("dropout", "intensity") for code in quality.reason_code])
    slices = slices_to_search(
        quality.weight, quality.residual, (quality.n_pixels >= MIN_JUDGED_PIXELS) & misplaced
    )
    if len(slices) == 0:
        return slices
    result = search_poses(
        field_, motion, data, slices, settings.k_neighbours, settings.neighbour_backend, settings.psf_mode
    )
    moved = result.slices[result.moved]
    log.info(
        "pose search: %d of %d badly fitting slices moved, median residual %.3f -> %.3f",
        len(moved),
        len(slices),
        float(np.median(result.before)),
        float(np.median(result.after)),
    )
    rows = torch.as_tensor(moved, dtype=torch.long, device=motion.rotvec.device)
    for parameter in (motion.rotvec, motion.translation, motion.log_scale):
        state = optimizer.state.get(parameter, {})
        if "exp_avg" in state:
            state["exp_avg"][rows] = 0.0
    return moved


def make_optimizer(field_: GaussianField, motion: SliceMotion, settings: Settings) -> torch.optim.Optimizer:
    groups = [
        {"params": [field_.means], "lr": settings.lr_means, "name": "means"},
        {"params": [field_.log_scales], "lr": settings.lr_scales, "name": "scales"},
        {"params": [field_.quaternions], "lr": settings.lr_quaternions, "name": "quaternions"},
        {"params": [field_.intensities], "lr": settings.lr_intensities, "name": "intensities"},
        {"params": [motion.rotvec], "lr": settings.lr_rotation, "name": "rotation"},
        {"params": [motion.translation], "lr": settings.lr_translation, "name": "translation"},
        {"params": [motion.log_scale], "lr": settings.lr_slice_scale, "name": "slice_scale"},
    ]
    for group in groups:
        group["base_lr"] = group["lr"]
    return torch.optim.Adam(groups)


def stage_plan(settings: Settings, has_coarse: bool) -> list[tuple[str, int]]:
    """(stage name, steps) pairs summing to settings.iterations."""
    if not has_coarse:
        return [("fine", settings.iterations)]
    coarse = int(round(settings.iterations * settings.coarse_fraction))
    return [("coarse", coarse), ("fine", settings.iterations - coarse)]


def learning_rate_factor(step_in_stage: int, stage_steps: int, stage: str) -> float:
    """Step decay x0.5 at 50% and 75% of the fine stage; the coarse stage runs at full rate."""
    if stage == "coarse":
        return 1.0
    progress = step_in_stage / max(stage_steps, 1)
    return 0.25 if progress >= 0.75 else 0.5 if progress >= 0.5 else 1.0


def optimize(
    field_: GaussianField,
    motion: SliceMotion,
    stages: dict[str, SliceTensors],
    slice_stack: np.ndarray,
    settings: Settings,
    hooks: Hooks | None = None,
    time_pairs: np.ndarray | None = None,
) -> SliceQuality:
    """Fit the Gaussians, slice motion and slice scales to the slices; returns the slice quality.

    stages maps "fine" (and optionally "coarse") to the slice pixels of that stage; time_pairs (Q, 2)
    are the slices acquired one after the other, whose motions the trajectory prior ties together.
    """
    hooks = hooks or Hooks()
    PROFILE.reset(torch.cuda.synchronize if motion.rotvec.device.type == "cuda" else None)
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    optimizer = make_optimizer(field_, motion, settings)
    plan = stage_plan(settings, "coarse" in stages)
    total = sum(steps for _, steps in plan)
    motion_start = int(settings.motion_start * total)
    m = motion.n
    quality = robust_weights(np.full(m, np.nan), np.ones(m), slice_stack, settings.outlier_z)
    searches = [int(at * total) for at in POSE_SEARCH_AT] if settings.pose_search else []
    pose_moves = np.zeros(m, dtype=np.int64)
    smooth = time_pairs is not None and len(time_pairs) > 0 and settings.motion_smoothness > 0
    pairs = torch.as_tensor(time_pairs, dtype=torch.long, device=motion.rotvec.device) if smooth else None
    step = 0
    started = time.monotonic()
    for stage, steps in plan:
        data = stages[stage]
        device = data.values.device
        counts = pixels_per_slice(data, m)
        abs_error = torch.zeros(m, dtype=torch.float64, device=device)
        abs_value = torch.zeros_like(abs_error)
        order = torch.randperm(data.n_pixels, generator=generator).to(device)
        cursor = 0
        neighbours = None
        for step_in_stage in range(steps):
            if hooks.should_stop is not None and hooks.should_stop():
                quality.pose_moves = pose_moves
                return quality
            if step_in_stage % settings.refresh_every == 0:
                with PROFILE.section("neighbours"):
                    neighbours = neighbour_lists(
                        field_, motion, data, settings.k_neighbours, settings.neighbour_backend
                    )
                if step > motion_start and bool((abs_value > 0).any()):
                    with PROFILE.section("weights"):
                        residual = (abs_error / abs_value.clamp_min(1e-12)).cpu().numpy()
                        residual[abs_value.cpu().numpy() == 0] = np.nan
                        scale = motion.intensity_scale().detach().cpu().numpy()
                        quality = robust_weights(residual, scale, slice_stack, settings.outlier_z, counts)
                        abs_error.zero_()
                        abs_value.zero_()
                    if searches and step >= searches[0]:
                        searches = [at for at in searches if at > step]
                        with PROFILE.section("pose_search"):
                            moved = pose_search(field_, motion, data, quality, settings, optimizer)
                            pose_moves[moved] += 1
                            if len(moved):
                                neighbours = neighbour_lists(
                                    field_, motion, data, settings.k_neighbours, settings.neighbour_backend
                                )
            if cursor + settings.batch_pixels > data.n_pixels:
                order = torch.randperm(data.n_pixels, generator=generator).to(device)
                cursor = 0
            index = order[cursor : cursor + settings.batch_pixels]
            cursor += settings.batch_pixels
            factor = learning_rate_factor(step_in_stage, steps, stage)
            motion_on = step >= motion_start
            for group in optimizer.param_groups:
                is_motion = group["name"] in ("rotation", "translation", "slice_scale")
                group["lr"] = group["base_lr"] * factor * (1.0 if motion_on or not is_motion else 0.0)
            with PROFILE.section("forward"):
                prediction = predict(
                    field_, motion, data, index, neighbours.index_select(0, index), settings.psf_mode
                )
                slice_id = data.slice_id.index_select(0, index)
                loss_weight = torch.as_tensor(
                    np.maximum(quality.weight, EXCLUDED_LOSS_WEIGHT), dtype=prediction.dtype, device=device
                )
                weight = loss_weight.index_select(0, slice_id)
                target = data.values.index_select(0, index)
                loss = weighted_l1(prediction, target, weight)
                if settings.scale_regularization > 0:
                    loss = loss + settings.scale_regularization * scale_penalty(
                        field_.scales(), settings.scale_target
                    )
            if not torch.isfinite(loss):
                raise InputError(
                    None,
                    f"the optimization diverged at iteration {step + 1} (the loss is not a finite number): "
                    "the stacks' intensities or the settings (learning rates, --scale-regularization) are "
                    "out of range",
                )
            with PROFILE.section("backward"):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with PROFILE.section("adam"):
                unweight_motion_gradients(motion, loss_weight)
                if smooth and motion_on:
                    # After the unweighting: the prior ties slices whatever their weight.
                    prior = trajectory_penalty(motion.rotvec, motion.translation, motion.centres, pairs)
                    (settings.motion_smoothness * prior).backward()
                optimizer.step()
            with PROFILE.section("bookkeeping"), torch.no_grad():
                abs_error.index_add_(0, slice_id, (prediction - target).abs().double())
                abs_value.index_add_(0, slice_id, target.abs().double())
            step += 1
            elapsed = time.monotonic() - started
            with PROFILE.section("progress"):
                if hooks.progress is not None:
                    eta = elapsed / step * (total - step)
                    hooks.progress(step, total, loss.item(), stage, eta if math.isfinite(eta) else 0.0)
            with PROFILE.section("previews"):
                if hooks.checkpoint is not None:
                    hooks.checkpoint(step)
    with PROFILE.section("final_fit"):
        return judged(field_, motion, stages["fine"], slice_stack, settings, pose_moves)


def judged(
    field_: GaussianField,
    motion: SliceMotion,
    fine: SliceTensors,
    slice_stack: np.ndarray,
    settings: Settings,
    pose_moves: np.ndarray | None = None,
) -> SliceQuality:
    """The slices judged against the models as they are: one pass over every full-resolution pixel
    (final_fit), weights and exclusions from its residuals (robust_weights), and per slice (M,) its NCC
    and pose_moves (zeros if not given)."""
    m = motion.n
    neighbours = neighbour_lists(field_, motion, fine, settings.k_neighbours, settings.neighbour_backend)
    fit = final_fit(field_, motion, fine, neighbours, settings.psf_mode, 4 * settings.batch_pixels)
    # The slice's intensity relative to the volume: its scale, times what the scale has not yet
    # absorbed (the scale learns slowly, so a deep drop-out can still be on its way down).
    scale = motion.intensity_scale().detach().cpu().numpy() * fit.level
    quality = robust_weights(fit.residual, scale, slice_stack, settings.outlier_z, pixels_per_slice(fine, m))
    quality.ncc, quality.predicted = fit.ncc, fit.predicted
    quality.pose_moves = np.zeros(m, dtype=np.int64) if pose_moves is None else pose_moves
    return quality
