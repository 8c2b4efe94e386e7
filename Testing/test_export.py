"""Tests of GaussianSVRLib.export: atomic writers, Gaussians files, ellipsoid glyphs, montages."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation
from vtkmodules.util.numpy_support import vtk_to_numpy
from vtkmodules.vtkFiltersCore import vtkPolyDataConnectivityFilter
from vtkmodules.vtkIOXML import vtkXMLPolyDataReader

from GaussianSVRLib.errors import InputError
from GaussianSVRLib.export import montage
from GaussianSVRLib.geometry import apply_affine, image_affine
from GaussianSVRLib.io import gaussians_file, outputs

OBLIQUE = Rotation.from_rotvec([0.2, -0.4, 0.3]).as_matrix()
# Columns: i -> inferior, j -> patient left, k -> anterior (a permutation with flips, det -1).
PERMUTED = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]])


def make_image(
    size=(12, 10, 6), spacing=(0.8, 0.9, 3.0), direction=OBLIQUE, origin=(-12.5, 30.25, 7.0), seed=0
) -> sitk.Image:
    values = np.random.default_rng(seed).normal(100.0, 20.0, size[::-1]).astype(np.float32)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(np.asarray(direction, dtype=np.float64).ravel().tolist())
    return image


def phantom(region, size, spacing, direction, background=100.0, bright=1000.0) -> sitk.Image:
    """An image centred on the world origin, ``bright`` where region(LPS points (..., 3)) holds."""
    direction = np.asarray(direction, dtype=np.float64)
    image = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin((-(direction @ np.diag(spacing) @ ((np.asarray(size) - 1) / 2.0))).tolist())
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    world = apply_affine(image_affine(image), np.stack([i, j, k], axis=-1).astype(np.float64))
    array = np.where(region(world), bright, background).astype(np.float32)
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(image)
    return result


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def assert_same_geometry(a: sitk.Image, b: sitk.Image, atol: float) -> None:
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=atol)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=atol)


# ---------------------------------------------------------------- images and JSON


@pytest.mark.parametrize("name, atol", [("out.nii.gz", 1e-5), ("out.nii", 1e-5), ("out.nrrd", 1e-9)])
def test_image_round_trip_keeps_geometry_and_values(tmp_path, name, atol):
    image = make_image()
    outputs.write_image(image, tmp_path / name)
    assert listing(tmp_path) == [name]
    back = sitk.ReadImage(str(tmp_path / name))
    assert back.GetSize() == image.GetSize()
    assert_same_geometry(back, image, atol)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_nii_gz_is_gzip_compressed(tmp_path):
    outputs.write_image(make_image(), tmp_path / "out.nii.gz")
    assert (tmp_path / "out.nii.gz").read_bytes()[:2] == b"\x1f\x8b"


def test_two_file_formats_are_refused(tmp_path):
    with pytest.raises(InputError):
        outputs.write_image(make_image(), tmp_path / "out.nhdr")
    assert listing(tmp_path) == []


def test_json_converts_nan_and_numpy(tmp_path):
    data = {"psnr": np.float32(31.5), "ssim": float("nan"), "loss": [1.0, float("inf"), -float("inf")]}
    data["weights"] = np.array([0.5, np.nan])
    data["iterations"] = np.int64(7)
    outputs.write_json(data, tmp_path / "report.json")
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert text.startswith('{\n  "psnr"')
    assert json.loads(text) == {
        "psnr": 31.5,
        "ssim": None,
        "loss": [1.0, None, None],
        "weights": [0.5, None],
        "iterations": 7,
    }


def gaussians(n=20, seed=1):
    rng = np.random.default_rng(seed)
    rotations = Rotation.random(n, random_state=seed).as_matrix()
    sigmas = rng.uniform(0.5, 3.0, (n, 3))
    covariances = np.einsum("nij,nj,nkj->nik", rotations, sigmas**2, rotations)
    means = rng.uniform(-40.0, 40.0, (n, 3))
    intensities = rng.normal(0.0, 1.0, n)
    return means.astype(np.float32), covariances.astype(np.float32), intensities.astype(np.float32)


WRITERS = {
    "image": (lambda path: outputs.write_image(make_image(), path), "out.nii.gz"),
    "json": (lambda path: outputs.write_json({"a": 1}, path), "out.json"),
    "npz": (lambda path: gaussians_file.save_gaussians(path, *gaussians()), "out.npz"),
    "vtp": (lambda path: gaussians_file.write_ellipsoids(path, *gaussians()), "out.vtp"),
    "png": (lambda path: montage.write_montage(make_image(), path), "out.png"),
}


@pytest.mark.parametrize("kind", WRITERS)
def test_write_into_unwritable_folder_raises_and_leaves_nothing(tmp_path, kind):
    write, name = WRITERS[kind]
    (tmp_path / "not_a_folder").write_text("x")
    for folder in (tmp_path / "missing", tmp_path / "not_a_folder"):
        with pytest.raises((OSError, RuntimeError)):
            write(folder / name)
    assert listing(tmp_path) == ["not_a_folder"]


@pytest.mark.parametrize("kind", WRITERS)
def test_failed_rename_removes_temporary_and_keeps_old_file(tmp_path, kind, monkeypatch):
    write, name = WRITERS[kind]
    (tmp_path / name).write_bytes(b"previous")

    def failing_replace(src, dst):
        assert os.path.exists(src) and os.path.dirname(src) == os.path.dirname(dst)
        raise OSError("disk full")

    monkeypatch.setattr(outputs.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path / name)
    assert listing(tmp_path) == [name]
    assert (tmp_path / name).read_bytes() == b"previous"


# ---------------------------------------------------------------- Gaussians files


def test_gaussians_round_trip_with_extra_arrays(tmp_path):
    means, covariances, intensities = gaussians()
    rotations = np.arange(30, dtype=np.float64).reshape(10, 3)
    gaussians_file.save_gaussians(tmp_path / "g.npz", means, covariances, intensities, slice_rotvec=rotations)
    assert listing(tmp_path) == ["g.npz"]
    with np.load(tmp_path / "g.npz") as raw:
        assert str(raw["space"]) == "LPS"
    loaded = gaussians_file.load_gaussians(tmp_path / "g.npz")
    assert sorted(loaded) == ["covariances", "intensities", "means", "slice_rotvec"]
    for key, expected in [("means", means), ("covariances", covariances), ("intensities", intensities)]:
        assert loaded[key].dtype == expected.dtype
        np.testing.assert_array_equal(loaded[key], expected)
    np.testing.assert_array_equal(loaded["slice_rotvec"], rotations)


def test_save_gaussians_checks_shapes(tmp_path):
    means, covariances, intensities = gaussians()
    with pytest.raises(ValueError):
        gaussians_file.save_gaussians(tmp_path / "g.npz", means[:, :2], covariances, intensities)
    with pytest.raises(ValueError):
        gaussians_file.save_gaussians(tmp_path / "g.npz", means, covariances, intensities, space=np.zeros(1))
    assert listing(tmp_path) == []


def test_load_gaussians_reports_bad_files(tmp_path):
    with pytest.raises(InputError):
        gaussians_file.load_gaussians(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(InputError):
        gaussians_file.load_gaussians(tmp_path / "junk.npz")
    means, covariances, intensities = gaussians()
    np.savez(tmp_path / "ras.npz", means=means, covariances=covariances, intensities=intensities, space="RAS")
    with pytest.raises(InputError, match="RAS"):
        gaussians_file.load_gaussians(tmp_path / "ras.npz")
    np.savez(tmp_path / "partial.npz", means=means, space="LPS")
    with pytest.raises(InputError, match="covariances"):
        gaussians_file.load_gaussians(tmp_path / "partial.npz")


# ---------------------------------------------------------------- glyph selection and ellipsoids


def test_select_glyphs_takes_largest_mass():
    sigmas = np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 4.0], [3.0, 3.0, 3.0], [0.5, 0.5, 0.5]])
    intensities = np.array([3.0, -1.0, 0.05, 10.0])
    covariances = np.stack([np.diag(s**2) for s in sigmas])
    mass = np.abs(intensities) * np.prod(sigmas, axis=1)  # 3, 8, 1.35, 1.25
    # Neither intensity alone (3, 0) nor volume alone (2, 1) gives the two largest masses (1, 0).
    assert np.argsort(-mass)[:2].tolist() == [1, 0]
    means = np.zeros((4, 3))
    assert gaussians_file.select_glyphs(means, covariances, intensities, 1).tolist() == [1]
    assert gaussians_file.select_glyphs(means, covariances, intensities, 2).tolist() == [0, 1]
    assert gaussians_file.select_glyphs(means, covariances, intensities, 3).tolist() == [0, 1, 2]
    assert gaussians_file.select_glyphs(means, covariances, intensities, 10).tolist() == [0, 1, 2, 3]
    assert gaussians_file.select_glyphs(means, covariances, intensities, 0).tolist() == []


def test_select_glyphs_puts_non_finite_last():
    covariances = np.stack([np.eye(3)] * 3)
    intensities = np.array([np.nan, 0.1, 0.2])
    assert gaussians_file.select_glyphs(np.zeros((3, 3)), covariances, intensities, 2).tolist() == [1, 2]


def read_vtp(path):
    reader = vtkXMLPolyDataReader()
    reader.SetFileName(str(path))
    reader.Update()
    return reader.GetOutput()


def glyph_pieces(polydata) -> int:
    connectivity = vtkPolyDataConnectivityFilter()
    connectivity.SetInputData(polydata)
    connectivity.SetExtractionModeToAllRegions()
    connectivity.Update()
    return connectivity.GetNumberOfExtractedRegions()


@pytest.mark.parametrize("max_count", [7, 50])
def test_ellipsoid_file_holds_one_glyph_per_selected_gaussian(tmp_path, max_count):
    means, covariances, intensities = gaussians(n=20)
    means = means * 5.0  # far apart: no two glyphs touch
    gaussians_file.write_ellipsoids(tmp_path / "g.vtp", means, covariances, intensities, max_count=max_count)
    assert listing(tmp_path) == ["g.vtp"]
    polydata = read_vtp(tmp_path / "g.vtp")
    expected = min(20, max_count)
    points_per_sphere = (8 - 2) * 8 + 2  # vtkSphereSource at resolution 8: rings without poles, plus poles
    assert polydata.GetNumberOfPoints() == expected * points_per_sphere
    assert glyph_pieces(polydata) == expected
    colours = vtk_to_numpy(polydata.GetPointData().GetScalars())
    assert polydata.GetPointData().GetScalars().GetName() == "intensity"
    keep = gaussians_file.select_glyphs(means, covariances, intensities, max_count)
    np.testing.assert_allclose(np.unique(colours), np.unique(intensities[keep]))


def test_ellipsoid_matches_rotated_anisotropic_gaussian(tmp_path):
    rotation = Rotation.from_rotvec([0.3, -0.5, 0.7]).as_matrix()
    sigma = np.array([1.0, 2.5, 4.0])
    covariance = rotation @ np.diag(sigma**2) @ rotation.T
    mean = np.array([10.0, -5.0, 3.0])
    scale = 1.5
    gaussians_file.write_ellipsoids(
        tmp_path / "g.vtp", mean[None], covariance[None], np.array([2.0]), scale=scale, resolution=41
    )
    points = vtk_to_numpy(read_vtp(tmp_path / "g.vtp").GetPoints().GetData()).astype(np.float64)
    offsets = points - mean
    # Every vertex lies on the scale-sigma surface ...
    mahalanobis = np.sqrt(np.einsum("pi,ij,pj->p", offsets, np.linalg.inv(covariance), offsets))
    np.testing.assert_allclose(mahalanobis, scale, rtol=1e-5)
    # ... and the glyph reaches mean +/- scale * sigma along each principal axis.
    along_axes = offsets @ rotation
    np.testing.assert_allclose(along_axes.max(axis=0), scale * sigma, rtol=5e-3)
    np.testing.assert_allclose(along_axes.min(axis=0), -scale * sigma, rtol=5e-3)
    np.testing.assert_allclose(points.mean(axis=0), mean, atol=0.02)


def test_ellipsoid_file_declares_lps(tmp_path):
    gaussians_file.write_ellipsoids(tmp_path / "g.vtp", *gaussians(n=3))
    space = read_vtp(tmp_path / "g.vtp").GetFieldData().GetAbstractArray("SPACE")
    assert space is not None and space.GetValue(0) == "LPS"


def test_slicer_loads_ellipsoids_in_place(tmp_path):
    import slicer  # slicer-core, a test dependency: real MRML without the application

    means, covariances, intensities = gaussians(n=4)
    gaussians_file.write_ellipsoids(tmp_path / "g.vtp", means, covariances, intensities)
    written = vtk_to_numpy(read_vtp(tmp_path / "g.vtp").GetPoints().GetData())
    scene = slicer.vtkMRMLScene()
    model = scene.AddNewNodeByClass("vtkMRMLModelNode")
    storage = scene.AddNewNodeByClass("vtkMRMLModelStorageNode")
    # Even a storage node set to RAS must follow the file's SPACE marker.
    storage.SetCoordinateSystem(slicer.vtkMRMLStorageNode.CoordinateSystemRAS)
    storage.SetFileName(str(tmp_path / "g.vtp"))
    assert storage.ReadData(model) == 1
    in_slicer = vtk_to_numpy(model.GetMesh().GetPoints().GetData())
    np.testing.assert_allclose(in_slicer, written * np.array([-1.0, -1.0, 1.0]), atol=1e-5)


def test_ellipsoids_of_nothing_are_empty():
    means, covariances, intensities = gaussians(n=5)
    assert (
        gaussians_file.ellipsoid_polydata(means, covariances, intensities, max_count=0).GetNumberOfPoints()
        == 0
    )
    empty = gaussians_file.ellipsoid_polydata(np.zeros((0, 3)), np.zeros((0, 3, 3)), np.zeros(0))
    assert empty.GetNumberOfPoints() == 0


# ---------------------------------------------------------------- montage


def read_png(path) -> np.ndarray:
    image = sitk.ReadImage(str(path))
    assert image.GetDimension() == 2 and image.GetPixelID() == sitk.sitkUInt8
    return sitk.GetArrayFromImage(image)


def png_panels(png: np.ndarray, planes) -> list[np.ndarray]:
    """The panels of a montage PNG, each reduced back to its plane's pixels (one per enlarged block)."""
    factor = montage.display_factor(planes)
    panels, column = [], 0
    for plane in planes:
        rows, columns = plane.shape[0] * factor, plane.shape[1] * factor
        block = png[:rows, column : column + columns]
        assert np.array_equal(block, np.kron(block[::factor, ::factor], np.ones((factor, factor), np.uint8)))
        panels.append(block[::factor, ::factor])
        column += columns + montage.MONTAGE_GAP
    assert column - montage.MONTAGE_GAP == png.shape[1]
    return panels


def bright_side(panel: np.ndarray) -> tuple[str, str]:
    """('top' or 'bottom', 'left' or 'right'): where the bright pixels' centroid is."""
    rows, columns = np.nonzero(panel > 128)
    assert rows.size > 0.1 * panel.size
    vertical = "top" if rows.mean() < (panel.shape[0] - 1) / 2 else "bottom"
    horizontal = "left" if columns.mean() < (panel.shape[1] - 1) / 2 else "right"
    return vertical, horizontal


def left_anterior_superior(world: np.ndarray) -> np.ndarray:
    # LPS: patient left is +x, anterior is -y, superior is +z. The 5 mm margin crosses the centre planes.
    return (world[..., 0] > -5.0) & (world[..., 1] < 5.0) & (world[..., 2] > -5.0)


@pytest.mark.parametrize("direction", [np.eye(3), PERMUTED, OBLIQUE], ids=["identity", "permuted", "oblique"])
def test_montage_orientation_follows_the_patient(tmp_path, direction):
    image = phantom(left_anterior_superior, (36, 32, 12), (1.2, 1.2, 3.5), direction)
    montage.write_montage(image, tmp_path / "m.png")
    assert listing(tmp_path) == ["m.png"]
    png = read_png(tmp_path / "m.png")
    axial, coronal, sagittal = png_panels(png, montage.montage_planes(image))
    assert bright_side(axial) == ("top", "right")  # anterior up, patient left on the right
    assert bright_side(coronal) == ("top", "right")  # superior up, patient left on the right
    assert bright_side(sagittal) == ("top", "left")  # superior up, anterior on the left


def test_montage_pixels_are_square_for_thick_slices(tmp_path):
    image = phantom(left_anterior_superior, (40, 40, 10), (1.0, 1.0, 4.0), np.eye(3))
    axial, coronal, sagittal = montage.montage_planes(image)
    assert axial.shape == (40, 40) and coronal.shape == (40, 40) and sagittal.shape == (40, 40)
    montage.write_montage(image, tmp_path / "m.png")
    side = 40 * montage.display_factor((axial, coronal, sagittal))
    assert side >= montage.MIN_DISPLAY_PIXELS  # small panels are enlarged to be readable
    assert read_png(tmp_path / "m.png").shape == (side, 3 * side + 2 * montage.MONTAGE_GAP)


def test_montage_is_capped_in_size():
    image = phantom(left_anterior_superior, (20, 20, 20), (40.0, 40.0, 40.0), np.eye(3))
    image.SetSpacing((0.5, 0.5, 0.5))  # 10 mm field of view with 0.5 mm pixels: 20 x 20
    assert montage.montage_planes(image)[0].shape == (20, 20)
    big = sitk.Image([2000, 10, 10], sitk.sitkUInt8)
    assert max(montage.montage_planes(big)[0].shape) == montage.MAX_PANEL_PIXELS


def test_montage_passes_through_the_mask_centre(tmp_path):
    def blob(world):
        return np.linalg.norm(world - np.array([12.0, -10.0, 9.0]), axis=-1) < 4.0

    image = phantom(blob, (60, 60, 60), (1.0, 1.0, 1.0), np.eye(3))
    mask = phantom(blob, (20, 20, 20), (2.0, 2.0, 2.0), PERMUTED, background=0, bright=1)  # another grid
    mask = sitk.Cast(mask, sitk.sitkUInt8)
    assert all(np.nanmax(plane) < 1000.0 for plane in montage.montage_planes(image))
    with_mask = montage.montage_planes(image, mask)
    assert all(np.nanmax(plane) > 500.0 for plane in with_mask)
    # Cropped to the mask (8 mm across) plus the margin on both sides, give or take the mask's voxels.
    assert all(26 <= side <= 32 for plane in with_mask for side in plane.shape)
    montage.write_montage(image, tmp_path / "m.png", mask=mask)
    for panel in png_panels(read_png(tmp_path / "m.png"), with_mask):
        assert panel.max() == 255


def test_montage_window_is_1st_to_99th_percentile(tmp_path):
    ramp = np.broadcast_to(np.arange(101, dtype=np.float32), (9, 9, 101)).copy()  # along x, 0..100
    ramp[4, 4, 50] = 1e6  # one outlier must not wash out the picture
    image = sitk.GetImageFromArray(ramp)
    montage.write_montage(image, tmp_path / "m.png")
    axial = png_panels(read_png(tmp_path / "m.png"), montage.montage_planes(image))[0]
    row = axial[0].astype(float)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)
    np.testing.assert_allclose(row[50], 127.5, atol=4)


def test_montage_window_ignores_zero_padding(tmp_path):
    # A small object (0.4 % of the voxels) in zeros: the window must come from the object alone.
    volume = np.zeros((40, 40, 40), dtype=np.float32)
    volume[17:23, 17:23, 17:23] = np.linspace(100.0, 200.0, 6, dtype=np.float32)
    image = sitk.GetImageFromArray(volume)
    montage.write_montage(image, tmp_path / "m.png")
    axial = png_panels(read_png(tmp_path / "m.png"), montage.montage_planes(image))[0]
    # The view is cropped to the non-zero voxels plus the margin: 6 + 2 * 10 pixels.
    assert axial.shape == (26, 26)
    row = axial[13, 10:16].astype(float)
    assert row[0] == 0 and row[-1] == 255 and 60 < row[2] < 160


def test_montage_title_is_drawn_above(tmp_path):
    image = phantom(left_anterior_superior, (30, 30, 10), (1.0, 1.0, 3.0), np.eye(3))
    montage.write_montage(image, tmp_path / "plain.png")
    montage.write_montage(image, tmp_path / "titled.png", title="GaussianSVR iteration 100")
    plain, titled = read_png(tmp_path / "plain.png"), read_png(tmp_path / "titled.png")
    banner = titled.shape[0] - plain.shape[0]
    assert titled.shape[1] == plain.shape[1] and 10 <= banner <= 40
    np.testing.assert_array_equal(titled[banner:], plain)
    ink = titled[:banner] > 128
    assert 50 < ink.sum() < 0.6 * ink.size


def test_montage_title_is_upright(tmp_path):
    image = phantom(left_anterior_superior, (30, 30, 10), (1.0, 1.0, 3.0), np.eye(3))
    montage.write_montage(image, tmp_path / "plain.png")
    montage.write_montage(image, tmp_path / "titled.png", title="T")
    banner = read_png(tmp_path / "titled.png")[: -read_png(tmp_path / "plain.png").shape[0]]
    ink_per_row = (banner > 128).sum(axis=1)
    inked = np.nonzero(ink_per_row)[0]
    assert ink_per_row[inked[0]] == ink_per_row.max() > 2 * ink_per_row[inked[-1]]  # the bar of the T on top
