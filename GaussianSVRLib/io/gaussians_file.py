"""The Gaussians file format: an .npz of means, covariances and intensities (LPS mm), and ellipsoid
glyphs as a .vtp that 3D Slicer places right. Torch-free: the Slicer module reads it too.

A run's file also carries what a later run needs to continue from it (``continuation_arrays``):
every slice's rigid map in the output frame and its intensity scale, with what identifies the slice
again: its stack (path, SHA-256 of the file, shape) and its index k.
"""

from __future__ import annotations

import errno
import hashlib
import zipfile
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from vtkmodules.util.numpy_support import numpy_to_vtk
from vtkmodules.vtkCommonCore import vtkPoints, vtkStringArray
from vtkmodules.vtkCommonDataModel import vtkFieldData, vtkPolyData
from vtkmodules.vtkFiltersCore import vtkTensorGlyph
from vtkmodules.vtkFiltersSources import vtkSphereSource
from vtkmodules.vtkIOXML import vtkXMLPolyDataReader, vtkXMLPolyDataWriter

from ..errors import InputError
from .outputs import write_atomically

if TYPE_CHECKING:  # only for annotations: io.slices imports torch through geometry
    from .slices import SliceSet
    from .stacks import Stack

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


def write_npz(
    path: Path, means: np.ndarray, covariances: np.ndarray, intensities: np.ndarray, **extra: np.ndarray
) -> None:
    """Write the Gaussians .npz at ``path`` (not atomically; see save_gaussians) and read it back."""
    means, covariances, intensities = _check_gaussians(means, covariances, intensities)
    if "space" in extra:
        raise ValueError("'space' is reserved for the coordinate system")
    arrays = {k: np.asarray(v) for k, v in extra.items()}
    with open(path, "wb") as file:
        np.savez(
            file,
            means=means,
            covariances=covariances,
            intensities=intensities,
            space=np.array(SPACE),
            **arrays,
        )
    back = load_gaussians(path)
    if len(back["intensities"]) != len(intensities) or set(back) != {
        "means",
        "covariances",
        "intensities",
        *arrays,
    }:
        raise OSError(errno.EIO, "the file read back differs from what was written")


def save_gaussians(
    path: str | Path, means: np.ndarray, covariances: np.ndarray, intensities: np.ndarray, **extra: np.ndarray
) -> None:
    """Save Gaussians to an .npz file atomically: means (N, 3) LPS mm, covariances (N, 3, 3) mm^2,
    intensities (N,).

    ``extra`` arrays (e.g. slice transforms for a warm start) are stored under their own names; the
    entry ``space`` holds the string "LPS".
    """
    _check_gaussians(means, covariances, intensities)
    if "space" in extra:
        raise ValueError("'space' is reserved for the coordinate system")
    write_atomically(
        path, partial(write_npz, means=means, covariances=covariances, intensities=intensities, **extra)
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
    """``write_vtp`` atomically."""
    _check_gaussians(means, covariances, intensities)
    write_atomically(
        path, partial(write_vtp, means=means, covariances=covariances, intensities=intensities, **kwargs)
    )


def write_vtp(
    path: Path, means: np.ndarray, covariances: np.ndarray, intensities: np.ndarray, **kwargs
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
    writer = vtkXMLPolyDataWriter()
    writer.SetInputData(marked)
    writer.SetFileName(str(path))
    writer.SetDataModeToAppended()
    writer.EncodeAppendedDataOff()
    writer.SetCompressorTypeToZLib()
    # Level 1: about half the time of the default level for 1 % more bytes (checkpoints repeat it).
    writer.SetCompressionLevel(1)
    if writer.Write() != 1 or writer.GetErrorCode() != 0 or not path.exists():
        raise OSError(errno.EIO, "could not write the ellipsoid model")
    reader = vtkXMLPolyDataReader()
    reader.SetFileName(str(path))
    reader.Update()
    if reader.GetErrorCode() != 0 or reader.GetOutput().GetNumberOfPoints() != marked.GetNumberOfPoints():
        raise OSError(errno.EIO, "the ellipsoid file read back differs from what was written")


#: Extra arrays of a Gaussians file that a warm start needs, with their shapes (M slices, S stacks).
SLICE_KEYS = {"slice_rotation": 3, "slice_translation": 3, "slice_centre": 3, "slice_scale": 0}


SLICE_INDEX_KEYS = ("slice_stack", "slice_k")


STACK_KEYS = ("stack_paths", "stack_digests", "stack_shapes", "reference_stack")


@lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the cache key only: a rewritten file is hashed again
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes ("" if unreadable): a stack is the same wherever it was copied to."""
    resolved = Path(path).resolve()
    try:
        status = resolved.stat()
        return _digest(str(resolved), status.st_size, status.st_mtime_ns)
    except OSError:
        return ""  # gone since it was read: the stack can still be recognised by its path


def continuation_arrays(
    stacks: list[Stack],
    slices: SliceSet,
    reference: int,
    rotvec: np.ndarray,
    translation: np.ndarray,
    scale: np.ndarray,
) -> dict[str, np.ndarray]:
    """The extra arrays a Gaussians file carries for a warm start.

    rotvec (M, 3) and translation (M, 3): slice maps in the output frame around slice_centre;
    scale (M,): slice intensity scales. Stacks: resolved paths (S,), file digests (S,), shapes (S, 3)
    as [k, j, i]; reference_stack: the stack whose median slice scale is folded into the intensities.
    """
    return {
        "slice_rotation": np.asarray(rotvec, dtype=np.float64),
        "slice_translation": np.asarray(translation, dtype=np.float64),
        "slice_centre": np.asarray(slices.slice_centre, dtype=np.float64),
        "slice_scale": np.asarray(scale, dtype=np.float64),
        "slice_stack": np.asarray(slices.slice_stack, dtype=np.int64),
        "slice_k": np.asarray(slices.slice_k, dtype=np.int64),
        "stack_paths": np.array([str(Path(stack.path).resolve()) for stack in stacks]),
        "stack_digests": np.array([file_digest(stack.path) for stack in stacks]),
        "stack_shapes": np.array([stack.data.shape for stack in stacks], dtype=np.int64),
        "reference_stack": np.array(reference, dtype=np.int64),
    }


def init_path(path: str | Path) -> Path:
    """The .npz of a Gaussians path given like --output-gaussians: G, G.npz or G.vtp."""
    path = Path(path)
    return path.with_suffix(".npz") if path.suffix in ("", ".vtp") else path


@dataclass
class Saved:
    """A validated Gaussians file: N Gaussians, M slices, S stacks (arrays as in warm_start_arrays)."""

    path: Path
    means: np.ndarray  # (N, 3)
    covariances: np.ndarray  # (N, 3, 3)
    intensities: np.ndarray  # (N,)
    rotvec: np.ndarray  # (M, 3)
    translation: np.ndarray  # (M, 3)
    centre: np.ndarray  # (M, 3)
    scale: np.ndarray  # (M,)
    slice_stack: np.ndarray  # (M,)
    slice_k: np.ndarray  # (M,)
    stack_paths: list[str]
    stack_digests: list[str]
    stack_shapes: np.ndarray  # (S, 3)
    reference: int


def read_saved(path: str | Path) -> Saved:
    """Load and check a Gaussians file for a warm start; InputError naming it for anything wrong."""
    path = init_path(path)
    if not path.is_file():
        raise InputError(path, "initial Gaussians file does not exist")
    arrays = load_gaussians(path)
    missing = [key for key in (*SLICE_KEYS, *SLICE_INDEX_KEYS, *STACK_KEYS) if key not in arrays]
    if missing:
        raise InputError(path, f"has no slice transforms to continue from (missing {', '.join(missing)})")

    def fail(problem: str) -> InputError:
        return InputError(path, f"inconsistent Gaussians file: {problem}")

    m = len(arrays["slice_stack"])
    for key, width in SLICE_KEYS.items():
        if arrays[key].shape != ((m, width) if width else (m,)):
            raise fail(f"{key} has shape {arrays[key].shape} for {m} slices")
    s = len(arrays["stack_paths"])
    if arrays["stack_digests"].shape != (s,) or arrays["stack_shapes"].shape != (s, 3):
        raise fail(f"stack arrays disagree on the number of stacks ({s})")
    for key in ("means", "covariances", "intensities", *SLICE_KEYS):
        if not np.issubdtype(arrays[key].dtype, np.number) or not np.all(np.isfinite(arrays[key])):
            raise fail(f"{key} has non-numeric or non-finite values")
    for key in (*SLICE_INDEX_KEYS, "stack_shapes", "reference_stack"):
        if not np.issubdtype(arrays[key].dtype, np.integer):
            raise fail(f"{key} is not an integer array")
    if arrays["slice_k"].shape != (m,) or np.any(arrays["slice_k"] < 0):
        raise fail("slice_k must hold one non-negative index per slice")
    reference = int(arrays["reference_stack"]) if arrays["reference_stack"].shape == () else -1
    if (
        m == 0
        or not (0 <= reference < s)
        or np.any((arrays["slice_stack"] < 0) | (arrays["slice_stack"] >= s))
    ):
        raise fail("slice_stack or reference_stack do not point at a saved stack")
    if np.any(arrays["slice_scale"] <= 0) or not np.any(arrays["slice_stack"] == reference):
        raise fail("slice scales must be positive, and the reference stack must have slices")
    if len(arrays["intensities"]) == 0:
        raise fail("no Gaussians")
    if np.any(np.linalg.eigvalsh(arrays["covariances"].astype(np.float64)) <= 0):
        raise fail("covariances must be positive definite")
    return Saved(
        path=path,
        means=arrays["means"],
        covariances=arrays["covariances"],
        intensities=arrays["intensities"],
        rotvec=arrays["slice_rotation"],
        translation=arrays["slice_translation"],
        centre=arrays["slice_centre"],
        scale=arrays["slice_scale"],
        slice_stack=arrays["slice_stack"],
        slice_k=arrays["slice_k"],
        stack_paths=[str(p) for p in arrays["stack_paths"]],
        stack_digests=[str(d) for d in arrays["stack_digests"]],
        stack_shapes=arrays["stack_shapes"],
        reference=reference,
    )
