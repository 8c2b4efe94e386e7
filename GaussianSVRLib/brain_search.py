"""Masks that make themselves, for stacks given with neither a mask nor a box.

A quick reconstruction of everything the stacks saw together (their common field of view: a stack's
field of view takes in the mother's abdomen, the intersection of several stacks in different
orientations is close around the fetal head); the brain found on it by its outline
(atlas/outline.py); that brain carried back onto every stack through each slice's fitted motion, so
that each stack's mask follows where the fetus was while that stack was acquired.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from .atlas.outline import OutlineNotFound, find_outline, placed_mask
from .errors import InputError
from .export.frame import snapshot, volume_image
from .fit.initialize import data_stages, initial_models, prepare
from .fit.mask_propagation import dilate
from .fit.optimize import Hooks, optimize
from .fit.views import common_view, masks_through_slices, view_on_grid
from .io.stacks import Stack, normalized_intensities
from .settings import Settings, preset

#: The first reconstruction: the preview preset on this grid (mm), without bias correction (there
#: is no mask to fit a bias field in).
SEARCH_RESOLUTION_MM = 1.6
#: The brain found is grown by this margin (mm): its outline sits on the step from fluid to skull, and
#: a mask that cuts brain loses it while one a little large costs little.
BRAIN_MARGIN_MM = 1.6
#: A common field of view smaller than this (ml) cannot hold a fetal brain.
MIN_VIEW_ML = 30.0


def search_settings(settings: Settings) -> Settings:
    """The settings of the first reconstruction: the preview preset, the run's device and seed."""
    return preset("preview").updated(
        output_resolution=SEARCH_RESOLUTION_MM,
        bias_correction="none",
        seed=settings.seed,
        device=settings.device,
        neighbour_backend=settings.neighbour_backend,
        psf_mode=settings.psf_mode,
        in_plane_fwhm=settings.in_plane_fwhm,
    )


def find_brain(
    stacks: list[Stack], settings: Settings, device: torch.device, hooks: Hooks
) -> tuple[list[Stack], dict]:
    """The stacks, each with the brain mask found for it (grown by settings.mask_dilation_mm too), and
    what the search found (for the report). Raises InputError when it finds no brain."""
    started = time.monotonic()
    views = common_view(stacks)
    view_ml = float(views[0].sum() * np.prod(stacks[0].spacing) / 1000)
    if view_ml < MIN_VIEW_ML:
        raise InputError(
            stacks[0].path,
            f"no brain mask given, and the stacks see only {view_ml:.0f} ml together: too little to find "
            "the brain in; give --stack-masks or a box (--roi)",
        )
    quick = search_settings(settings)
    seen = [normalized_intensities(replace(s, mask=view)) for s, view in zip(stacks, views, strict=True)]
    problem = prepare(seen, quick, None)
    field_, motion = initial_models(problem, quick, device)
    stages = data_stages(problem, quick, device)
    optimize(field_, motion, stages, problem.slices.slice_stack, quick, hooks, problem.time_pairs)
    state = snapshot(problem, field_, motion)
    volume = volume_image(state, problem.grid_affine, problem.grid_shape, quick, device)
    try:
        fit = find_outline(volume, view_on_grid(stacks, problem.grid_affine, problem.grid_shape))
    except OutlineNotFound as error:
        raise InputError(
            stacks[0].path,
            f"no brain mask given, and no brain was found in what the stacks see together ({error}); "
            "give --stack-masks or a box (--roi)",
        ) from None
    placed = placed_mask(fit, problem.grid_affine, problem.grid_shape)
    brain = dilate(placed, np.full(3, SEARCH_RESOLUTION_MM), BRAIN_MARGIN_MM)
    masks = masks_through_slices(
        problem.stacks, problem.slices, state.rotvec, state.translation, brain, problem.grid_affine
    )
    found = []
    for stack, mask in zip(stacks, masks, strict=True):
        if not mask.any():
            raise InputError(stack.path, "no brain mask given, and the brain found does not reach this stack")
        found.append(replace(stack, mask=dilate(mask, stack.spacing, settings.mask_dilation_mm)))
    summary = {
        "method": "outline of the bundled atlas brain on a first reconstruction of the common field of view",
        "common_view_ml": round(view_ml, 1),
        "brain_volume_ml": round(float(fit.brain_ml), 1),
        "atlas_week": fit.week,
        "outline_step": round(float(fit.correlation), 4),
        "seconds": round(time.monotonic() - started, 1),
    }
    return found, summary
