"""NIfTI-1/2 headers read from the bytes on disk: the geometry and data facts that ITK hides while reading."""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import IO

import numpy as np

from ..geometry import apply_affine

#: A NIfTI qform and sform that place some voxel of the image further apart than this fraction of
#: the smallest voxel size disagree. Below it they differ by float rounding, or by the small shear
#: that a sform can hold and a qform cannot.
QFORM_SFORM_TOLERANCE = 0.1


@dataclass(frozen=True)
class NiftiHeader:
    """The fields of a NIfTI-1 or NIfTI-2 (version 1 or 2) header that place and hold the voxels.

    dim (8,) and pixdim (8,) as in the header (dim[0] = number of axes, pixdim[0] = qfac),
    quatern (3,) = quatern_b, c, d, qoffset (3,), srow (3, 4) = srow_x, y, z; all in RAS mm.
    """

    version: int
    order: str
    datatype: int
    dim: np.ndarray
    pixdim: np.ndarray
    vox_offset: int
    qform_code: int
    sform_code: int
    quatern: np.ndarray
    qoffset: np.ndarray
    srow: np.ndarray


#: (byte offset, numpy type, count) of each NiftiHeader field, by header size (NIfTI-1: 348, NIfTI-2: 540).
NIFTI_LAYOUTS: dict[int, dict[str, tuple[int, str, int]]] = {
    348: {"datatype": (70, "i2", 1), "dim": (40, "i2", 8), "pixdim": (76, "f4", 8),
          "vox_offset": (108, "f4", 1), "qform_code": (252, "i2", 1), "sform_code": (254, "i2", 1),
          "quatern": (256, "f4", 3), "qoffset": (268, "f4", 3), "srow": (280, "f4", 12)},
    540: {"datatype": (12, "i2", 1), "dim": (16, "i8", 8), "pixdim": (104, "f8", 8),
          "vox_offset": (168, "i8", 1), "qform_code": (344, "i4", 1), "sform_code": (348, "i4", 1),
          "quatern": (352, "f8", 3), "qoffset": (376, "f8", 3), "srow": (400, "f8", 12)},
}  # fmt: skip


#: NIfTI-1 datatype codes of floating-point voxels -> numpy type (complex ones included).
NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8", 32: "c8", 1792: "c16"}
#: Bytes per voxel of every NIfTI-1 datatype code (nifti1.h).
NIFTI_VOXEL_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4,
                     1024: 8, 1280: 8, 1536: 16, 1792: 16, 2048: 32, 2304: 4}  # fmt: skip
#: The first bytes of a gzip stream: a file is decompressed by what it holds, not by its name.
GZIP_MAGIC = b"\x1f\x8b"


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith((".nii", ".nii.gz"))


def open_image_file(path: Path) -> IO[bytes]:
    """The file for reading bytes, through gzip when it holds a gzip stream (whatever its name)."""
    with open(path, "rb") as file:
        compressed = file.read(2) == GZIP_MAGIC
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def parse_nifti_header(head: bytes) -> NiftiHeader | None:
    """The header in the first bytes of a NIfTI-1/2 file (either byte order); None if it is not one."""
    for order in "<>":
        size = int(np.frombuffer(head[:4], order + "i4")[0]) if len(head) >= 4 else 0
        if size in NIFTI_LAYOUTS and len(head) >= size:
            break
    else:
        return None
    fields = {
        name: np.frombuffer(head, order + kind, count, offset)
        for name, (offset, kind, count) in NIFTI_LAYOUTS[size].items()
    }
    return NiftiHeader(
        version=1 if size == 348 else 2,
        order=order,
        datatype=int(fields["datatype"][0]),
        dim=fields["dim"].astype(np.int64),
        pixdim=fields["pixdim"].astype(np.float64),
        vox_offset=int(fields["vox_offset"][0]),
        qform_code=int(fields["qform_code"][0]),
        sform_code=int(fields["sform_code"][0]),
        quatern=fields["quatern"].astype(np.float64),
        qoffset=fields["qoffset"].astype(np.float64),
        srow=fields["srow"].astype(np.float64).reshape(3, 4),
    )


def read_nifti_header(path: str | Path) -> NiftiHeader | None:
    """The header of a NIfTI-1/2 file; None when the file is not one or cannot be read (ITK then says why)."""
    try:
        with open_image_file(Path(path)) as file:
            return parse_nifti_header(file.read(540))
    except (OSError, EOFError, zlib.error):
        return None


def geometry_codes_problem(header: NiftiHeader) -> str | None:
    """Why a header cannot place its voxels: neither a qform nor an sform (ITK would put them at the
    origin, axis-aligned, which says nothing about where the slices were)."""
    if header.qform_code <= 0 and header.sform_code <= 0:
        return (
            "NIfTI header has neither a qform nor an sform (both codes are 0), so where its voxels lie is "
            "unknown; save it with the tool that made it, keeping its orientation"
        )
    return None


def qform_affine(header: NiftiHeader) -> np.ndarray:
    """The qform voxel -> RAS affine (4, 4) of a header (NIfTI-1 standard, method 2)."""
    b, c, d = header.quatern
    a = np.sqrt(max(0.0, 1.0 - b * b - c * c - d * d))
    rotation = np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ]
    )
    qfac = -1.0 if header.pixdim[0] < 0 else 1.0
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([header.pixdim[1], header.pixdim[2], qfac * header.pixdim[3]])
    affine[:3, 3] = header.qoffset
    return affine


def sform_affine(header: NiftiHeader) -> np.ndarray:
    affine = np.eye(4)
    affine[:3] = header.srow
    return affine


def spatial_axes(header: NiftiHeader) -> int:
    return int(np.clip(header.dim[0], 1, 3))


def corners(header: NiftiHeader) -> np.ndarray:
    """The index corners (8, 3) of the image's spatial grid."""
    axes = spatial_axes(header)
    last = [max(int(header.dim[1 + a]) - 1, 0) if a < axes else 0 for a in range(3)]
    return np.array(list(product(*[(0, n) for n in last])), dtype=np.float64)


def largest_gap(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> float:
    """The largest distance (mm) between where two affines (4, 4) put the same index points (P, 3)."""
    return float(np.max(np.linalg.norm(apply_affine(a, points) - apply_affine(b, points), axis=1)))


def nifti_geometry_problem(header: NiftiHeader) -> str | None:
    """Why a NIfTI header's geometry is ambiguous, or None when it is not.

    ITK takes the voxel size from pixdim even when it orients the image by the sform; it reads a
    zero pixdim as 1 mm, flips the axis of a negative one and, when qform and sform disagree,
    silently takes the sform: each is a guess about where the voxels are.
    """
    axes = spatial_axes(header)
    size = header.pixdim[1 : 1 + axes]
    shown = " x ".join(f"{v:g}" for v in size)
    unplaced = geometry_codes_problem(header)
    if unplaced is not None:
        return unplaced
    if not np.all(np.isfinite(size)) or np.any(size == 0):
        return f"NIfTI header has a zero voxel size (pixdim {shown} mm)"
    if np.any(size < 0):
        return f"NIfTI header has a negative voxel size (pixdim {shown} mm): its orientation is ambiguous"
    tolerance = QFORM_SFORM_TOLERANCE * float(np.min(size))
    points = corners(header)
    if header.sform_code > 0:
        sform = sform_affine(header)
        columns = np.linalg.norm(sform[:3, :3], axis=0)
        if not np.all(np.isfinite(header.srow)) or np.any(columns[:axes] == 0):
            return "NIfTI sform has a zero-length axis (a zero voxel size)"
        rescaled = sform.copy()
        rescaled[:3, :axes] *= size / columns[:axes]
        if largest_gap(sform, rescaled, points) > tolerance:
            sform_size = " x ".join(f"{v:g}" for v in columns[:axes])
            return f"NIfTI sform voxel size ({sform_size} mm) disagrees with pixdim ({shown} mm)"
        if header.qform_code > 0:
            gap = largest_gap(qform_affine(header), sform, points)
            if gap > tolerance:
                return (
                    f"NIfTI qform and sform disagree (by up to {gap:.1f} mm across the image), so which "
                    "orientation is right cannot be known; make them agree or set one of their codes to 0"
                )
    return None


def nifti_data_problem(path: str | Path, what: str) -> str | None:
    """Why the voxels of a NIfTI-1/2 file cannot be used as read, or None.

    ITK's NIfTI reader fills the voxels missing from a truncated file with 0 without an error, and
    (before ITK 6, InsightSoftwareConsortium/ITK#6683) replaces NaN and Inf with 0: both are judged
    here on the bytes on disk, the way nibabel does it (the data must be as long as the header says).
    A damaged gzip stream is found by decompressing it whole. None also when the header cannot be
    parsed: ITK then says why.
    """
    path = Path(path)
    try:
        with open_image_file(path) as file:
            header = parse_nifti_header(file.read(540))
            if header is None or header.datatype not in NIFTI_VOXEL_BYTES:
                return None
            file.seek(header.vox_offset)
            data = file.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        return f"{what} file is damaged: its compressed data is broken or cut short ({error})"
    except OSError as error:
        return f"cannot read the {what} ({error.strerror or error})"
    count = int(np.prod(header.dim[1 : 1 + int(np.clip(header.dim[0], 1, 7))], dtype=np.int64))
    needed = count * NIFTI_VOXEL_BYTES[header.datatype]
    if len(data) < needed:
        return (
            f"{what} file is truncated: its header describes {needed} bytes of voxels, the file holds "
            f"{len(data)} ({100.0 * len(data) / max(needed, 1):.0f} %)"
        )
    if header.datatype in NIFTI_FLOAT_TYPES:
        values = np.frombuffer(data, header.order + NIFTI_FLOAT_TYPES[header.datatype], count=count)
        if not np.isfinite(values).all():
            return f"{what} has NaN or Inf voxels"
    return None
