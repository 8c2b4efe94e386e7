"""Geometry round trips: voxel <-> world, RAS NIfTI headers vs LPS ITK, oblique stacks, masks, thickness."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from GaussianSVRLib.geometry import (
    LPS_TO_RAS,
    apply_affine,
    image_affine,
    kabsch,
    matrix_to_rotvec,
    rigid_to_slice_motion,
)
from GaussianSVRLib.io.slices import extract_slices, psf_sigmas
from GaussianSVRLib.io.stacks import read_stack, read_stacks
from GaussianSVRLib.model.motion import compose_rigid
from GaussianSVRLib.model.rotations import rotvec_to_matrix

OBLIQUE = sitk.Euler3DTransform((0, 0, 0), 0.3, -0.2, 0.5).GetMatrix()


def oblique_image(
    path: Path, size=(12, 10, 5), spacing=(1.1, 0.9, 3.3), origin=(12.0, -40.5, 7.25)
) -> sitk.Image:
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.random(size[::-1]).astype(np.float32) + 0.5)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(OBLIQUE)
    sitk.WriteImage(image, str(path))
    return image


def nifti_sform(path: Path) -> np.ndarray:
    """The sform rows (RAS) read straight from the NIfTI-1 header bytes, independent of ITK."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        header = handle.read(348)
    rows = struct.unpack("<12f", header[280:328])
    affine = np.eye(4)
    affine[:3] = np.asarray(rows).reshape(3, 4)
    return affine


def test_voxel_world_voxel_round_trip(tmp_path):
    image = oblique_image(tmp_path / "s.nii.gz")
    affine = image_affine(image)
    for index in [(0, 0, 0), (11, 9, 4), (3, 7, 2)]:
        world = apply_affine(affine, np.asarray(index, dtype=float))
        assert np.allclose(world, image.TransformIndexToPhysicalPoint(index), atol=1e-9)
        back = apply_affine(np.linalg.inv(affine), world)
        assert np.allclose(back, index, atol=1e-9)


def test_nifti_header_is_ras_and_engine_world_is_lps(tmp_path):
    path = tmp_path / "s.nii.gz"
    oblique_image(path)
    stack = read_stack(path)
    sform = nifti_sform(path)
    assert np.allclose(LPS_TO_RAS @ stack.affine, sform, atol=1e-4)
    nrrd = tmp_path / "s.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(path)), str(nrrd))
    assert np.allclose(read_stack(nrrd).affine, stack.affine, atol=1e-5)


def test_oblique_slices_carry_world_positions_axes_and_psf(tmp_path):
    path = tmp_path / "s.nii.gz"
    image = oblique_image(path)
    stack = read_stack(path, thickness=3.0)
    slices = extract_slices([stack])
    assert slices.n_slices == 5 and slices.n_pixels == 12 * 10 * 5
    for p in (0, 57, slices.n_pixels - 1):
        flat = slices.pixel_index[p]
        i, j, k = flat % 12, (flat // 12) % 10, flat // 120
        assert np.allclose(slices.positions[p], image.TransformIndexToPhysicalPoint((int(i), int(j), int(k))))
        assert slices.values[p] == pytest.approx(stack.data[k, j, i])
    assert np.allclose(slices.slice_axes[0], np.asarray(OBLIQUE).reshape(3, 3))
    assert np.allclose(slices.slice_centre[2], image.TransformContinuousIndexToPhysicalPoint((5.5, 4.5, 2.0)))
    assert np.allclose(slices.psf_sigma[0], psf_sigmas(stack))
    assert psf_sigmas(stack)[2] == pytest.approx(3.0 / 2.3548, rel=1e-3)
    assert psf_sigmas(stack)[0] == pytest.approx(1.2 * 1.1 / 2.3548, rel=1e-3)


def test_thickness_from_argument_sidecar_or_header(tmp_path):
    path = tmp_path / "sub_T2w.nii.gz"
    oblique_image(path)
    assert read_stack(path).thickness == pytest.approx(3.3)
    (tmp_path / "sub_T2w.json").write_text(json.dumps({"SliceThickness": 3.0}))
    assert read_stack(path).thickness == pytest.approx(3.0)
    assert read_stack(path, thickness=2.5).thickness == pytest.approx(2.5)
    other = tmp_path / "other.nii.gz"
    oblique_image(other)
    assert [s.thickness for s in read_stacks([str(path), str(other)], thicknesses=[2.0])] == [2.0, 2.0]


def test_mask_on_another_grid_is_resampled_to_the_stack(tmp_path):
    path = tmp_path / "s.nii.gz"
    image = oblique_image(path)
    fine = sitk.Resample(
        image,
        [24, 20, 15],
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        image.GetOrigin(),
        (0.55, 0.45, 1.1),
        image.GetDirection(),
    )
    mask = sitk.GetImageFromArray(np.zeros(fine.GetSize()[::-1], dtype=np.uint8))
    mask.CopyInformation(fine)
    mask[0:12, 0:10, 0:15] = 1
    mask_path = tmp_path / "m.nii.gz"
    sitk.WriteImage(mask, str(mask_path))
    stack = read_stack(path, mask_path)
    assert stack.mask.shape == stack.data.shape
    assert stack.mask[:, :5, :6].all() and not stack.mask[:, 5:, :].any() and not stack.mask[:, :, 6:].any()


def test_rotations_and_rigid_helpers():
    rotvec = torch.tensor([[0.2, -0.4, 0.1], [0.0, 0.0, 0.0], [1e-6, 0.0, 0.0]], dtype=torch.float64)
    matrices = rotvec_to_matrix(rotvec)
    assert torch.allclose(
        matrices @ matrices.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(3, 3, 3)
    )
    assert np.allclose(matrix_to_rotvec(matrices.numpy()), rotvec.numpy(), atol=1e-9)
    rng = np.random.default_rng(1)
    points = rng.random((50, 3)) * 10
    rotation = rotvec_to_matrix(torch.tensor([0.1, 0.3, -0.2], dtype=torch.float64)).numpy()
    found_rotation, found_offset = kabsch(points, points @ rotation.T + [1.0, -2.0, 0.5])
    assert np.allclose(found_rotation, rotation) and np.allclose(found_offset, [1.0, -2.0, 0.5])
    centres = rng.random((4, 3)) * 20
    rv, t = rigid_to_slice_motion(rotation, np.array([1.0, 2.0, 3.0]), centres)
    moved = (
        np.einsum("mij,mj->mi", rotvec_to_matrix(torch.as_tensor(rv)).numpy(), points[:4] - centres)
        + centres
        + t
    )
    assert np.allclose(moved, points[:4] @ rotation.T + [1.0, 2.0, 3.0])
    g = torch.as_tensor(rotation)
    g_offset = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    slice_rot = rotvec_to_matrix(torch.as_tensor(rv))
    new_rot, new_t = compose_rigid(g, g_offset, slice_rot, torch.as_tensor(t), torch.as_tensor(centres))
    p = torch.as_tensor(points[:4])
    c = torch.as_tensor(centres)
    direct = (torch.einsum("mij,mj->mi", slice_rot, p - c) + c + torch.as_tensor(t)) @ g.T + g_offset
    assert torch.allclose(torch.einsum("mij,mj->mi", new_rot, p - c) + c + new_t, direct)
