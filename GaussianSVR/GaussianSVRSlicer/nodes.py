"""Engine files -> MRML nodes: the checkpoint volume into one volume node, the Gaussians into one
ellipsoid model node, both updated in place; and the record that lets a failed run undo its changes.

Slicer's world is RAS; the engine's files are LPS (SimpleITK geometry, ``"space": "LPS"`` in the
.npz). A voxel (i, j, k) of a file lands at ``LPS_TO_RAS @ affine_lps @ (i, j, k, 1)``.
Uses only MRML, vtk, numpy and SimpleITK: it runs with the ``slicer-core`` wheel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from GaussianSVRLib.errors import InputError
from GaussianSVRLib.io import gaussians_file

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_FLIP = np.array([-1.0, -1.0, 1.0])
GLYPH_COLOR = (1.0, 0.55, 0.1)


def image_ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """Voxel (i, j, k) -> RAS affine (4, 4) of a 3-D SimpleITK image (whose geometry is LPS)."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ affine


def read_volume_file(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A 3-D image file as (voxels (k, j, i), IJK-to-RAS (4, 4))."""
    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: expected a 3-D scalar image")
    return sitk.GetArrayFromImage(image), image_ijk_to_ras(image)


def update_volume_node(node, voxels: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    """Put voxels (k, j, i) and geometry into an existing volume node (in world: no parent transform)."""
    if voxels.dtype == np.int64:
        voxels = voxels.astype(np.int32)  # Slicer refuses 64-bit integer voxels
    node.SetAndObserveTransformNodeID(None)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, voxels)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()


def load_volume_into(node, path: str | Path) -> None:
    """Load an engine volume file (checkpoint or final) into ``node``, replacing its content."""
    voxels, ijk_to_ras = read_volume_file(path)
    update_volume_node(node, voxels, ijk_to_ras)


@dataclass(frozen=True)
class Gaussians:
    """N Gaussians in RAS mm: means (N, 3), covariances (N, 3, 3) in mm^2, intensities (N,)."""

    means: np.ndarray
    covariances: np.ndarray
    intensities: np.ndarray

    def __len__(self) -> int:
        return len(self.intensities)


def read_gaussians(path: str | Path) -> Gaussians:
    """A Gaussians file of the engine (LPS, io/gaussians_file.py) in RAS; ValueError for a bad file."""
    try:
        arrays = gaussians_file.load_gaussians(path)
    except InputError as error:
        raise ValueError(str(error)) from None
    # x -> F x with F = diag(-1, -1, 1): means flip, covariances become F C F.
    means = np.asarray(arrays["means"], dtype=np.float64) * _FLIP
    covariances = np.asarray(arrays["covariances"], dtype=np.float64) * np.outer(_FLIP, _FLIP)
    return Gaussians(means, covariances, np.asarray(arrays["intensities"], dtype=np.float64))


def ellipsoid_polydata(gaussians: Gaussians, scale: float, max_count: int) -> vtk.vtkPolyData:
    """The engine's ellipsoids (gaussians_file.ellipsoid_polydata: semi-axes ``scale`` standard
    deviations long, the ``max_count`` Gaussians carrying the most signal), here in RAS."""
    return gaussians_file.ellipsoid_polydata(
        gaussians.means, gaussians.covariances, gaussians.intensities, max_count=max_count, scale=scale
    )


def update_model_node(node, surface: vtk.vtkPolyData) -> None:
    """Replace the model's mesh (in world) and make sure it is shown in 3-D and in the slice views."""
    node.SetAndObserveTransformNodeID(None)
    node.SetAndObserveMesh(surface)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetColor(*GLYPH_COLOR)
        display.SetScalarVisibility(False)
        display.SetVisibility2D(True)


def set_model_visibility(node, visible: bool) -> None:
    display = node.GetDisplayNode() if node is not None else None
    if display is not None:
        display.SetVisibility(visible)


class SceneChanges:
    """What a run did to the scene, so that a failed run can leave the scene as it was.

    Call ``created(node)`` for nodes the run adds and ``will_modify(node)`` before the run first
    changes an existing volume or model node; ``rollback()`` removes the former and restores the latter.
    """

    def __init__(self, scene) -> None:
        self.scene = scene
        self._created: list = []
        self._saved: dict[str, tuple] = {}

    def created(self, node) -> None:
        self._created.append(node)

    def will_modify(self, node) -> None:
        if node in self._created or node.GetID() in self._saved:
            return
        transform_id = node.GetTransformNodeID()
        if node.IsA("vtkMRMLVolumeNode"):
            matrix = vtk.vtkMatrix4x4()
            node.GetIJKToRASMatrix(matrix)
            self._saved[node.GetID()] = (
                node,
                _copy(node.GetImageData(), vtk.vtkImageData),
                matrix,
                transform_id,
            )
        elif node.IsA("vtkMRMLModelNode"):
            self._saved[node.GetID()] = (node, _copy(node.GetMesh(), vtk.vtkPolyData), None, transform_id)

    def rollback(self) -> None:
        for node in reversed(self._created):
            _remove_with_display_nodes(self.scene, node)
        for node, data, matrix, transform_id in self._saved.values():
            if node.IsA("vtkMRMLVolumeNode"):
                node.SetIJKToRASMatrix(matrix)
                node.SetAndObserveImageData(data)
            else:
                node.SetAndObserveMesh(data)
            node.SetAndObserveTransformNodeID(transform_id)
        self._created.clear()
        self._saved.clear()


def _remove_with_display_nodes(scene, node) -> None:
    """Remove a node and the display and storage nodes it created (RemoveNode alone leaves them)."""
    if not scene.IsNodePresent(node):
        return
    helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    helpers.append(node.GetStorageNode())
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and scene.IsNodePresent(helper):
            scene.RemoveNode(helper)


def _copy(data, data_class):
    if data is None:
        return None
    copy = data_class()
    copy.DeepCopy(data)
    return copy


def rotate_slice_views(slice_nodes, volume) -> None:
    """Turn every slice view to the volume's own planes (its voxel axes), so that the reconstruction is
    read in its planes and not cut obliquely."""
    for slice_node in slice_nodes:
        slice_node.RotateToVolumePlane(volume)


def scanner_to_standard_ras(atlas_to_scanner_lps: np.ndarray) -> np.ndarray:
    """The RAS transform (4, 4, to parent) that carries scanner-space nodes (the stacks, the ellipsoids)
    onto an atlas-space volume: the inverse of the report's ``atlas_to_scanner`` (LPS), in RAS."""
    return LPS_TO_RAS @ np.linalg.inv(np.asarray(atlas_to_scanner_lps, dtype=np.float64)) @ LPS_TO_RAS


def place_under_transform(scene, name: str, to_parent_ras: np.ndarray, children) -> object:
    """A new linear transform node (``to_parent_ras`` (4, 4)) with the given nodes under it."""
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(to_parent_ras))
    for child in children:
        child.SetAndObserveTransformNodeID(transform.GetID())
    return transform
