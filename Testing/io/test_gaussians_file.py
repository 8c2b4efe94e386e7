"""Tests of GaussianSVRLib.io.gaussians_file: the .npz format and the ellipsoid glyphs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from testkit import gaussians, listing
from vtkmodules.util.numpy_support import vtk_to_numpy
from vtkmodules.vtkFiltersCore import vtkPolyDataConnectivityFilter
from vtkmodules.vtkIOXML import vtkXMLPolyDataReader

from GaussianSVRLib.errors import InputError
from GaussianSVRLib.io import gaussians_file


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
