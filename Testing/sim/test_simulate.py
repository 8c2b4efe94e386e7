"""Stacks simulated from a volume: geometry, numerical PSF, motion record, drop-outs, outliers, bias,
noise, baseline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.interpolate import RegularGridInterpolator
from scipy.spatial.transform import Rotation

from GaussianSVRLib import cli
from GaussianSVRLib.errors import InputError
from GaussianSVRLib.io.slices import FWHM_TO_SIGMA, extract_slices
from GaussianSVRLib.io.stacks import read_stacks
from GaussianSVRLib.qa.metrics import motion_errors
from GaussianSVRLib.sim.simulate import (
    bias_multiplier,
    naive_average,
    read_transforms,
    read_truth,
    sample_slices_psf,
    simulate_stacks,
)

ATLAS = Path("/work/shared/data/fetal-atlas-spina-bifida-cc0")
SIZE, SPACING = 40, 1.0
#: A direction with flipped x and y (as NIfTI files read in LPS) and an off-centre origin.
DIRECTION = np.diag([-1.0, -1.0, 1.0])
ORIGIN = np.array([21.0, 17.0, -22.0])


def _world_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World coordinates (each [k, j, i]) of the synthetic volume's voxels."""
    k, j, i = np.meshgrid(*(np.arange(SIZE),) * 3, indexing="ij")
    index = np.stack([i, j, k], -1) * SPACING
    world = index @ DIRECTION.T + ORIGIN
    return world[..., 0], world[..., 1], world[..., 2]


def _image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((SPACING,) * 3)
    image.SetOrigin(tuple(ORIGIN))
    image.SetDirection(tuple(DIRECTION.ravel()))
    return image


def smooth_volume() -> tuple[sitk.Image, sitk.Image]:
    """A smooth textured ellipsoid (float32) and its brain mask (uint8), 40^3 at 1 mm."""
    x, y, z = _world_grid()
    centre = ORIGIN + DIRECTION @ np.full(3, (SIZE - 1) / 2.0)
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    r = np.sqrt((dx / 13.0) ** 2 + (dy / 11.0) ** 2 + (dz / 10.0) ** 2)
    envelope = 1.0 / (1.0 + np.exp((r - 1.0) / 0.08))
    texture = 1.0 + 0.4 * np.sin(dx / 2.5) * np.cos(dy / 3.0) + 0.3 * np.sin(dz / 2.0 + dx / 4.0)
    volume = (100.0 * envelope * texture).astype(np.float32)
    return _image(volume), _image((r < 1.05).astype(np.uint8))


def cube_volume(value: float = 100.0) -> tuple[sitk.Image, sitk.Image]:
    """A constant cube of side 28 mm in the middle of the grid, and the cube as its mask."""
    array = np.zeros((SIZE,) * 3, dtype=np.float32)
    array[6:34, 6:34, 6:34] = value
    return _image(array), _image((array > 0).astype(np.uint8))


def _index_to_world(image: sitk.Image) -> np.ndarray:
    """Voxel (i, j, k) -> LPS affine (4, 4), from the image header alone."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return affine


def direct_psf(volume: sitk.Image, points: np.ndarray, axes: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Reference PSF integral, independent of the simulator: a dense 13 x 13 x 41 grid over +/-3 sigma.

    points (P, 3) world, axes (3, 3) world columns of the PSF axes; trilinear via RegularGridInterpolator.
    """
    array = sitk.GetArrayFromImage(volume).astype(np.float64)
    interp = RegularGridInterpolator([np.arange(n) for n in array.shape], array, bounds_error=True)
    grids = [np.linspace(-3 * s, 3 * s, n) for s, n in zip(sigma, (13, 13, 41), strict=True)]
    offsets = np.stack(np.meshgrid(*grids, indexing="ij"), -1).reshape(-1, 3)
    weights = np.exp(-0.5 * ((offsets / sigma) ** 2).sum(-1))
    weights /= weights.sum()
    world = points[:, None] + offsets @ axes.T
    index = (world - np.asarray(volume.GetOrigin())) @ np.linalg.inv(_index_to_world(volume)[:3, :3]).T
    return interp(index[..., ::-1]) @ weights


def _pixel_world(stack: sitk.Image, i: np.ndarray, j: np.ndarray, k: np.ndarray | int) -> np.ndarray:
    """World positions (P, 3) of stack pixels (i, j, k), from the header alone."""
    index = np.stack(np.broadcast_arrays(i, j, k), -1).astype(np.float64)
    affine = _index_to_world(stack)
    return index @ affine[:3, :3].T + affine[:3, 3]


@pytest.fixture(scope="module")
def smooth() -> tuple[sitk.Image, sitk.Image]:
    return smooth_volume()


@pytest.fixture(scope="module")
def moving_set(tmp_path_factory: pytest.TempPathFactory, smooth):
    """Four stacks of the smooth volume with motion and misalignment, no noise."""
    volume, mask = smooth
    out = tmp_path_factory.mktemp("moving")
    kwargs = dict(
        n_stacks=4, in_plane=1.0, thickness=3.0, spacing=2.5, max_rotation_deg=6.0, max_translation_mm=2.0,
        noise=0.0, stack_misalignment_deg=3.0, stack_misalignment_mm=1.5, seed=7,
    )  # fmt: skip
    return simulate_stacks(volume, mask, out, **kwargs), kwargs


def test_fields_of_view_cover_the_mask_with_requested_geometry(moving_set, smooth):
    result, kwargs = moving_set
    _, mask = smooth
    kk, jj, ii = np.nonzero(sitk.GetArrayFromImage(mask))
    mask_world = np.stack([ii, jj, kk], -1) @ _index_to_world(mask)[:3, :3].T + _index_to_world(mask)[:3, 3]
    expected_normals = [(0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 1)]
    origins = []
    for path, normal in zip(result.stack_paths, expected_normals, strict=True):
        stack = sitk.ReadImage(path)
        assert stack.GetPixelID() == sitk.sitkFloat32
        np.testing.assert_allclose(stack.GetSpacing(), (1.0, 1.0, 2.5), atol=1e-5)
        direction = np.asarray(stack.GetDirection()).reshape(3, 3)
        np.testing.assert_allclose(np.abs(direction[:, 2]), normal, atol=1e-6)
        assert np.linalg.det(direction) == pytest.approx(1.0, abs=1e-6)
        affine = _index_to_world(stack)
        index = (mask_world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
        size = np.asarray(stack.GetSize())
        # Every mask voxel inside the field of view with about 8 mm to spare (minus one step of rounding).
        margin_mm = np.minimum(index.min(0), (size - 1) - index.max(0)) * np.asarray(stack.GetSpacing())
        assert np.all(margin_mm > 8.0 - 2.5 / 2 - 1e-6), margin_mm
        origins.append(affine[:3, 3])
    # Stack 3 repeats stack 0's orientation half a slice spacing further along z.
    assert (origins[3] - origins[0])[2] == pytest.approx(1.25, abs=1e-4)
    np.testing.assert_allclose((origins[3] - origins[0])[:2], 0.0, atol=1e-4)


def test_oblique_stacks_are_turned_by_15_to_40_degrees(tmp_path, smooth):
    volume, mask = smooth
    result = simulate_stacks(
        volume, mask, tmp_path, n_stacks=3, in_plane=2.0, noise=0.0, oblique=True, seed=1
    )
    nominal = [
        np.eye(3),
        np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]),
        np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]]),
    ]
    for path, base in zip(result.stack_paths, nominal, strict=True):
        direction = np.asarray(sitk.ReadImage(path).GetDirection()).reshape(3, 3)
        angle = np.degrees(Rotation.from_matrix(direction @ base.T).magnitude())
        assert 15.0 - 1e-3 <= angle <= 40.0 + 1e-3


def test_moving_slices_match_an_independent_psf_integral(moving_set, smooth):
    """Pixels are the PSF mean of the volume seen through the recorded motion, x = R (p - c) + c + t."""
    result, kwargs = moving_set
    volume, _ = smooth
    truth = read_transforms(result.transforms_path)
    pixel = kwargs["in_plane"]
    sigma = np.array([1.2 * pixel, 1.2 * pixel, kwargs["thickness"]]) * FWHM_TO_SIGMA
    values_range = float(np.ptp(sitk.GetArrayFromImage(volume)))
    rng = np.random.default_rng(0)
    worst, worst_point_sample = 0.0, 0.0
    for s, stack_record in enumerate(truth["stacks"]):
        stack = sitk.ReadImage(result.stack_paths[s])
        data = sitk.GetArrayFromImage(stack)
        direction = np.asarray(stack.GetDirection()).reshape(3, 3)
        nk, nj, ni = data.shape
        for k in (nk // 2 - 1, nk // 2 + 1):
            record = stack_record["slices"][k]
            i = rng.integers(ni // 3, 2 * ni // 3, size=12)
            j = rng.integers(nj // 3, 2 * nj // 3, size=12)
            centre = _pixel_world(stack, np.array([(ni - 1) / 2.0]), np.array([(nj - 1) / 2.0]), k)[0]
            np.testing.assert_allclose(record["centre"], centre, atol=1e-3)
            rotation = Rotation.from_rotvec(record["rotation"]).as_matrix()
            moved = (_pixel_world(stack, i, j, k) - centre) @ rotation.T + centre + record["translation"]
            expected = direct_psf(volume, moved, rotation @ direction, sigma)
            worst = max(worst, float(np.abs(data[k, j, i] - expected).max()) / values_range)
            point = direct_psf(volume, moved, rotation @ direction, np.full(3, 1e-6))
            worst_point_sample = max(worst_point_sample, float(np.abs(point - expected).max()) / values_range)
    assert worst < 0.01
    # The tolerance is tight enough to tell a PSF integral from point sampling.
    assert worst_point_sample > 3 * 0.01


def test_numerical_psf_has_converged(smooth):
    """Doubling the sub-samples per axis changes a moved oblique slice by < 1 % of the range."""
    volume, mask = smooth
    array = sitk.GetArrayFromImage(volume)
    # Sharpen the test: a hard-edged ball with texture has kinks a smooth field does not.
    sharp = np.where(sitk.GetArrayFromImage(mask) > 0, array + 40.0, 0.0).astype(np.float32)
    world_to_index = np.linalg.inv(_index_to_world(volume))
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_rotvec([0.3, -0.2, 0.25]).as_matrix() @ np.diag([0.8, 0.8, 3.0])
    affine[:3, 3] = ORIGIN + DIRECTION @ np.full(3, 19.5) - affine[:3, :3] @ np.array([15.0, 15.0, 2.0])
    ks = np.arange(5)
    rotations = Rotation.from_rotvec(np.full((5, 3), 0.05)).as_matrix()
    translations = np.full((5, 3), 0.7)
    sigma = np.array([0.96, 0.96, 3.0]) * FWHM_TO_SIGMA
    steps = np.minimum(sigma, SPACING)
    args = (sharp, world_to_index, affine, (31, 31, 5), ks, rotations, translations, sigma)
    coarse, fine = sample_slices_psf(*args, steps), sample_slices_psf(*args, steps / 2)
    change = np.abs(coarse - fine).max() / np.ptp(sharp)
    assert change < 0.01
    assert np.abs(fine).max() > 0.5 * np.ptp(sharp)  # the slices do cross the object


def test_simulation_is_deterministic_for_a_seed(smooth, tmp_path):
    volume, mask = smooth
    kwargs = dict(
        n_stacks=2, in_plane=2.0, thickness=3.0, noise=0.05, dropout=0.2, oblique=True, seed=5,
        replaced=0.2, blurred=0.2, stack_intensity_scale=1.5, bias_field=0.2,
    )  # fmt: skip
    first, again = (simulate_stacks(volume, mask, tmp_path / name, **kwargs) for name in ("first", "again"))
    for a, b in zip(first.stack_paths + first.mask_paths, again.stack_paths + again.mask_paths, strict=True):
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(a)), sitk.GetArrayFromImage(sitk.ReadImage(b))
        )
    record = json.loads(Path(first.transforms_path).read_text())
    assert record == json.loads(Path(again.transforms_path).read_text())  # paths are relative to the JSON
    assert sorted(p.name for p in Path(again.transforms_path).parent.iterdir()) == sorted(
        [
            "stack_00.nii.gz",
            "stack_01.nii.gz",
            "stack_00.json",
            "stack_01.json",
            "mask_00.nii.gz",
            "mask_01.nii.gz",
            "transforms.json",
        ]
    )  # no temporary file left behind
    other = simulate_stacks(volume, mask, tmp_path / "other", **{**kwargs, "seed": 6, "n_stacks": 1})
    assert json.loads(Path(other.transforms_path).read_text())["stacks"][0] != record["stacks"][0]


def test_transforms_record_round_trips(moving_set):
    result, kwargs = moving_set
    truth = read_truth(result.transforms_path)
    assert read_transforms(result.transforms_path)["stacks"][2]["path"] == result.stack_paths[2]
    # The recorded pivots are the ones the engine derives when it reads the stacks back.
    slices = extract_slices(read_stacks(result.stack_paths, result.mask_paths))
    by_key = {(t["stack"], t["k"]): t for t in truth}
    for s, k, centre in zip(slices.slice_stack, slices.slice_k, slices.slice_centre, strict=True):
        np.testing.assert_allclose(by_key[(int(s), int(k))]["centre"], centre, atol=1e-3)
    # Motion as requested: per-component bounds, misalignment composed in, nothing left unexplained.
    rotations = np.array([t["rotation"] for t in truth])
    angles = np.degrees(np.linalg.norm(rotations, axis=1))
    assert angles.max() < np.sqrt(3) * 6.0 + 3.0 + 1e-6
    assert angles.max() > 6.0
    rotation_error, translation_error = motion_errors(truth, truth)
    assert rotation_error.max() < 1e-6 and translation_error.max() < 1e-6


def test_stack_misalignment_moves_every_slice_alike(smooth, tmp_path):
    volume, mask = smooth
    result = simulate_stacks(
        volume, mask, tmp_path, n_stacks=2, in_plane=2.0, max_rotation_deg=0.0, max_translation_mm=0.0,
        noise=0.0, stack_misalignment_deg=3.0, stack_misalignment_mm=1.5, seed=3,
    )  # fmt: skip
    for record in read_transforms(result.transforms_path)["stacks"]:
        pivot = np.asarray(record["misalignment"]["centre"])
        for sl in record["slices"]:
            rotation = Rotation.from_rotvec(sl["rotation"])
            assert np.degrees(rotation.magnitude()) == pytest.approx(3.0)
            # Where the slice's transform sends the stack centre: the misalignment's translation.
            moved = rotation.apply(pivot - sl["centre"]) + np.asarray(sl["centre"]) + sl["translation"]
            assert np.linalg.norm(moved - pivot) == pytest.approx(1.5)
            np.testing.assert_allclose(moved - pivot, record["misalignment"]["translation"], atol=1e-9)


def test_dropout_slices_are_listed_and_scaled(tmp_path, smooth):
    volume, mask = smooth
    common = dict(n_stacks=2, in_plane=1.5, thickness=2.0, noise=0.0, seed=4)
    clean = simulate_stacks(volume, mask, tmp_path / "clean", dropout=0.0, **common)
    dropped = simulate_stacks(volume, mask, tmp_path / "drop", dropout=0.25, **common)
    for s, record in enumerate(read_transforms(dropped.transforms_path)["stacks"]):
        flags = np.array([sl["dropout"] for sl in record["slices"]])
        factors = np.array([sl["dropout_factor"] for sl in record["slices"]])
        assert flags.sum() == round(0.25 * len(flags))
        assert np.all((factors[flags] >= 0.05) & (factors[flags] <= 0.3)) and np.all(factors[~flags] == 1.0)
        a = sitk.GetArrayFromImage(sitk.ReadImage(clean.stack_paths[s]))
        b = sitk.GetArrayFromImage(sitk.ReadImage(dropped.stack_paths[s]))
        np.testing.assert_allclose(b, a * factors[:, None, None], rtol=1e-5, atol=1e-4)


def test_rician_noise_has_the_requested_level(tmp_path):
    volume, mask = cube_volume(100.0)
    result = simulate_stacks(
        volume, mask, tmp_path, n_stacks=1, in_plane=1.0, thickness=2.0, max_rotation_deg=0.0,
        max_translation_mm=0.0, noise=0.05, seed=2,
    )  # fmt: skip
    sigma = json.loads(Path(result.transforms_path).read_text())["settings"]["noise_sigma"]
    assert sigma == pytest.approx(5.0)
    data = sitk.GetArrayFromImage(sitk.ReadImage(result.stack_paths[0]))
    stack = sitk.ReadImage(result.stack_paths[0])
    nk, nj, ni = data.shape
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    world = _pixel_world(stack, i.ravel(), j.ravel(), k.ravel())
    centre = ORIGIN + DIRECTION @ np.full(3, 19.5)
    distance = np.abs(world - centre).max(1)  # Chebyshev distance from the cube centre
    inside = data.ravel()[distance < 14.0 - 5.0]  # the PSF (3 sigma < 3 mm) well inside the cube
    outside = data.ravel()[distance > 14.0 + 5.0]
    assert inside.size > 1000 and outside.size > 1000
    # Rician with nu = 100, sigma = 5: nearly Gaussian; background: Rayleigh with mean sigma sqrt(pi/2).
    assert np.std(inside) == pytest.approx(5.0, rel=0.08)
    assert np.mean(inside) == pytest.approx(np.sqrt(100.0**2 + 5.0**2), abs=0.5)
    assert np.mean(outside) == pytest.approx(5.0 * np.sqrt(np.pi / 2), rel=0.08)


def test_naive_average_normalizes_and_tracks_the_volume(tmp_path, smooth):
    volume, mask = smooth
    result = simulate_stacks(
        volume, mask, tmp_path, n_stacks=3, in_plane=1.0, thickness=2.0, max_rotation_deg=0.0,
        max_translation_mm=0.0, noise=0.0,
    )  # fmt: skip
    average = naive_average(result.stack_paths, volume)
    assert average.GetSize() == volume.GetSize()
    inside = sitk.GetArrayFromImage(mask) > 0
    avg, ref = sitk.GetArrayFromImage(average)[inside], sitk.GetArrayFromImage(volume)[inside]
    assert np.corrcoef(avg, ref)[0, 1] > 0.9
    # A stack with 3x the intensity is normalized away (up to the common scale, the mean median).
    brighter = tmp_path / "brighter.nii.gz"
    sitk.WriteImage(sitk.ReadImage(result.stack_paths[1]) * 3.0, str(brighter))
    scaled = naive_average([result.stack_paths[0], str(brighter), result.stack_paths[2]], volume)
    ratio = sitk.GetArrayFromImage(scaled)[inside] / sitk.GetArrayFromImage(average)[inside]
    assert ratio.std() < 1e-4 * ratio.mean()
    plain = naive_average(result.stack_paths[:1], volume)
    assert np.corrcoef(sitk.GetArrayFromImage(plain)[inside], avg)[0, 1] < 0.9999  # averaging does something


@pytest.mark.parametrize(
    "settings",
    [
        {"max_rotation_deg": 120.0},
        {"dropout": 1.5},
        {"thickness": 0.0},
        {"n_stacks": 0},
        {"replaced": -0.1},
        {"dropout": 0.4, "replaced": 0.3, "blurred": 0.4},
        {"stack_intensity_scale": 0.0},
        {"bias_field": 1.0},
    ],
)
def test_bad_settings_are_input_errors(tmp_path, smooth, settings):
    volume, mask = smooth
    with pytest.raises(InputError):
        simulate_stacks(volume, mask, tmp_path, **settings)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not (ATLAS / "SB_GA25_notoperated_T2w.nii.gz").exists(), reason="atlas data absent")
def test_atlas_stack(tmp_path):
    volume = sitk.ReadImage(str(ATLAS / "SB_GA25_notoperated_T2w.nii.gz"))
    mask = sitk.ReadImage(str(ATLAS / "SB_GA25_notoperated_brainmask.nii.gz"))
    result = simulate_stacks(volume, mask, tmp_path, n_stacks=1, seed=0)
    stack = read_stacks(result.stack_paths, result.mask_paths)[0]
    brain = sitk.GetArrayFromImage(volume)[sitk.GetArrayFromImage(mask) > 0]
    # Same anatomy: the simulated mask holds about the brain's volume, with its intensities.
    voxel_ml = np.prod(stack.spacing) / 1000.0
    brain_ml = brain.size * np.prod(volume.GetSpacing()) / 1000.0
    assert stack.mask.sum() * voxel_ml == pytest.approx(brain_ml, rel=0.1)
    assert np.median(stack.data[stack.mask]) == pytest.approx(np.median(brain), rel=0.1)
    assert stack.affine[2, 2] == pytest.approx(3.0) and stack.thickness == 3.0


#: Motion, drop-outs and noise shared by the runs without and with the other outliers below.
OUTLIER_CASE = dict(
    n_stacks=2,
    in_plane=1.0,
    thickness=2.0,
    max_rotation_deg=4.0,
    max_translation_mm=1.5,
    dropout=0.1,
    seed=11,
)


def _arrays(paths: list[str]) -> list[np.ndarray]:
    return [sitk.GetArrayFromImage(sitk.ReadImage(path)) for path in paths]


@pytest.fixture(scope="module")
def outlier_runs(tmp_path_factory: pytest.TempPathFactory, smooth):
    """The same case with drop-outs only ("clean") and with replaced and blurred slices too."""
    volume, mask = smooth
    out = tmp_path_factory.mktemp("outliers")
    runs = {}
    for noise in (0.0, 0.03):
        for name, extra in (("clean", {}), ("outliers", {"replaced": 0.2, "blurred": 0.15})):
            runs[name, noise] = simulate_stacks(
                volume, mask, out / f"{name}_{noise}", noise=noise, **OUTLIER_CASE, **extra
            )
    return runs


def _slices(result) -> list[list[dict]]:
    return [stack["slices"] for stack in read_transforms(result.transforms_path)["stacks"]]


def test_outliers_are_flagged_once_and_leave_the_rest_unchanged(outlier_runs):
    clean, corrupted = outlier_runs["clean", 0.03], outlier_runs["outliers", 0.03]
    masks = _arrays(corrupted.mask_paths)
    for a, b in zip(masks, _arrays(clean.mask_paths), strict=True):
        np.testing.assert_array_equal(a, b)
    for s, (a, b) in enumerate(zip(_arrays(clean.stack_paths), _arrays(corrupted.stack_paths), strict=True)):
        slices, clean_slices = _slices(corrupted)[s], _slices(clean)[s]
        nk = len(slices)
        flags = np.array([[sl["dropout"], sl["replaced"], sl["blurred"]] for sl in slices])
        assert flags.sum(1).max() == 1  # at most one corruption per slice
        np.testing.assert_array_equal(flags.sum(0), [round(f * nk) for f in (0.1, 0.2, 0.15)])
        has_brain = masks[s].any(axis=(1, 2))
        assert has_brain[flags[:, 1] | flags[:, 2]].all()  # outliers fall where the mask has brain
        for sl, clean_sl in zip(slices, clean_slices, strict=True):
            # The true motion stays recorded; only the flags and their details are added.
            for key in ("centre", "rotation", "translation"):
                assert sl[key] == clean_sl[key]
            assert not (clean_sl["replaced"] or clean_sl["blurred"])
            assert ("replaced_shift_mm" in sl) == sl["replaced"] and ("blur" in sl) == sl["blurred"]
        # Same noise draws: every slice neither replaced nor blurred is bit for bit the clean run's.
        assert [sl["dropout"] for sl in slices] == [sl["dropout"] for sl in clean_slices]
        kept = ~(flags[:, 1] | flags[:, 2])
        np.testing.assert_array_equal(a[kept], b[kept])
        assert not np.allclose(a[~kept], b[~kept], atol=1.0)


def test_replaced_slice_shows_the_anatomy_along_its_normal(outlier_runs, smooth):
    volume, _ = smooth
    clean, corrupted = outlier_runs["clean", 0.0], outlier_runs["outliers", 0.0]
    sigma = np.array([1.2, 1.2, OUTLIER_CASE["thickness"]]) * FWHM_TO_SIGMA
    values_range = float(np.ptp(sitk.GetArrayFromImage(volume)))
    compared, with_anatomy = 0, 0
    rng = np.random.default_rng(0)
    for s, slices in enumerate(_slices(corrupted)):
        stack = sitk.ReadImage(corrupted.stack_paths[s])
        data, clean_data = sitk.GetArrayFromImage(stack), _arrays(clean.stack_paths)[s]
        direction = np.asarray(stack.GetDirection()).reshape(3, 3)
        nk, nj, ni = data.shape
        for sl in (sl for sl in slices if sl["replaced"]):
            k, shift = sl["k"], sl["replaced_shift_mm"]
            assert 8.0 <= abs(shift) <= 20.0
            assert np.sign(shift) == np.sign((nk - 1) / 2.0 - k) or k == (nk - 1) / 2.0  # towards the middle
            jj, ii = np.meshgrid(np.arange(0, nj, 2), np.arange(0, ni, 2), indexing="ij")
            rotation = Rotation.from_rotvec(sl["rotation"]).as_matrix()
            centre = np.asarray(sl["centre"])
            moved = (_pixel_world(stack, ii.ravel(), jj.ravel(), k) - centre) @ rotation.T + centre
            moved += np.asarray(sl["translation"]) + shift * rotation @ direction[:, 2]
            # Pixels whose PSF support stays inside the volume (the reference integral needs it).
            index = (moved - ORIGIN) @ DIRECTION / SPACING
            inside = np.all((index > 3.0) & (index < SIZE - 4.0), axis=1)
            if inside.sum() > 20:
                chosen = rng.choice(np.nonzero(inside)[0], size=20, replace=False)
                expected = direct_psf(volume, moved[chosen], rotation @ direction, sigma)
                got = data[k, jj.ravel()[chosen], ii.ravel()[chosen]]
                assert np.abs(got - expected).max() < 0.01 * values_range
                compared += 1
                with_anatomy += expected.max() > 0.2 * values_range
            assert np.abs(data[k] - clean_data[k]).max() > 0.2 * values_range
    # Some replaced slices land beyond this small phantom; enough of them show its anatomy.
    assert compared >= 6 and with_anatomy >= 4, (compared, with_anatomy)


def _high_frequency_power(image: np.ndarray, pixel_mm: float, cutoff: float = 0.2) -> float:
    """Power of a slice (nj, ni) at spatial frequencies above ``cutoff`` cycles/mm (wavelengths < 5 mm)."""
    power = np.abs(np.fft.fft2(image)) ** 2
    fj, fi = (np.fft.fftfreq(n, d=pixel_mm) for n in image.shape)
    return float(power[np.hypot(*np.meshgrid(fj, fi, indexing="ij")) > cutoff].sum())


def test_blurred_slice_loses_high_frequencies(outlier_runs):
    clean, corrupted = outlier_runs["clean", 0.0], outlier_runs["outliers", 0.0]
    checked = 0
    for s, slices in enumerate(_slices(corrupted)):
        data, clean_data = _arrays(corrupted.stack_paths)[s], _arrays(clean.stack_paths)[s]
        for sl in (sl for sl in slices if sl["blurred"]):
            blur, k = sl["blur"], sl["k"]
            assert 5 <= blur["positions"] <= 9 and 5.0 <= abs(blur["rotation_deg"]) <= 10.0
            assert 2.0 <= np.linalg.norm(blur["translation_mm"]) <= 4.0
            # In-plane: the translation is orthogonal to the slice normal.
            stack = sitk.ReadImage(corrupted.stack_paths[s])
            normal = np.asarray(stack.GetDirection()).reshape(3, 3)[:, 2]
            assert abs(np.dot(blur["translation_mm"], normal)) < 1e-9
            # The same anatomy, smeared: the same total signal, less power at fine scales.
            assert data[k].sum() == pytest.approx(clean_data[k].sum(), rel=0.02)
            assert np.corrcoef(data[k].ravel(), clean_data[k].ravel())[0, 1] > 0.9
            pixel = OUTLIER_CASE["in_plane"]
            ratio = _high_frequency_power(data[k], pixel) / _high_frequency_power(clean_data[k], pixel)
            assert ratio < 0.8, ratio
            checked += 1
    assert checked >= 2


def test_stack_intensity_scale_multiplies_the_last_stack(tmp_path, outlier_runs, smooth):
    volume, mask = smooth
    scaled = simulate_stacks(volume, mask, tmp_path, noise=0.03, stack_intensity_scale=1.8, **OUTLIER_CASE)
    clean = outlier_runs["clean", 0.03]
    first, last = _arrays(scaled.stack_paths)
    clean_first, clean_last = _arrays(clean.stack_paths)
    np.testing.assert_array_equal(first, clean_first)
    np.testing.assert_allclose(last, 1.8 * clean_last, rtol=1e-6)  # noise included: a receiver gain
    record = read_transforms(scaled.transforms_path)
    assert [stack["intensity_scale"] for stack in record["stacks"]] == [1.0, 1.8]
    assert record["settings"]["stack_intensity_scale"] == 1.8


def test_bias_field_is_smooth_with_the_stated_amplitude(tmp_path):
    volume, mask = cube_volume(100.0)
    common = dict(n_stacks=2, in_plane=1.0, thickness=2.0, max_rotation_deg=0.0, max_translation_mm=0.0)
    clean = simulate_stacks(volume, mask, tmp_path / "clean", noise=0.0, **common)
    biased = simulate_stacks(volume, mask, tmp_path / "bias", noise=0.0, bias_field=0.3, **common)
    # The mask's box (voxel centres), independently of the simulator.
    kk, jj, ii = np.nonzero(sitk.GetArrayFromImage(mask))
    box = _pixel_world(
        mask, np.array([ii.min(), ii.max()]), np.array([jj.min(), jj.max()]), [kk.min(), kk.max()]
    )
    lo, hi = box.min(0), box.max(0)
    fields = []
    for s, record in enumerate(read_transforms(biased.transforms_path)["stacks"]):
        parameters = record["bias_field"]
        assert parameters["amplitude"] == 0.3
        np.testing.assert_allclose(parameters["centre"], (lo + hi) / 2, atol=1e-9)
        # Over a dense grid of the box the field spans at most 1 +/- 0.3 and reaches a bound.
        grid = np.stack(np.meshgrid(*(np.linspace(a, b, 41) for a, b in zip(lo, hi, strict=True))), -1)
        deviation = np.abs(bias_multiplier(grid.reshape(-1, 3), parameters) - 1.0).max()
        assert 0.3 * 0.98 < deviation <= 0.3 + 1e-9
        # Seen in the data: the ratio to the clean stack, a quadratic polynomial of the pixel position.
        stack = sitk.ReadImage(biased.stack_paths[s])
        ratio_image, clean_data = sitk.GetArrayFromImage(stack), _arrays(clean.stack_paths)[s]
        k, j, i = np.nonzero(clean_data > 1.0)
        ratio = ratio_image[k, j, i] / clean_data[k, j, i]
        world = _pixel_world(stack, i, j, k)
        u = (world - world.mean(0)) / 10.0
        design = np.column_stack(
            [np.ones(len(u)), u, u**2, u[:, 0] * u[:, 1], u[:, 0] * u[:, 2], u[:, 1] * u[:, 2]]
        )
        coefficients, *_ = np.linalg.lstsq(design, ratio, rcond=None)
        assert np.abs(design @ coefficients - ratio).max() < 1e-4
        inside = np.all((world >= lo) & (world <= hi), axis=1)
        assert 0.2 < np.abs(ratio[inside] - 1.0).max() <= 0.3 + 1e-4
        fields.append(ratio_image)
    assert not np.allclose(fields[0], fields[1], rtol=0.05)  # a different field per stack


def test_command_line_passes_the_outlier_options(tmp_path, smooth):
    volume, mask = smooth
    sitk.WriteImage(volume, str(tmp_path / "volume.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    out = tmp_path / "out"
    code = cli.main(
        [
            "simulate", "--volume", str(tmp_path / "volume.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz"),
            "--output-dir", str(out), "--n-stacks", "2", "--in-plane", "2", "--replaced", "0.2",
            "--blurred", "0.2", "--stack-intensity-scale", "1.8", "--bias-field", "0.25",
            "--stack-misalignment-deg", "4", "--stack-misalignment-mm", "2", "--seed", "3",
            "--motion", "trajectory", "--jumps", "2", "--slice-order", "descending",
        ]
    )  # fmt: skip
    assert code == 0
    record = read_transforms(out / "transforms.json")
    settings = record["settings"]
    assert (settings["replaced"], settings["blurred"]) == (0.2, 0.2)
    assert (settings["stack_intensity_scale"], settings["bias_field"], settings["seed"]) == (1.8, 0.25, 3)
    assert (settings["stack_misalignment_deg"], settings["stack_misalignment_mm"]) == (4.0, 2.0)
    assert (settings["motion"], settings["jumps"], settings["slice_order"]) == ("trajectory", 2, "descending")
    assert [sl["acquisition_rank"] for sl in record["stacks"][0]["slices"]][-1] == 0
    assert record["stacks"][1]["intensity_scale"] == 1.8
    assert all(stack["bias_field"]["amplitude"] == 0.25 for stack in record["stacks"])
    assert any(sl["replaced"] for stack in record["stacks"] for sl in stack["slices"])


def test_a_trajectory_is_smooth_in_acquisition_time_with_its_jumps_and_the_sidecar_gives_the_order(
    smooth, tmp_path
):
    """Slices acquired one after the other move alike except at a jump; neighbours in space (odd and
    even slices, acquired half a stack apart) do not; the sidecar's SliceTiming gives that order."""
    volume, mask = smooth
    result = simulate_stacks(
        volume, mask, tmp_path, n_stacks=1, in_plane=2.0, thickness=2.0, max_rotation_deg=10.0,
        max_translation_mm=5.0, motion="trajectory", jumps=1, seed=2,
    )  # fmt: skip
    slices = json.loads(Path(result.transforms_path).read_text())["stacks"][0]["slices"]
    timing = json.loads(Path(result.stack_paths[0].replace(".nii.gz", ".json")).read_text())["SliceTiming"]
    ranks = np.array([s["acquisition_rank"] for s in slices])
    np.testing.assert_array_equal(np.argsort(timing, kind="stable"), np.argsort(ranks, kind="stable"))
    assert ranks[1] > ranks[2]  # interleaved: slice 3 (1-based) before slice 2
    in_time = np.argsort(ranks)
    rotations = Rotation.from_rotvec([slices[k]["rotation"] for k in in_time])
    steps = np.degrees((rotations[1:] * rotations[:-1].inv()).magnitude())
    spatial = Rotation.from_rotvec([s["rotation"] for s in slices])
    spatial_steps = np.degrees((spatial[1:] * spatial[:-1].inv()).magnitude())
    assert np.median(steps) < 0.4 * np.median(spatial_steps)
    assert steps.max() > 4 * np.median(steps)  # the jump
    components = np.degrees([s["rotation"] for s in slices])
    assert np.abs(components).max() == pytest.approx(10.0, rel=1e-6)
