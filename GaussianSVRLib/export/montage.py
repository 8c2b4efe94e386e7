"""PNG montages of a volume: axial, coronal and sagittal planes in the patient frame, side by side.

Display convention (radiological): axial anterior up, coronal superior up, patient left on the image
right in both; sagittal superior up, anterior on the left. Planes are resampled onto a patient-aligned
grid with square pixels, so oblique and thick-slice images show undistorted.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from vtkmodules.util.numpy_support import vtk_to_numpy
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkRenderingCore import vtkTextProperty
from vtkmodules.vtkRenderingFreeType import vtkFreeTypeTools

from ..geometry import apply_affine, image_affine, on_grid
from ..io.outputs import write_png

#: Largest side of a montage panel in pixels.
MAX_PANEL_PIXELS = 512
#: Panels whose largest side is below this are enlarged by pixel replication (an integer factor,
#: so every voxel stays a visible square) to be readable on screen.
MIN_DISPLAY_PIXELS = 256
#: Black columns between montage panels.
MONTAGE_GAP = 4
#: Montage field of view: the mask's (or the non-zero voxels') box plus this margin (mm) on every side.
MONTAGE_MARGIN_MM = 10.0
_TITLE_FONT_SIZE = 14


def _resample_onto(image: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """Nearest-neighbour values (k, j, i) of ``image`` on the grid of ``reference`` (0 outside)."""
    return sitk.GetArrayFromImage(on_grid(image, reference))


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


def display_factor(planes: tuple[np.ndarray, ...] | list[np.ndarray]) -> int:
    """The integer enlargement write_montage applies to the planes (1 when the largest side of all
    planes is at least MIN_DISPLAY_PIXELS)."""
    largest = max(max(plane.shape) for plane in planes)
    return max(1, math.ceil(MIN_DISPLAY_PIXELS / max(largest, 1)))


def write_montage(
    image: sitk.Image, path: str | Path, *, mask: sitk.Image | None = None, title: str | None = None
) -> None:
    """Write a PNG (uint8) of the ``montage_planes`` side by side: axial, coronal, sagittal.

    Panels are top-aligned, MONTAGE_GAP black columns apart, intensities windowed to the 1st-99th
    percentile of the image inside the mask (else of its non-zero voxels), enlarged by
    ``display_factor``; a title, if given, is drawn in a band above.
    """
    low, high = _window(image, mask)
    planes = montage_planes(image, mask)
    factor = display_factor(planes)
    panels = [np.kron(_to_uint8(plane, low, high), np.ones((factor, factor), np.uint8)) for plane in planes]
    height = max(panel.shape[0] for panel in panels)
    width = sum(panel.shape[1] for panel in panels) + MONTAGE_GAP * (len(panels) - 1)
    canvas = np.zeros((height, width), dtype=np.uint8)
    column = 0
    for panel in panels:
        canvas[: panel.shape[0], column : column + panel.shape[1]] = panel
        column += panel.shape[1] + MONTAGE_GAP
    if title:
        canvas = np.vstack([_title_banner(title, width), canvas])
    write_png(canvas, path)
