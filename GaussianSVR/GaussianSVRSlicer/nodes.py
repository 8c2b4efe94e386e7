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
from vtk.util.numpy_support import numpy_to_vtk

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_FLIP = np.array([-1.0, -1.0, 1.0])
#: Sphere tessellation of one ellipsoid glyph (theta, phi).
GLYPH_RESOLUTION = (12, 8)
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
    """The engine's Gaussians .npz (LPS or RAS, as its ``space`` entry says) in RAS."""
    with np.load(path, allow_pickle=False) as npz:
        space = str(npz["space"]) if "space" in npz.files else "LPS"
        means = np.asarray(npz["means"], dtype=np.float64).reshape(-1, 3)
        covariances = np.asarray(npz["covariances"], dtype=np.float64).reshape(-1, 3, 3)
        intensities = np.asarray(npz["intensities"], dtype=np.float64).reshape(-1)
    if space == "LPS":
        # x -> F x with F = diag(-1, -1, 1): means flip, covariances become F C F.
        means = means * _FLIP
        covariances = covariances * np.outer(_FLIP, _FLIP)
    elif space != "RAS":
        raise ValueError(f"{path}: unknown coordinate system {space!r}")
    return Gaussians(means, covariances, intensities)


def glyph_selection(gaussians: Gaussians, max_count: int) -> np.ndarray:
    """Indices of the at most ``max_count`` Gaussians carrying the most signal, largest first.

    The signal of one Gaussian over space is |c| (2 pi)^(3/2) sqrt(det C): rank by |c| sqrt(det C).
    """
    determinants = np.clip(np.linalg.det(gaussians.covariances), 0.0, None)
    mass = np.abs(gaussians.intensities) * np.sqrt(determinants)
    count = min(max_count, len(mass))
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    chosen = np.argpartition(-mass, count - 1)[:count]
    return chosen[np.argsort(-mass[chosen], kind="stable")]


def _sqrt_psd(matrices: np.ndarray) -> np.ndarray:
    """Symmetric square roots (N, 3, 3) of symmetric positive semi-definite matrices (N, 3, 3)."""
    values, vectors = np.linalg.eigh(0.5 * (matrices + np.swapaxes(matrices, 1, 2)))
    roots = np.sqrt(np.clip(values, 0.0, None))
    return np.einsum("nij,nj,nkj->nik", vectors, roots, vectors)


def ellipsoid_polydata(gaussians: Gaussians, scale: float, max_count: int) -> vtk.vtkPolyData:
    """Ellipsoid surfaces of the selected Gaussians: semi-axes ``scale`` standard deviations long."""
    chosen = glyph_selection(gaussians, max_count)
    centres = vtk.vtkPoints()
    centres.SetData(numpy_to_vtk(np.ascontiguousarray(gaussians.means[chosen]), deep=True))
    # vtkTensorGlyph maps the unit sphere through the tensor: sqrt(C) turns it into the 1-sigma ellipsoid.
    tensors = numpy_to_vtk(
        np.ascontiguousarray(_sqrt_psd(gaussians.covariances[chosen]).reshape(-1, 9)), deep=True
    )
    tensors.SetName("sqrtCovariance")
    points = vtk.vtkPolyData()
    points.SetPoints(centres)
    points.GetPointData().SetTensors(tensors)

    sphere = vtk.vtkSphereSource()
    sphere.SetRadius(1.0)
    sphere.SetThetaResolution(GLYPH_RESOLUTION[0])
    sphere.SetPhiResolution(GLYPH_RESOLUTION[1])
    glyph = vtk.vtkTensorGlyph()
    glyph.SetInputData(points)
    glyph.SetSourceConnection(sphere.GetOutputPort())
    glyph.ExtractEigenvaluesOff()
    glyph.ColorGlyphsOff()
    glyph.ClampScalingOff()
    glyph.SetScaleFactor(scale)
    glyph.Update()
    surface = vtk.vtkPolyData()
    surface.DeepCopy(glyph.GetOutput())
    return surface


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
