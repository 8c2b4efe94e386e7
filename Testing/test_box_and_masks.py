"""A box instead of masks (--roi), and the masks a run used written on each stack's grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from GaussianSVRLib.io.roi import box_from_corners
from GaussianSVRLib.io.stacks import read_stack, world_box
from GaussianSVRLib.pipeline import Outputs, reconstruct
from GaussianSVRLib.qa.metrics import evaluate
from GaussianSVRLib.settings import Settings

TINY = Settings(iterations=150, batch_pixels=8192, output_resolution=1.6, checkpoint_interval_s=1e9)


def brain_box(stack_paths, mask_paths, margin_mm: float):
    """The box around every stack's brain mask, grown by a margin: what a user draws in Slicer."""
    boxes = [world_box(read_stack(s, m)) for s, m in zip(stack_paths, mask_paths, strict=True)]
    low = np.min([b[0] for b in boxes], axis=0) - margin_mm
    high = np.max([b[1] for b in boxes], axis=0) + margin_mm
    return box_from_corners([*low, *high])


@pytest.mark.slow
def test_a_box_stands_in_for_the_masks(phantom, phantom_stacks, tmp_path):
    """No mask at all, a box 5 mm around the brain: the volume is close to the one made with the true
    masks, and the masks written are the box on each stack's grid."""
    volume, mask = phantom
    box = brain_box(phantom_stacks.stack_paths, phantom_stacks.mask_paths, 5.0)
    masks_dir = tmp_path / "masks"
    outputs = Outputs(str(tmp_path / "v.nii.gz"), masks_dir=str(masks_dir))
    boxed = reconstruct(phantom_stacks.stack_paths, None, None, TINY, outputs, roi=box)
    masked = reconstruct(phantom_stacks.stack_paths, phantom_stacks.mask_paths, None, TINY)
    with_box, with_masks = evaluate(boxed.volume, volume, mask), evaluate(masked.volume, volume, mask)
    assert with_box["psnr"] > with_masks["psnr"] - 2.0, (with_box, with_masks)
    assert boxed.report["roi"]["size_mm"] == pytest.approx(box.size.tolist())
    written = sorted(masks_dir.iterdir())
    assert [p.name for p in written] == sorted(
        Path(p).name.replace(".nii.gz", "_mask.nii.gz") for p in phantom_stacks.stack_paths
    )
    assert boxed.report["outputs"]["masks"] == [str(masks_dir / p.name) for p in written]
    for stack_path in phantom_stacks.stack_paths:
        stack = sitk.ReadImage(stack_path)
        out = sitk.ReadImage(str(masks_dir / Path(stack_path).name.replace(".nii.gz", "_mask.nii.gz")))
        assert out.GetSize() == stack.GetSize()
        assert np.allclose(out.GetOrigin(), stack.GetOrigin()) and np.allclose(
            out.GetDirection(), stack.GetDirection()
        )
        inside = sitk.GetArrayFromImage(out) > 0
        index = np.stack(np.nonzero(inside)[::-1], axis=1)  # (i, j, k)
        points = np.array([stack.TransformIndexToPhysicalPoint(tuple(int(v) for v in row)) for row in index])
        assert inside.any() and box.contains(points).all()


@pytest.mark.slow
def test_the_masks_written_are_the_ones_used(phantom_stacks, tmp_path):
    """Given masks come out unchanged (no dilation asked for); a propagated one covers the brain."""
    masks = [phantom_stacks.mask_paths[0], "none", phantom_stacks.mask_paths[2]]
    reconstruct(
        phantom_stacks.stack_paths,
        masks,
        None,
        TINY,
        Outputs(str(tmp_path / "v.nii.gz"), masks_dir=str(tmp_path)),
    )
    names = [Path(p).name.replace(".nii.gz", "_mask.nii.gz") for p in phantom_stacks.stack_paths]
    for s in (0, 2):
        given = sitk.GetArrayFromImage(sitk.ReadImage(phantom_stacks.mask_paths[s])) > 0
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / names[s]))) > 0, given)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(phantom_stacks.mask_paths[1])) > 0
    propagated = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / names[1]))) > 0
    assert (propagated & truth).sum() > 0.95 * truth.sum()
