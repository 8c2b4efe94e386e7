"""Reading one 3-D image with SimpleITK, with every expected problem reported as an InputError."""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .nifti import is_nifti, nifti_data_problem, nifti_geometry_problem, read_nifti_header

#: Direction matrices whose columns deviate from orthonormal by more than this are refused.
ORTHONORMAL_TOLERANCE = 1e-3


log = logging.getLogger(__name__)

#: Image files this engine reads and writes, by extension (checked lower-case; .nii.gz before .gz).
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

#: What ITK's readers say of a file whose voxel data is shorter than its header says (NRRD, MetaImage,
#: compressed streams).
TRUNCATION_MARKERS = ("got only", "not read completely", "Premature", "unexpected end", "truncated")


@contextmanager
def native_stderr() -> Iterator[list[str]]:
    """Collect what C code (ITK's NIfTI and MetaImage libraries) prints on file descriptor 2 while the
    block runs: their complaints become part of this engine's one-line messages instead of stray lines.
    The lines are in the yielded list after the block."""
    lines: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield lines
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())
            for line in lines:
                log.debug("ITK: %s", line)


def metaimage_spacing(path: Path) -> np.ndarray | None:
    """ElementSpacing (or ElementSize) of a MetaImage header; ITK drops the sign of a negative one."""
    values = None
    with open(path, "rb") as file:
        for raw in file:
            key, _, value = raw.decode("latin-1").partition("=")
            key = key.strip()
            if key in ("ElementSpacing", "ElementSize"):
                try:
                    values = np.array([float(v) for v in value.split()])
                except ValueError:
                    return None
                if key == "ElementSpacing":
                    return values
            if key == "ElementDataFile":
                break
    return values


def header_problem(path: Path, what: str) -> str | None:
    """A geometry problem that ITK would hide while reading (checked on the header before reading)."""
    if is_nifti(path):
        header = read_nifti_header(path)
        return None if header is None else nifti_geometry_problem(header)
    if path.name.lower().endswith((".mha", ".mhd")):
        spacing = metaimage_spacing(path)
        if spacing is not None and np.any(spacing <= 0):
            return f"{what} header has a zero or negative spacing {tuple(float(v) for v in spacing)}"
    return None


def itk_read_problem(error: RuntimeError, what: str) -> str:
    """A one-line reason for an ITK read failure (its message, after what ITK's C code printed)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if any("spacing" in line.lower() for line in lines):
        found = next(filter(None, (re.search(r"to (\[[^\]]*\])", line) for line in lines)), None)
        shown = f" {found.group(1)}" if found else ""
        return f"{what} has a zero or invalid spacing{shown} in its header"
    if any("orthonormal" in line.lower() for line in lines):
        return f"{what} has a direction matrix that is not orthonormal (a skewed or degenerate grid)"
    detail = next((line for line in lines if "ERROR" in line or "rror" in line), "unreadable")
    if any(marker in line for line in lines for marker in TRUNCATION_MARKERS):
        detail = next(line for line in lines if any(marker in line for marker in TRUNCATION_MARKERS))
        return f"{what} file is truncated or its data is damaged ({detail.strip()[:120]})"
    return f"cannot read the {what} ({detail.strip()[:120]})"


def axis_angles(direction: np.ndarray) -> np.ndarray:
    """The angles (3,) in degrees between the direction columns (i, j), (i, k) and (j, k)."""
    unit = direction / np.linalg.norm(direction, axis=0)
    cosines = np.array([unit[:, 0] @ unit[:, 1], unit[:, 0] @ unit[:, 2], unit[:, 1] @ unit[:, 2]])
    return np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0)))


def read_image(path: str | Path, what: str = "image") -> sitk.Image:
    """Read a 3-D image with SimpleITK; InputError naming the file for every expected problem."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, f"{what} file does not exist")
    if path.is_dir():
        raise InputError(path, f"{what} path is a folder, not a file")
    if path.stat().st_size == 0:
        raise InputError(path, f"{what} file is empty (0 bytes)")
    problem = header_problem(path, what) or (nifti_data_problem(path, what) if is_nifti(path) else None)
    if problem is not None:
        raise InputError(path, problem)
    with native_stderr() as said:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            error = exc
        else:
            error = None
    if error is not None:
        header = read_nifti_header(path) if is_nifti(path) else None
        if header is not None and header.version == 2:
            raise InputError(
                path, f"{what} is a NIfTI-2 file, which this ITK cannot read: save it as NIfTI-1"
            )
        raise InputError(path, itk_read_problem(RuntimeError("\n".join([*said, str(error)])), what))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            path,
            f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel (a colour or vector "
            "image); a scalar (grey-level) image is needed",
        )
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError(path, f"{what} has complex voxels; give a real image (the magnitude)")
    if image.GetDimension() != 3:
        raise InputError(path, f"{what} is {image.GetDimension()}-D, a 3-D image is needed")
    spacing = np.asarray(image.GetSpacing())
    if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
        raise InputError(path, f"{what} has a non-positive spacing {tuple(spacing)}")
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=ORTHONORMAL_TOLERANCE):
        shown = ", ".join(f"{angle:.1f}" for angle in axis_angles(direction))
        raise InputError(
            path, f"{what} has a direction matrix that is not orthonormal (axes at {shown} degrees, not 90)"
        )
    return image
