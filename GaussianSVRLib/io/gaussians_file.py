"""The Gaussians file format: an .npz of means, covariances and intensities (LPS mm), and ellipsoid
glyphs as a .vtp that 3D Slicer places right. Torch-free: the Slicer module reads it too."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from vtkmodules.util.numpy_support import numpy_to_vtk
from vtkmodules.vtkCommonCore import vtkPoints, vtkStringArray
from vtkmodules.vtkCommonDataModel import vtkFieldData, vtkPolyData
from vtkmodules.vtkFiltersCore import vtkTensorGlyph
from vtkmodules.vtkFiltersSources import vtkSphereSource
from vtkmodules.vtkIOXML import vtkXMLPolyDataWriter

from ..errors import InputError
from .outputs import atomic_path

#: Coordinate system of every array and file written here.
SPACE = "LPS"


_GAUSSIAN_KEYS = ("means", "covariances", "intensities", "space")


def _check_gaussians(
    means: np.ndarray, covariances: np.ndarray, intensities: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    means, covariances, intensities = np.asarray(means), np.asarray(covariances), np.asarray(intensities)
    n = len(intensities)
    if intensities.shape != (n,) or means.shape != (n, 3) or covariances.shape != (n, 3, 3):
        raise ValueError(
            "expected means (N, 3), covariances (N, 3, 3) and intensities (N,), got "
            f"{means.shape}, {covariances.shape} and {intensities.shape}"
        )
    return means, covariances, intensities


def save_gaussians(
    path: str | Path, means: np.ndarray, covariances: np.ndarray, intensities: np.ndarray, **extra: np.ndarray
) -> None:
    """Save Gaussians to an .npz file: means (N, 3) LPS mm, covariances (N, 3, 3) mm^2, intensities (N,).

    ``extra`` arrays (e.g. slice transforms for a warm start) are stored under their own names; the
    entry ``space`` holds the string "LPS".
    """
    means, covariances, intensities = _check_gaussians(means, covariances, intensities)
    if "space" in extra:
        raise ValueError("'space' is reserved for the coordinate system")
    arrays = {k: np.asarray(v) for k, v in extra.items()}
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        np.savez(
            file,
            means=means,
            covariances=covariances,
            intensities=intensities,
            space=np.array(SPACE),
            **arrays,
        )


def load_gaussians(path: str | Path) -> dict[str, np.ndarray]:
    """Read a file written by ``save_gaussians``: means, covariances, intensities and the extra arrays.

    The ``space`` entry is checked (it must be "LPS") and not returned. Raises InputError for a
    missing, unreadable or inconsistent file.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise InputError(path, f"not a readable Gaussians .npz file ({error})") from error
    missing = [key for key in _GAUSSIAN_KEYS if key not in arrays]
    if missing:
        raise InputError(path, f"not a Gaussians file: missing {', '.join(missing)}")
    space = str(arrays.pop("space"))
    if space != SPACE:
        raise InputError(path, f"Gaussians are in {space!r} coordinates, expected {SPACE!r}")
    try:
        _check_gaussians(arrays["means"], arrays["covariances"], arrays["intensities"])
    except ValueError as error:
        raise InputError(path, str(error)) from error
    return arrays


def select_glyphs(
    means: np.ndarray, covariances: np.ndarray, intensities: np.ndarray, max_count: int
) -> np.ndarray:
    """Indices (min(N, max_count),) ascending, of the Gaussians worth drawing.

    Rule: the ``max_count`` Gaussians with the largest mass |c_j| sqrt(det Sigma_j). The integral of
    c_j g_j over space is c_j (2 pi)^(3/2) sqrt(det Sigma_j), so these contribute most to the volume;
    small or faint ones would clutter the view without showing structure. Ties go to the lower
    index; Gaussians with a non-finite mass come last.
    """
    _, covariances, intensities = _check_gaussians(means, covariances, intensities)
    if max_count <= 0:
        return np.empty(0, dtype=np.int64)
    determinant = np.linalg.det(covariances.astype(np.float64))
    mass = np.abs(intensities.astype(np.float64)) * np.sqrt(np.clip(determinant, 0.0, None))
    mass = np.where(np.isfinite(mass), mass, -1.0)
    return np.sort(np.argsort(-mass, kind="stable")[:max_count]).astype(np.int64)


def _sqrt_psd(matrices: np.ndarray) -> np.ndarray:
    """Symmetric square roots (K, 3, 3) of covariance matrices (K, 3, 3); negative eigenvalues -> 0."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrices.astype(np.float64))
    roots = np.sqrt(np.clip(eigenvalues, 0.0, None))
    return np.einsum("kij,kj,klj->kil", eigenvectors, roots, eigenvectors)


def ellipsoid_polydata(
    means: np.ndarray,
    covariances: np.ndarray,
    intensities: np.ndarray,
    *,
    max_count: int = 5000,
    scale: float = 2.0,
    resolution: int = 8,
) -> vtkPolyData:
    """Ellipsoid glyphs of the ``select_glyphs`` Gaussians, in LPS mm, as a vtkPolyData.

    Each glyph is a sphere (``resolution`` in theta and phi) put through the Gaussian's covariance by
    vtkTensorGlyph: its semi-axes lie along the eigenvectors of Sigma_j with lengths
    ``scale * sqrt(eigenvalue)`` (scale 2: the 2-sigma surface). The input tensor (9 components) is the
    symmetric square root of Sigma_j, which has those axes with lengths sqrt(eigenvalue). The point
    array "intensity" (each glyph's c_j) is the active scalar, so the surface can be coloured by it.
    """
    if resolution < 3:
        raise ValueError(f"resolution must be at least 3, got {resolution}")
    means, covariances, intensities = _check_gaussians(means, covariances, intensities)
    keep = select_glyphs(means, covariances, intensities, max_count)
    centres = vtkPoints()
    centres.SetData(numpy_to_vtk(np.ascontiguousarray(means[keep], dtype=np.float64), deep=True))
    tensors = numpy_to_vtk(_sqrt_psd(covariances[keep]).reshape(-1, 9), deep=True)
    tensors.SetName("sqrt_covariance")
    values = numpy_to_vtk(np.ascontiguousarray(intensities[keep], dtype=np.float32), deep=True)
    values.SetName("intensity")
    glyph_input = vtkPolyData()
    glyph_input.SetPoints(centres)
    glyph_input.GetPointData().SetTensors(tensors)
    glyph_input.GetPointData().SetScalars(values)

    sphere = vtkSphereSource()
    sphere.SetRadius(1.0)
    sphere.SetThetaResolution(resolution)
    sphere.SetPhiResolution(resolution)
    glyphs = vtkTensorGlyph()
    glyphs.SetInputData(glyph_input)
    glyphs.SetSourceConnection(sphere.GetOutputPort())
    glyphs.SetScaleFactor(scale)
    glyphs.ExtractEigenvaluesOn()
    glyphs.ClampScalingOff()
    glyphs.ColorGlyphsOn()
    glyphs.SetColorModeToScalars()
    glyphs.Update()
    polydata = vtkPolyData()
    polydata.ShallowCopy(glyphs.GetOutput())
    scalars = polydata.GetPointData().GetScalars()
    if scalars is not None:
        scalars.SetName("intensity")
    return polydata


def write_ellipsoids(
    path: str | Path, means: np.ndarray, covariances: np.ndarray, intensities: np.ndarray, **kwargs
) -> None:
    """Write ``ellipsoid_polydata(...)`` (same keyword arguments) as a .vtp file that 3D Slicer places right.

    Points are LPS mm, and the file says so the way Slicer reads it. Slicer/Slicer
    Libs/MRML/Core/vtkMRMLModelStorageNode.cxx: for .vtp and .vtu, ReadDataInternal calls
    GetCoordinateSystemFromFieldData, which looks for a field-data vtkStringArray named "SPACE" whose
    first value contains "LPS" or "RAS" (then removes it); without it, the storage node's own
    setting is used: LPS for a new storage node (the constructor sets CoordinateSystemLPS), but RAS
    when a .mrml scene without a coordinateSystem attribute refers to the file (ReadXMLAttributes
    treats it as legacy). For LPS the mesh is flipped (-x, -y) into Slicer's RAS. Slicer's own
    writer puts the same array in the .vtp files it saves, so we write SPACE = "LPS" explicitly
    rather than rely on either default.
    """
    polydata = ellipsoid_polydata(means, covariances, intensities, **kwargs)
    marked = vtkPolyData()
    marked.ShallowCopy(polydata)
    field_data = vtkFieldData()
    field_data.ShallowCopy(polydata.GetFieldData())
    field_data.RemoveArray("SPACE")
    space = vtkStringArray()
    space.SetName("SPACE")
    space.InsertNextValue(SPACE)
    field_data.AddArray(space)
    marked.SetFieldData(field_data)
    with atomic_path(path) as temporary:
        writer = vtkXMLPolyDataWriter()
        writer.SetInputData(marked)
        writer.SetFileName(str(temporary))
        writer.SetDataModeToAppended()
        writer.EncodeAppendedDataOff()
        writer.SetCompressorTypeToZLib()
        # Level 1: about half the time of the default level for 1 % more bytes (checkpoints repeat it).
        writer.SetCompressionLevel(1)
        if writer.Write() != 1 or not temporary.exists():
            raise OSError(f"{path}: could not write the ellipsoid model")
