"""The region of interest: six numbers, or a markups ROI file that real Slicer (slicer-core) wrote."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from GaussianSVRLib.errors import InputError
from GaussianSVRLib.geometry import LPS_TO_RAS
from GaussianSVRLib.io.roi import box_from_corners, box_mask, read_slicer_roi

FLIP = LPS_TO_RAS[:3, :3]


def test_corners_in_either_order_give_one_box():
    box = box_from_corners([10, -5, 0, -10, 5, 20])
    assert np.allclose(box.centre, [0, 0, 10]) and np.allclose(box.size, [20, 10, 20])
    assert box.contains(np.array([[9.9, 4.9, 0.1], [0, 0, 10]])).all()
    assert not box.contains(np.array([[10.1, 0, 10], [0, -5.1, 10], [0, 0, 20.1]])).any()


@pytest.mark.parametrize("values", [[0, 0, 0, 10, 0, 10], [0, 0, 0, 1, 2], [0, 0, 0, 1, 2, float("nan")]])
def test_bad_corners_are_refused(values):
    with pytest.raises(InputError, match="--roi"):
        box_from_corners(values)


def test_the_mask_of_a_box_holds_the_voxels_inside():
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-10, -10, -6]
    mask = box_mask(box_from_corners([-5, -5, -5, 5, 5, 5]), affine, (5, 11, 11))
    # x, y: voxels at -10, -8, ..., 10: -4 to 4 inside (5 of 11); z: -6, -3, 0, 3, 6: 3 of 5 inside.
    assert mask.shape == (5, 11, 11) and mask.sum() == 5 * 5 * 3
    assert mask[2, 5, 5] and not mask[0, 5, 5] and not mask[2, 0, 5]


@pytest.mark.parametrize("system", ["LPS", "RAS"])
def test_a_roi_saved_by_slicer_reads_back_in_lps(tmp_path, system):
    """A rotated ROI node written by Slicer's own JSON storage node, in either coordinate system: the box
    read holds exactly the points that Slicer says are in the ROI."""
    import slicer
    import vtk

    scene = slicer.vtkMRMLScene()
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    centre_ras, size = np.array([12.0, -30.0, 8.0]), np.array([40.0, 25.0, 60.0])
    rotation = Rotation.from_rotvec([0.3, -0.5, 0.8]).as_matrix()
    matrix = vtk.vtkMatrix4x4()
    for i in range(3):
        for j in range(3):
            matrix.SetElement(i, j, rotation[i, j])
        matrix.SetElement(i, 3, centre_ras[i])
    roi.SetAndObserveObjectToNodeMatrix(matrix)
    roi.SetSize(*size)
    storage = slicer.vtkMRMLMarkupsROIJsonStorageNode()
    scene.AddNode(storage)
    storage.SetCoordinateSystem(getattr(slicer.vtkMRMLStorageNode, f"CoordinateSystem{system}"))
    path = tmp_path / "box.mrk.json"
    storage.SetFileName(str(path))
    assert storage.WriteData(roi)
    assert f'"coordinateSystem": "{system}"' in path.read_text()
    box = read_slicer_roi(path)
    assert np.allclose(box.centre, FLIP @ centre_ras, atol=1e-6)
    assert np.allclose(box.size, size)
    points_ras = centre_ras + np.random.default_rng(0).uniform(-25, 25, (400, 3))
    slicer_says = np.array([roi.IsPointInROIWorld(tuple(p)) for p in points_ras])
    assert 50 < slicer_says.sum() < 350
    assert np.array_equal(box.contains(points_ras @ FLIP), slicer_says)


def roi_json(**fields: object) -> str:
    return json.dumps({"markups": [{"type": "ROI", "center": [0, 0, 0], "size": [1, 1, 1]} | fields]})


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("not json", "not a readable markups JSON"),
        ('{"markups": [{"type": "Curve"}]}', "holds no markups ROI"),
        (roi_json(center=[0, 0]), '"center" must be 3'),
        (roi_json(size=[1, -1, 1]), "flat"),
        (roi_json(coordinateSystem="IJK"), "IJK"),
        (roi_json(orientation=[1, 0, 0, 0, 2, 0, 0, 0, 1]), "not a rotation"),
    ],
)
def test_bad_roi_files_are_refused_by_name(tmp_path, content, problem):
    path = tmp_path / "roi.mrk.json"
    path.write_text(content)
    with pytest.raises(InputError, match=problem) as raised:
        read_slicer_roi(path)
    assert str(path) in str(raised.value)
