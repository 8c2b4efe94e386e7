"""Writing the engine's outputs: volumes, Gaussians (.npz and .vtp ellipsoids), JSON reports, montages.

Every writer is atomic: it writes a hidden temporary file in the destination folder whose name keeps
the destination's extension (so writers that choose the format by extension pick the right one) and
renames it over the destination with ``os.replace``. On any failure the temporary file is removed,
the error propagates and an existing destination is left untouched.

Coordinates are LPS millimetres throughout (see geometry.py).
"""

from __future__ import annotations

import json
import math
import os
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy
from vtkmodules.vtkCommonCore import vtkPoints, vtkStringArray
from vtkmodules.vtkCommonDataModel import vtkFieldData, vtkImageData, vtkPolyData
from vtkmodules.vtkFiltersCore import vtkTensorGlyph
from vtkmodules.vtkFiltersSources import vtkSphereSource
from vtkmodules.vtkIOXML import vtkXMLPolyDataWriter
from vtkmodules.vtkRenderingCore import vtkTextProperty
from vtkmodules.vtkRenderingFreeType import vtkFreeTypeTools

from .errors import InputError
from .geometry import apply_affine, image_affine

#: Coordinate system of every array and file written here.
SPACE = "LPS"
_GAUSSIAN_KEYS = ("means", "covariances", "intensities", "space")
_COMPOUND_EXTENSIONS = (".nii.gz",)
#: Formats that keep the voxels in a second file named inside the header: a rename cannot move both.
_DETACHED_HEADER_EXTENSIONS = (".nhdr", ".mhd", ".hdr", ".img")
#: Montage panels are resampled to at most this many pixels along either side.
MAX_PANEL_PIXELS = 512
#: Black columns between montage panels.
MONTAGE_GAP = 4
#: Montage field of view: the mask's (or the non-zero voxels') box plus this margin (mm) on every side.
MONTAGE_MARGIN_MM = 10.0
_TITLE_FONT_SIZE = 14


def _extension(path: Path) -> str:
    lower = path.name.lower()
    for compound in _COMPOUND_EXTENSIONS:
        if lower.endswith(compound):
            return path.name[-len(compound) :]
    return path.suffix


@contextmanager
def _atomic(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` if the block succeeds."""
    target = Path(path)
    extension = _extension(target)
    stem = target.name[: len(target.name) - len(extension)]
    temporary = target.with_name(f".{stem}.{uuid.uuid4().hex[:12]}.tmp{extension}")
    try:
        yield temporary
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_image(image: sitk.Image, path: str | Path) -> None:
    """Write a SimpleITK image in the format named by the extension (.nii.gz, .nii, .nrrd, .mha, ...).

    Two-file formats (.nhdr, .mhd, .hdr/.img) are refused: their header names the data file, so they
    cannot be renamed into place atomically.
    """
    target = Path(path)
    if _extension(target).lower() in _DETACHED_HEADER_EXTENSIONS:
        raise InputError(target, "two-file image formats cannot be written atomically; use .nii.gz or .nrrd")
    with _atomic(target) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=True)


def _json_safe(value: object) -> object:
    """Plain JSON types: numpy scalars and arrays become Python ones, NaN and infinities become None."""
    if isinstance(value, dict):
        return {(k.item() if isinstance(k, np.generic) else k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(data: dict, path: str | Path) -> None:
    """Write ``data`` as indented JSON; NaN and infinities are written as null (strict JSON)."""
    text = json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n"
    with _atomic(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


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
    with _atomic(path) as temporary, open(temporary, "wb") as file:
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
    with _atomic(path) as temporary:
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


def _resample_onto(image: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """Nearest-neighbour values (k, j, i) of ``image`` on the grid of ``reference`` (0 outside)."""
    same_grid = (
        image.GetSize() == reference.GetSize()
        and np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        and np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-6)
        and np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
    )
    if not same_grid:
        image = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(image)


def _region(image: sitk.Image, mask: sitk.Image | None) -> tuple[np.ndarray, bool]:
    """Voxels (k, j, i) bool that frame the montage, and whether they come from the mask.

    The mask's voxels if it has any, else the non-zero voxels (masked reconstructions and resampled
    stacks are mostly zero padding), else all voxels.
    """
    if mask is not None:
        inside = _resample_onto(mask, image) > 0
        if inside.any():
            return inside, True
    inside = sitk.GetArrayViewFromImage(image) != 0
    return (inside if inside.any() else np.ones(inside.shape, dtype=bool)), False


def _world_box(image: sitk.Image, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LPS lower and upper corners (3,) of the axis-aligned box around the ``inside`` voxels' edges."""
    indices = np.argwhere(inside)[:, ::-1]
    bounds = [[lo - 0.5, hi + 0.5] for lo, hi in zip(indices.min(axis=0), indices.max(axis=0), strict=True)]
    corners = np.array(np.meshgrid(*bounds, indexing="ij")).reshape(3, -1).T
    world = apply_affine(image_affine(image), corners)
    return world.min(axis=0), world.max(axis=0)


def montage_planes(
    image: sitk.Image, mask: sitk.Image | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axial, coronal and sagittal planes through the centre of the mask (or of the image's content).

    The field of view is the box around the mask's voxels (else around the non-zero voxels) plus
    MONTAGE_MARGIN_MM, within the image; the planes cross at the mask's centroid, or else at the
    centre of that box. They are resampled (linear) on a grid aligned with the patient's axes, with
    square pixels of the image's finest spacing (coarser if a side would exceed MAX_PANEL_PIXELS), so
    any image direction, oblique ones included, gives the same picture and thick slices are not
    squashed. Returns float64 arrays (rows, cols), row 0 at the top, NaN outside the image, in the
    radiological convention:

    - axial: anterior up, patient left on the image right;
    - coronal: superior up, patient left on the image right;
    - sagittal: superior up, anterior on the image left.
    """
    if image.GetDimension() != 3:
        raise ValueError(f"a montage needs a 3-D image, got {image.GetDimension()}-D")
    inside, from_mask = _region(image, mask)
    image_low, image_high = _world_box(image, np.ones(inside.shape, dtype=bool))
    low, high = _world_box(image, inside)
    low = np.maximum(low - MONTAGE_MARGIN_MM, image_low)
    high = np.minimum(high + MONTAGE_MARGIN_MM, image_high)
    if from_mask:
        centre = apply_affine(image_affine(image), np.argwhere(inside).mean(axis=0)[::-1])
    else:
        centre = (low + high) / 2.0
    extent = high - low
    step = max(min(image.GetSpacing()), float(extent.max()) / MAX_PANEL_PIXELS)
    counts = np.maximum(np.ceil(extent / step - 1e-6).astype(int), 1)
    first = low + step / 2.0
    volume = sitk.Cast(image, sitk.sitkFloat64)

    def plane(axis: int) -> np.ndarray:
        size, origin = counts.copy(), first.copy()
        size[axis], origin[axis] = 1, centre[axis]
        resampled = sitk.Resample(
            volume,
            [int(n) for n in size],
            sitk.Transform(),
            sitk.sitkLinear,
            [float(v) for v in origin],
            [step] * 3,
            np.eye(3).ravel().tolist(),
            math.nan,
            sitk.sitkFloat64,
        )
        return sitk.GetArrayFromImage(resampled)

    # Grid axes are L (x), P (y), S (z); arrays come back indexed [z, y, x].
    axial = plane(2)[0]
    coronal = plane(1)[:, 0, :][::-1]
    sagittal = plane(0)[:, :, 0][::-1]
    return axial, coronal, sagittal


def _window(image: sitk.Image, mask: sitk.Image | None) -> tuple[float, float]:
    """1st and 99th percentiles of the image's values in the montage's region (see ``_region``)."""
    values = np.asarray(sitk.GetArrayViewFromImage(image), dtype=np.float64)[_region(image, mask)[0]]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    # A strided subsample keeps the percentiles cheap on large volumes.
    values = values[:: max(1, values.size // 2_000_000)]
    low, high = np.percentile(values, [1.0, 99.0])
    return float(low), float(high)


def _to_uint8(plane: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (plane - low) / (high - low) if high > low else np.zeros_like(plane)
    scaled = np.nan_to_num(np.clip(scaled, 0.0, 1.0), nan=0.0)
    return np.round(scaled * 255.0).astype(np.uint8)


def _title_banner(title: str, width: int) -> np.ndarray:
    """The title rendered with VTK's FreeType (no display needed) on a black band (rows, width) uint8."""
    text = vtkTextProperty()
    text.SetFontSize(_TITLE_FONT_SIZE)
    text.SetColor(1.0, 1.0, 1.0)
    rendered = vtkImageData()
    if not vtkFreeTypeTools.GetInstance().RenderString(text, title, 72, rendered):
        raise RuntimeError(f"could not render the montage title {title!r}")
    columns, rows, _ = rendered.GetDimensions()
    rgba = vtk_to_numpy(rendered.GetPointData().GetScalars()).reshape(rows, columns, -1)
    glyphs = rgba[::-1, :, -1]  # VTK rows run bottom-up; alpha is the ink
    used_rows, used_columns = np.nonzero(glyphs.any(axis=1))[0], np.nonzero(glyphs.any(axis=0))[0]
    margin = 4
    banner = np.zeros((_TITLE_FONT_SIZE + 2 * margin, width), dtype=np.uint8)
    if used_rows.size:
        ink = glyphs[used_rows[0] : used_rows[-1] + 1, used_columns[0] : used_columns[-1] + 1]
        ink = ink[: banner.shape[0] - 2 * margin, : max(0, width - 2 * margin)]
        banner[margin : margin + ink.shape[0], margin : margin + ink.shape[1]] = ink
    return banner


def write_montage(
    image: sitk.Image, path: str | Path, *, mask: sitk.Image | None = None, title: str | None = None
) -> None:
    """Write a PNG (uint8) of the ``montage_planes`` side by side: axial, coronal, sagittal.

    Panels are top-aligned, MONTAGE_GAP black columns apart, intensities windowed to the 1st-99th
    percentile of the image inside the mask (else of its non-zero voxels); a title, if given, is drawn
    in a band above.
    """
    low, high = _window(image, mask)
    panels = [_to_uint8(plane, low, high) for plane in montage_planes(image, mask)]
    height = max(panel.shape[0] for panel in panels)
    width = sum(panel.shape[1] for panel in panels) + MONTAGE_GAP * (len(panels) - 1)
    canvas = np.zeros((height, width), dtype=np.uint8)
    column = 0
    for panel in panels:
        canvas[: panel.shape[0], column : column + panel.shape[1]] = panel
        column += panel.shape[1] + MONTAGE_GAP
    if title:
        canvas = np.vstack([_title_banner(title, width), canvas])
    with _atomic(path) as temporary:
        sitk.WriteImage(sitk.GetImageFromArray(canvas), str(temporary))
