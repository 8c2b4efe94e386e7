"""Agreement of a stack with fixed Gaussians (agreement.py): registration, then slice NCC.

The "reconstruction" is the phantom itself written as Gaussians (conftest's phantom_gaussians):
quality known, no optimizer run needed.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from GaussianSVRLib.geometry import apply_affine, rotvec_to_matrix_np
from GaussianSVRLib.io.stacks import Stack, read_stack
from GaussianSVRLib.qa.agreement import AgreementSettings, stack_agreement
from GaussianSVRLib.sim.simulate import read_truth, simulate_stacks

#: Fewer steps than the default: enough on the phantom, and the file stays fast.
FAST = AgreementSettings(iterations=30, render_resolution=3.0)


def simulate_one(volume: sitk.Image, mask: sitk.Image, folder) -> tuple[Stack, str]:
    """One axial stack (1.6 mm in-plane, 3.2 mm slices, +/-2 deg / +/-1 mm per slice): stack, transforms."""
    result = simulate_stacks(
        volume,
        mask,
        folder,
        n_stacks=1,
        in_plane=1.6,
        thickness=3.2,
        max_rotation_deg=2.0,
        max_translation_mm=1.0,
        noise=0.01,
        seed=5,
    )
    return read_stack(result.stack_paths[0], result.mask_paths[0]), result.transforms_path


@pytest.fixture(scope="module")
def scene(phantom, phantom_gaussians, tmp_path_factory) -> dict[str, object]:
    volume, mask = phantom
    folder = tmp_path_factory.mktemp("agreement")
    gaussians = phantom_gaussians
    stack, transforms = simulate_one(volume, mask, folder / "same")

    def flipped(image: sitk.Image) -> sitk.Image:
        # The anatomy mirrored front to back (array axis j) on the same grid: another brain, same place.
        out = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[:, ::-1].copy())
        out.CopyInformation(image)
        return out

    other, _ = simulate_one(flipped(volume), flipped(mask), folder / "other")
    return {"gaussians": gaussians, "stack": stack, "transforms": transforms, "other": other}


@pytest.fixture(scope="module")
def same(scene):
    stack = scene["stack"]
    snapshot = (stack.data.copy(), stack.mask.copy(), stack.affine.copy())
    result = stack_agreement(scene["gaussians"], stack, FAST)
    return result, snapshot


def test_same_anatomy_agrees(scene, same):
    result, (data, mask, affine) = same
    stack = scene["stack"]
    assert result.median_ncc > 0.9
    non_empty = np.nonzero(stack.mask.reshape(stack.n_slices, -1).any(1))[0]
    assert np.array_equal(result.slice_k, non_empty)
    assert result.n_pixels.sum() == stack.mask.sum()
    m = len(non_empty)
    assert result.ncc.shape == result.scale.shape == (m,)
    assert result.rotvec.shape == result.translation.shape == (m, 3)
    assert result.median_ncc == pytest.approx(np.nanmedian(result.ncc))
    # The input stack is not modified.
    assert np.array_equal(stack.data, data) and np.array_equal(stack.mask, mask)
    assert np.array_equal(stack.affine, affine)


def test_other_anatomy_and_shuffled_slices_agree_far_less(scene, same):
    good = same[0].median_ncc
    other = stack_agreement(scene["gaussians"], scene["other"], FAST).median_ncc
    stack = scene["stack"]
    order = np.random.default_rng(0).permutation(stack.n_slices)
    shuffled = Stack(stack.path, stack.data[order], stack.mask[order], stack.affine, stack.thickness)
    mixed = stack_agreement(scene["gaussians"], shuffled, FAST).median_ncc
    assert other < good - 0.3
    assert mixed < good - 0.3


def test_registration_recovers_a_rigid_offset(scene, same):
    """The stack's header moved by 8 deg and 6 mm: registration finds where its slices really are."""
    stack = scene["stack"]
    shape = np.array(stack.data.shape[::-1], dtype=np.float64)
    centre = apply_affine(stack.affine, (shape - 1.0) / 2.0)
    offset = np.eye(4)
    offset[:3, :3] = rotvec_to_matrix_np(np.deg2rad(8.0) * np.array([0.6, -0.48, 0.64]))
    offset[:3, 3] = centre - offset[:3, :3] @ centre + np.array([4.0, -4.0, 2.5])
    moved = Stack(stack.path, stack.data, stack.mask, offset @ stack.affine, stack.thickness)

    unregistered = stack_agreement(scene["gaussians"], moved, AgreementSettings(iterations=0, register=False))
    result = stack_agreement(scene["gaussians"], moved, FAST)
    assert result.start == "registered"
    assert unregistered.median_ncc < same[0].median_ncc - 0.3
    assert result.median_ncc > same[0].median_ncc - 0.02

    # Every pixel: where the fitted motion puts it (from the moved header) against where the
    # simulation took it from (true slice motion from the original header).
    truth = {item["k"]: item for item in read_truth(scene["transforms"])}
    errors = []
    for i, k in enumerate(result.slice_k):
        jj, ii = np.nonzero(stack.mask[k])
        index = np.stack([ii, jj, np.full_like(ii, k)], -1).astype(np.float64)
        t = truth[int(k)]
        nominal = apply_affine(stack.affine, index)
        rotation = rotvec_to_matrix_np(np.asarray(t["rotation"]))
        true = (nominal - t["centre"]) @ rotation.T + np.asarray(t["centre"]) + t["translation"]
        moved_nominal = apply_affine(moved.affine, index)
        slice_centre = apply_affine(moved.affine, np.array([(shape[0] - 1) / 2, (shape[1] - 1) / 2, k]))
        fitted = (moved_nominal - slice_centre) @ rotvec_to_matrix_np(result.rotvec[i]).T
        errors.append(np.linalg.norm(fitted + slice_centre + result.translation[i] - true, axis=1).mean())
    assert np.median(errors) < 1.0
