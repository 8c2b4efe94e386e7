"""MRML input nodes -> files the worker reads: stacks and masks in world (LPS) geometry.

Stacks are written as uncompressed NRRD (exact double-precision geometry, fast); a parent linear
transform is applied to the geometry (the engine sees what the user sees); a non-linear one is refused.
A segmentation mask becomes a label map on its stack's grid; a stack without a mask gets none (the
engine propagates the given masks to it).
Uses only MRML, vtk, numpy and SimpleITK: it runs with the ``slicer-core`` wheel.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from .command import StackFiles

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class InputProblem(ValueError):
    """An input the user has to fix (shown as is)."""


@dataclass(frozen=True)
class StackInput:
    """One row of the stack table: a volume node, an optional mask node and the slice thickness (mm)."""

    volume: object
    mask: object | None
    thickness: float


def default_thickness(volume_node) -> float:
    """Slice thickness to prefill: the spacing along the third (slice) axis."""
    return float(volume_node.GetSpacing()[2])


def world_ijk_to_ras(node) -> np.ndarray:
    """IJK -> world RAS (4, 4) of a volume node, including a linear parent transform."""
    ijk_to_ras = slicer.util.arrayFromVTKMatrix(_ijk_to_ras_matrix(node))
    transform = node.GetParentTransformNode()
    if transform is None:
        return ijk_to_ras
    if not transform.IsTransformToWorldLinear():
        raise InputProblem(
            f"{node.GetName()}: it is under a non-linear transform; harden the transform first "
            "(Data module, right-click the volume, 'Harden transform')"
        )
    to_world = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(to_world)
    return slicer.util.arrayFromVTKMatrix(to_world) @ ijk_to_ras


def volume_to_image(node) -> sitk.Image:
    """A scalar volume node as a SimpleITK image with its world geometry in LPS."""
    if node.GetImageData() is None:
        raise InputProblem(f"{node.GetName()}: the volume has no voxels")
    voxels = slicer.util.arrayFromVolume(node)
    if voxels.ndim != 3:
        raise InputProblem(
            f"{node.GetName()}: expected a scalar 3-D volume, found array shape {voxels.shape}"
        )
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels))
    affine = RAS_TO_LPS @ world_ijk_to_ras(node)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in affine[:3, 3]])
    image.SetDirection([float(v) for v in (affine[:3, :3] / spacing).ravel()])
    return image


def write_image(image: sitk.Image, path: Path) -> None:
    """Write atomically (temporary name with the same extension, then rename)."""
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    sitk.WriteImage(image, str(temporary), False)
    os.replace(temporary, path)


def mask_to_image(mask_node, stack_node) -> sitk.Image:
    """A mask as a SimpleITK label image: a segmentation is exported onto the stack's grid; a label
    map keeps its own grid (the engine resamples it)."""
    if mask_node.IsA("vtkMRMLSegmentationNode"):
        return _segmentation_on_stack_grid(mask_node, stack_node)
    if not mask_node.IsA("vtkMRMLVolumeNode"):
        raise InputProblem(f"{mask_node.GetName()}: a mask must be a label map or a segmentation")
    image = volume_to_image(mask_node)
    return sitk.Cast(image != 0, sitk.sitkUInt8)


def _segmentation_on_stack_grid(segmentation_node, stack_node) -> sitk.Image:
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportVisibleSegmentsToLabelmapNode(
            segmentation_node, labelmap, stack_node
        )
        if not exported or labelmap.GetImageData() is None:
            raise InputProblem(f"{segmentation_node.GetName()}: the segmentation could not be exported")
        image = volume_to_image(labelmap)
        if not np.any(slicer.util.arrayFromVolume(labelmap)):
            raise InputProblem(f"{segmentation_node.GetName()}: no visible segment covers the stack")
        return sitk.Cast(image != 0, sitk.sitkUInt8)
    finally:
        scene.RemoveNode(labelmap)


def export_stacks(stacks: Sequence[StackInput], folder: Path) -> list[StackFiles]:
    """Write the stacks (and masks) into ``folder``; the files the worker reads, in table order. Stacks
    may come without any mask: then a box (ROI) or the engine's brain search finds the brain."""
    if not stacks:
        raise InputProblem("add at least one stack to the table and tick its Include box")
    for stack in stacks:
        if stack.thickness <= 0:
            raise InputProblem(f"{stack.volume.GetName()}: the slice thickness must be positive")
    files = []
    for index, stack in enumerate(stacks):
        image = volume_to_image(stack.volume)
        image_path = folder / f"stack_{index:02d}.nrrd"
        write_image(image, image_path)
        mask_path = None
        if stack.mask is not None:
            mask_path = folder / f"mask_{index:02d}.nrrd"
            write_image(mask_to_image(stack.mask, stack.volume), mask_path)
        files.append(StackFiles(image_path, mask_path, float(stack.thickness)))
    return files


def export_roi(roi_node, folder: Path) -> Path:
    """Write a markups ROI as the engine reads it (--roi-from): Slicer's own JSON, in LPS.

    The file holds the ROI in its node's coordinates, so an ROI under a transform is refused (harden
    the transform first) rather than exported where it is not shown.
    """
    if roi_node.GetParentTransformNode() is not None:
        raise InputProblem(f"{roi_node.GetName()}: the ROI is under a transform; harden it first")
    scene = roi_node.GetScene()
    storage = slicer.vtkMRMLMarkupsROIJsonStorageNode()
    scene.AddNode(storage)
    try:
        storage.SetCoordinateSystem(slicer.vtkMRMLStorageNode.CoordinateSystemLPS)
        path = folder / "roi.mrk.json"
        storage.SetFileName(str(path))
        if not storage.WriteData(roi_node):
            raise InputProblem(f"{roi_node.GetName()}: the ROI could not be written to {path}")
    finally:
        scene.RemoveNode(storage)
    return path


def _ijk_to_ras_matrix(node) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix
