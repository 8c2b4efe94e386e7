"""Masks before reconstruction: dilation by a world margin, propagation to stacks without a mask."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from GaussianSVRLib.errors import InputError
from GaussianSVRLib.fit.mask_propagation import PROPAGATION_MARGIN_MM, dilate, prepare_masks, propagate
from GaussianSVRLib.geometry import apply_affine
from GaussianSVRLib.io.stacks import Stack, read_stack
from GaussianSVRLib.pipeline import reconstruct
from GaussianSVRLib.qa.metrics import evaluate
from GaussianSVRLib.settings import Settings
from GaussianSVRLib.sim.simulate import naive_average

#: A wrong header translation (mm) of the stack without a mask.
SHIFT_MM = [10.0, -8.0, 6.0]
TINY = Settings(iterations=150, batch_pixels=8192, output_resolution=1.6, checkpoint_interval_s=1e9)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def unmasked(stack: Stack) -> Stack:
    return replace(stack, mask=np.ones_like(stack.mask), mask_path=None)


@pytest.fixture(scope="module")
def stacks(phantom_stacks) -> list[Stack]:
    pairs = zip(phantom_stacks.stack_paths, phantom_stacks.mask_paths, strict=True)
    return [read_stack(stack, mask) for stack, mask in pairs]


def test_dilation_grows_by_the_margin_in_millimetres() -> None:
    mask = np.zeros((9, 21, 21), dtype=bool)
    mask[4, 10, 10] = True
    grown = dilate(mask, np.array([0.5, 0.5, 3.0]), 2.0)  # spacing i, j, k
    k, j, i = np.nonzero(grown)
    assert (i.min(), i.max(), j.min(), j.max()) == (6, 14, 6, 14)  # 2 mm = 4 pixels in-plane
    assert (k.min(), k.max()) == (3, 5)  # 2 mm rounds up to one 3 mm slice either side
    assert dilate(mask, np.array([0.5, 0.5, 3.0]), 0.0) is mask


def test_propagated_mask_follows_the_brain_through_a_wrong_header(stacks) -> None:
    """Stack 1's header moved by about 14 mm: registration must still find its true mask (voxel space)."""
    target = stacks[1]
    shifted = target.affine.copy()
    shifted[:3, 3] += SHIFT_MM
    moved = replace(unmasked(target), affine=shifted)
    assert dice(propagate(stacks[0], moved), target.mask) > 0.9


def test_header_only_resampling_would_miss(stacks) -> None:
    """The control for the test above: the same shift without registration loses the overlap."""
    target = stacks[1]
    shifted = target.affine.copy()
    shifted[:3, 3] += SHIFT_MM
    voxels = np.argwhere(target.mask)[:, ::-1].astype(float)
    world = apply_affine(shifted, voxels)
    back = np.rint(apply_affine(np.linalg.inv(target.affine), world)).astype(int)[:, ::-1]
    inside = np.all((back >= 0) & (back < target.mask.shape), axis=1)
    naive = np.zeros_like(target.mask)
    naive[tuple(back[inside].T)] = True
    assert dice(naive, target.mask) < 0.8


def test_prepare_masks_keeps_given_masks_and_fills_the_others(stacks) -> None:
    inputs = [stacks[0], unmasked(stacks[1]), unmasked(stacks[2])]
    before = [stack.mask.copy() for stack in inputs]
    prepared = prepare_masks(inputs, margin_mm=0.0)
    assert np.array_equal(prepared[0].mask, stacks[0].mask)
    for original, result in zip(stacks[1:], prepared[1:], strict=True):
        assert result.mask.sum() < 0.5 * result.mask.size  # a brain, not the field of view
        assert (result.mask & original.mask).sum() > 0.95 * original.mask.sum()  # margin covers it
        assert result.mask.sum() > original.mask.sum()  # PROPAGATION_MARGIN_MM
    assert PROPAGATION_MARGIN_MM > 0
    assert all(np.array_equal(a.mask, b) for a, b in zip(inputs, before, strict=True)), "inputs modified"
    grown = prepare_masks([stacks[0]], margin_mm=2.0)[0]
    assert grown.mask.sum() > stacks[0].mask.sum() and (grown.mask | stacks[0].mask).sum() == grown.mask.sum()


def test_a_mask_that_cuts_the_brain_is_restored_by_the_dilation_margin(stacks) -> None:
    """A mask eroded by 2 mm (cutting the brain's edge) grown back by --mask-dilation 2.5."""
    stack = stacks[0]
    cut = ~dilate(~stack.mask, stack.spacing, 2.0)
    assert (cut & stack.mask).sum() < 0.8 * stack.mask.sum()
    restored = prepare_masks([replace(stack, mask=cut)], margin_mm=2.5)[0].mask
    assert (restored & stack.mask).sum() > 0.97 * stack.mask.sum()
    assert restored.sum() < 1.5 * stack.mask.sum()


def test_no_mask_at_all_is_refused(stacks) -> None:
    with pytest.raises(InputError, match="no brain mask"):
        prepare_masks([unmasked(stack) for stack in stacks], margin_mm=0.0)


def test_one_mask_is_enough_for_a_reconstruction(phantom, phantom_stacks) -> None:
    volume, mask = phantom
    masks = [phantom_stacks.mask_paths[0], "none", "none"]
    result = reconstruct(phantom_stacks.stack_paths, masks, None, TINY)
    ours = evaluate(result.volume, volume, mask)
    naive = evaluate(naive_average(phantom_stacks.stack_paths, volume), volume, mask)
    assert ours["psnr"] >= naive["psnr"] + 2.0, (ours, naive)
    assert result.report["stacks"][0]["reference"], "the reference must be a stack with a given mask"
