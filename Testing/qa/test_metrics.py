"""Image metrics with rigid alignment and intensity fit; slice-motion errors modulo a global frame."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.transform import Rotation

from GaussianSVRLib.errors import InputError
from GaussianSVRLib.geometry import kabsch, rotvec_to_matrix_np
from GaussianSVRLib.qa.metrics import evaluate, evaluate_files, masked_ssim, motion_errors, orientation_errors

SIZE = 48


def _phantom() -> tuple[sitk.Image, sitk.Image]:
    """An asymmetric textured ellipsoid (float32, 1 mm, off-centre origin) and its mask (uint8)."""
    grid = np.arange(SIZE) - (SIZE - 1) / 2.0
    z, y, x = np.meshgrid(grid, grid, grid, indexing="ij")
    r = np.sqrt((x / 17.0) ** 2 + (y / 14.0) ** 2 + (z / 12.0) ** 2)
    volume = 60.0 * (r < 1.0) + 40.0 * (np.hypot(x - 6, y + 3) < 4) * (np.abs(z - 2) < 6)
    volume += 30.0 * (np.sqrt((x + 7) ** 2 + (y - 5) ** 2 + (z + 4) ** 2) < 3.5)
    volume += 10.0 * np.sin(x / 2.0) * np.cos(y / 3.0) * (r < 1.0)
    volume = ndimage.gaussian_filter(volume, 0.7).astype(np.float32)
    image = sitk.GetImageFromArray(volume)
    image.SetOrigin((10.0, -20.0, 5.0))
    mask = sitk.GetImageFromArray((r < 0.95).astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask


@pytest.fixture(scope="module")
def phantom() -> tuple[sitk.Image, sitk.Image]:
    return _phantom()


def _degraded(image: sitk.Image, seed: int = 0) -> sitk.Image:
    """Blurred with noise: a plausible imperfect reconstruction on the same grid."""
    array = ndimage.gaussian_filter(sitk.GetArrayFromImage(image), 1.0)
    array = array + np.random.default_rng(seed).normal(0.0, 2.0, array.shape)
    out = sitk.GetImageFromArray(array.astype(np.float32))
    out.CopyInformation(image)
    return out


def test_identical_images_score_perfectly(phantom):
    image, mask = phantom
    for align in (False, True):
        result = evaluate(image, image, mask, align=align)
        assert result["psnr"] > 80.0
        assert result["ssim"] == pytest.approx(1.0, abs=1e-6)
        assert result["ncc"] == pytest.approx(1.0, abs=1e-6)
        assert result["nrmse"] < 1e-4


def test_alignment_recovers_a_known_rigid_motion(phantom):
    image, mask = phantom
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint((23.5, 23.5, 23.5)))
    motion = sitk.Euler3DTransform()
    motion.SetCenter(tuple(centre))
    motion.SetRotation(*np.deg2rad([4.0, -3.0, 5.0]))
    motion.SetTranslation((3.0, -2.0, 2.5))
    moved = sitk.Resample(image, image, motion, sitk.sitkLinear, 0.0)  # moved(x) = image(motion(x))
    aligned, raw = evaluate(moved, image, mask), evaluate(moved, image, mask, align=False)
    assert aligned["psnr"] > raw["psnr"] + 10.0
    assert aligned["ssim"] > 0.95 > raw["ssim"] + 0.2
    assert aligned["ncc"] > 0.98  # the ceiling is set by interpolating the sharp phantom twice
    # The alignment maps reference points to where the moved image shows them: motion^-1.
    matrix, offset = np.reshape(aligned["alignment"][:9], (3, 3)), np.asarray(aligned["alignment"][9:])
    inverse = motion.GetInverse()
    points = centre + np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10], [-8, 6, -5.0]])
    expected = np.array([inverse.TransformPoint(tuple(p)) for p in points])
    np.testing.assert_allclose(points @ matrix.T + offset, expected, atol=0.25)
    assert aligned["alignment_angle_deg"] == pytest.approx(
        np.degrees(np.linalg.norm(np.deg2rad([4, -3, 5]))), abs=0.3
    )


def test_a_reconstruction_in_another_frame_is_found(phantom):
    """Same voxels placed 40 mm away: beyond the registration's reach from the identity start."""
    image, mask = phantom
    elsewhere = sitk.Image(image)
    shift = np.array([30.0, -20.0, 15.0])
    elsewhere.SetOrigin(tuple(np.asarray(image.GetOrigin()) + shift))
    result = evaluate(elsewhere, image, mask)
    assert result["psnr"] > 60.0 and result["ssim"] > 0.999
    assert result["alignment_shift_mm"] == pytest.approx(np.linalg.norm(shift), abs=0.05)


def test_metrics_ignore_an_affine_intensity_change(phantom):
    image, mask = phantom
    recon = _degraded(image)
    brighter = sitk.Cast(recon * 2.0 + 5.0, sitk.sitkFloat32)
    exact_a, exact_b = evaluate(recon, image, mask, align=False), evaluate(brighter, image, mask, align=False)
    for key in ("psnr", "ssim", "ncc", "nrmse"):
        assert exact_b[key] == pytest.approx(exact_a[key], rel=1e-6)
    assert exact_b["intensity_scale"] == pytest.approx(exact_a["intensity_scale"] / 2.0, rel=1e-6)
    aligned_a, aligned_b = evaluate(recon, image, mask), evaluate(brighter, image, mask)
    assert aligned_b["psnr"] == pytest.approx(aligned_a["psnr"], abs=0.05)
    assert aligned_b["ssim"] == pytest.approx(aligned_a["ssim"], abs=1e-3)


def test_metric_definitions(phantom):
    """PSNR against the reference's peak, NRMSE over its range, after a least-squares a x + b."""
    image, mask = phantom
    recon = _degraded(image, seed=1)
    result = evaluate(recon, image, mask, align=False)
    inside = sitk.GetArrayFromImage(mask) > 0
    x = sitk.GetArrayFromImage(recon)[inside].astype(np.float64)
    y = sitk.GetArrayFromImage(image)[inside].astype(np.float64)
    a, b = np.polyfit(x, y, 1)
    mse = np.mean((a * x + b - y) ** 2)
    assert result["psnr"] == pytest.approx(10 * np.log10(y.max() ** 2 / mse), rel=1e-6)
    assert result["nrmse"] == pytest.approx(np.sqrt(mse) / np.ptp(y), rel=1e-6)
    assert result["ncc"] == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-6)
    assert (result["intensity_scale"], result["intensity_offset"]) == pytest.approx((a, b), rel=1e-6)
    worse = evaluate(_degraded(_degraded(image, 2), 3), image, mask, align=False)
    assert worse["ssim"] < result["ssim"] < 1.0 and worse["psnr"] < result["psnr"]


def test_ssim_luminance_and_contrast_terms():
    grid = np.arange(40) - 19.5
    mask = np.sqrt(sum(g**2 for g in np.meshgrid(grid, grid, grid, indexing="ij"))) < 16.0
    # Constant images: no variance inside the (masked) windows, so SSIM is the luminance term exactly.
    c1 = (0.01 * 50.0) ** 2
    expected = (2 * 100.0 * 80.0 + c1) / (100.0**2 + 80.0**2 + c1)
    assert masked_ssim(np.full(mask.shape, 100.0), np.full(mask.shape, 80.0), mask, 50.0) == pytest.approx(
        expected
    )
    # Constant against noise of variance s2: the contrast term c2 / (local variance + c2), windows
    # of sigma 1.5 voxels (local variance about s2 (1 - sum w^2), sum w^2 = (2 sqrt(pi) 1.5)^-3).
    noisy = 100.0 + np.random.default_rng(0).normal(0.0, 3.0, mask.shape)
    c2 = (0.03 * 30.0) ** 2
    local_variance = 9.0 * (1.0 - (2 * np.sqrt(np.pi) * 1.5) ** -3)
    value = masked_ssim(np.full(mask.shape, 100.0), noisy, mask, 30.0)
    assert value == pytest.approx(c2 / (local_variance + c2), rel=0.1)
    # Voxels outside the mask never enter: garbage there changes nothing.
    garbage = np.where(mask, noisy, 1e6)
    assert masked_ssim(np.full(mask.shape, 100.0), garbage, mask, 30.0) == pytest.approx(value, rel=1e-9)


def test_evaluate_files(tmp_path, phantom):
    image, mask = phantom
    paths = [tmp_path / name for name in ("recon.nii.gz", "ref.nii.gz", "mask.nii.gz")]
    for item, path in zip((_degraded(image), image, mask), paths, strict=True):
        sitk.WriteImage(item, str(path))
    result = evaluate_files(*paths, align=False)
    assert result["psnr"] == pytest.approx(
        evaluate(_degraded(image), image, mask, align=False)["psnr"], rel=1e-5
    )
    with pytest.raises(InputError, match="recon"):
        evaluate_files(tmp_path / "missing.nii.gz", paths[1], paths[2])


# --- motion errors ---------------------------------------------------------------------------------


def _truth(rng: np.random.Generator, n_stacks: int = 3, n_slices: int = 20) -> list[dict]:
    slices = []
    for s in range(n_stacks):
        axis = np.eye(3)[s]
        for k in range(n_slices):
            slices.append(
                {
                    "stack": s,
                    "k": k,
                    "centre": (axis * (k - n_slices / 2) * 3.0 + rng.normal(0, 2, 3)).tolist(),
                    "rotation": rng.uniform(-0.1, 0.1, 3).tolist(),
                    "translation": rng.uniform(-3, 3, 3).tolist(),
                }
            )
    return slices


def _then(
    slice_: dict, rotation: np.ndarray, translation: np.ndarray, pivot: np.ndarray | None = None
) -> dict:
    """The slice transform followed by the world rigid map x -> rotation (x - pivot) + pivot + translation."""
    pivot = np.zeros(3) if pivot is None else pivot
    c, t = np.asarray(slice_["centre"]), np.asarray(slice_["translation"])
    r = Rotation.from_matrix(rotation) * Rotation.from_rotvec(slice_["rotation"])
    new_t = rotation @ (c + t - pivot) + pivot + translation - c
    return {**slice_, "rotation": r.as_rotvec().tolist(), "translation": new_t.tolist()}


def test_a_global_rigid_change_is_no_error():
    rng = np.random.default_rng(0)
    truth = _truth(rng)
    g_rotation = Rotation.from_rotvec([0.2, -0.3, 0.25]).as_matrix()
    estimated = [_then(sl, g_rotation, np.array([5.0, -7.0, 3.0])) for sl in truth]
    rotation_error, translation_error = motion_errors(estimated, truth)
    assert rotation_error.shape == translation_error.shape == (len(truth),)
    assert rotation_error.max() < 1e-6 and translation_error.max() < 1e-6


def test_a_known_slice_perturbation_is_measured():
    rng = np.random.default_rng(1)
    truth = _truth(rng)
    g_rotation = Rotation.from_rotvec([-0.1, 0.4, 0.05]).as_matrix()
    g_translation = np.array([-2.0, 1.0, 8.0])
    estimated = [_then(sl, g_rotation, g_translation) for sl in truth]
    # Slice 17: an extra 4 degrees about its own (moved) centre and a 2.5 mm shift, before G.
    bad = 17
    sl = truth[bad]
    moved_centre = np.asarray(sl["centre"]) + sl["translation"]
    perturbation = Rotation.from_rotvec(np.deg2rad(4.0) * np.array([0.6, 0.0, 0.8])).as_matrix()
    perturbed = _then(sl, perturbation, np.array([1.5, 2.0, 0.0]), pivot=moved_centre)
    estimated[bad] = _then(perturbed, g_rotation, g_translation)
    order = rng.permutation(len(truth))  # matching is by (stack, k), not by position
    rotation_error, translation_error = motion_errors([estimated[i] for i in order], truth)
    where = int(np.nonzero(order == bad)[0][0])
    assert rotation_error[where] == pytest.approx(4.0, rel=0.05)
    assert translation_error[where] == pytest.approx(2.5, rel=0.05)
    others = np.delete(np.arange(len(truth)), where)
    assert rotation_error[others].max() < 0.3 and translation_error[others].max() < 0.3


def test_a_few_far_off_slices_do_not_tilt_the_global_frame():
    rng = np.random.default_rng(4)
    truth = _truth(rng)
    g_rotation = Rotation.from_rotvec([0.3, 0.1, -0.2]).as_matrix()
    g_translation = np.array([4.0, -6.0, 2.0])
    estimated = [_then(sl, g_rotation, g_translation) for sl in truth]
    far = [2, 9, 21]
    for i in far:
        centre = np.asarray(truth[i]["centre"]) + truth[i]["translation"]
        extra = Rotation.from_rotvec(np.deg2rad(15.0) * np.array([0.0, 1.0, 0.0])).as_matrix()
        estimated[i] = _then(
            _then(truth[i], extra, np.array([0.0, 0.0, 6.0]), pivot=centre), g_rotation, g_translation
        )
    rotation_error, translation_error = motion_errors(estimated, truth)
    others = np.delete(np.arange(len(truth)), far)
    assert rotation_error[others].max() < 1e-6 and translation_error[others].max() < 1e-6
    assert rotation_error[far] == pytest.approx(15.0, abs=1e-6)
    assert translation_error[far] == pytest.approx(6.0, abs=1e-6)


def test_orientation_errors_ignore_a_common_tilt_and_a_few_far_off_slices():
    rng = np.random.default_rng(3)
    truth = _truth(rng)
    tilt = Rotation.from_rotvec(np.deg2rad(1.5) * np.array([0.0, 0.6, 0.8]))
    # Every slice turned by the same 1.5 degrees about its own centre: positions stay, orientations tilt.
    estimated = [
        {**sl, "rotation": (tilt * Rotation.from_rotvec(sl["rotation"])).as_rotvec().tolist()} for sl in truth
    ]
    far = [3, 11, 20]
    for i in far:
        extra = Rotation.from_rotvec(np.deg2rad(15.0) * np.array([1.0, 0.0, 0.0]))
        estimated[i] = {
            **estimated[i],
            "rotation": (extra * tilt * Rotation.from_rotvec(truth[i]["rotation"])).as_rotvec().tolist(),
        }
    coupled, _ = motion_errors(estimated, truth)
    relative = orientation_errors(estimated, truth)
    others = np.delete(np.arange(len(truth)), far)
    assert np.median(coupled[others]) > 0.5  # the point fit leaves (part of) the tilt in every slice
    assert relative[others].max() < 1e-6
    assert relative[far] == pytest.approx(15.0, abs=1e-6)


def test_unmatched_slices_are_refused():
    truth = _truth(np.random.default_rng(2), n_stacks=1, n_slices=5)
    extra = {**truth[0], "stack": 4}
    with pytest.raises(ValueError, match="no true transform"):
        motion_errors(truth + [extra], truth)
    # Fewer estimated slices than true ones is fine (the engine skips empty slices).
    rotation_error, _ = motion_errors(truth[:3], truth)
    assert rotation_error.shape == (3,)


def test_rotation_helpers_match_scipy():
    rng = np.random.default_rng(3)
    rotvecs = np.vstack([rng.normal(0, 1, (5, 3)), np.zeros((1, 3)), [[1e-9, 0, 0]]])
    np.testing.assert_allclose(
        rotvec_to_matrix_np(rotvecs), Rotation.from_rotvec(rotvecs).as_matrix(), atol=1e-12
    )
    points = rng.normal(0, 10, (30, 3))
    rotation = Rotation.from_rotvec([0.3, 2.0, -0.5]).as_matrix()
    found_r, found_t = kabsch(points, points @ rotation.T + [1.0, 2.0, 3.0])
    np.testing.assert_allclose(found_r, rotation, atol=1e-10)
    np.testing.assert_allclose(found_t, [1.0, 2.0, 3.0], atol=1e-9)
