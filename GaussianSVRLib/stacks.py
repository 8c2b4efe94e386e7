"""Reading and checking stacks and masks; the slices they hold, with their world geometry.

A stack is read once into a ``Stack`` (array, mask, voxel -> LPS affine, slice thickness); the
optimizer sees only ``SliceSet``: every masked pixel of every slice with its nominal world
position, and per slice its pivot, axes and PSF widths.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import zlib
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import IO

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import apply_affine, image_affine, same_grid

log = logging.getLogger(__name__)

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
#: In-plane PSF FWHM as a multiple of the pixel size (SVRTK and NeSVoR convention).
IN_PLANE_FWHM_FACTOR = 1.2
#: Direction matrices whose columns deviate from orthonormal by more than this are refused.
ORTHONORMAL_TOLERANCE = 1e-3
#: A NIfTI qform and sform that place some voxel of the image further apart than this fraction of
#: the smallest voxel size disagree. Below it they differ by float rounding, or by the small shear
#: that a sform can hold and a qform cannot.
QFORM_SFORM_TOLERANCE = 0.1
#: Fewer slices cannot be registered in 3-D.
MIN_SLICES = 2
#: Wider than any MRI field of view: a stack that spans more has a spacing in wrong units.
MAX_EXTENT_MM = 1000.0
#: A mask of integers with more distinct non-zero values than this is an image, not a label map.
MAX_MASK_LABELS = 255
#: A probability mask (values within [0, 1]) marks brain from this probability on.
PROBABILITY_THRESHOLD = 0.5
#: The mask entry (any case) of a stack that has no mask.
NO_MASK = "none"


@dataclass
class Stack:
    """One stack of thick slices. ``data`` and ``mask`` are indexed [k, j, i]; k is the slice axis.

    mask_path: the mask file read for this stack, or None (then ``mask`` is all ones unless a later
    step, such as mask propagation, fills it in).
    """

    path: str
    data: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    thickness: float
    mask_path: str | None = None

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        return self.affine[:3, :3] / self.spacing

    @property
    def n_slices(self) -> int:
        return self.data.shape[0]


@dataclass
class SliceSet:
    """All masked pixels of all slices. P pixels, M slices, S stacks.

    values (P,) float32, positions (P, 3) nominal LPS mm, pixel_slice (P,) int64 slice id,
    pixel_index (P,) int64 flat index into the stack array; slice_stack (M,), slice_k (M,),
    slice_centre (M, 3) pivot in nominal LPS mm, slice_axes (M, 3, 3) unit columns (i, j, k axes),
    psf_sigma (M, 3) PSF standard deviations (mm) along those axes.
    """

    values: np.ndarray
    positions: np.ndarray
    pixel_slice: np.ndarray
    pixel_index: np.ndarray
    slice_stack: np.ndarray
    slice_k: np.ndarray
    slice_centre: np.ndarray
    slice_axes: np.ndarray
    psf_sigma: np.ndarray

    @property
    def n_slices(self) -> int:
        return len(self.slice_stack)

    @property
    def n_pixels(self) -> int:
        return len(self.values)


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


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith((".nii", ".nii.gz"))


def open_image_file(path: Path) -> IO[bytes]:
    """The file for reading bytes, through gzip for a .gz name."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


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


def nifti_has_nonfinite(path: str | Path) -> bool:
    """True when a NIfTI-1/2 file stores NaN or Inf voxels.

    ITK's NIfTI reader (before ITK 6, InsightSoftwareConsortium/ITK#6683) replaces them with 0 while
    reading, so the array SimpleITK returns cannot show them: look at the bytes on disk.
    """
    path = Path(path)
    with open_image_file(path) as file:
        header = parse_nifti_header(file.read(540))
        if header is None or header.datatype not in NIFTI_FLOAT_TYPES:
            return False
        count = int(np.prod(header.dim[1 : 1 + int(header.dim[0])], dtype=np.int64))
        file.seek(header.vox_offset)
        data = np.frombuffer(file.read(), header.order + NIFTI_FLOAT_TYPES[header.datatype], count=count)
    return not bool(np.isfinite(data).all())


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
    """A one-line reason for an ITK read failure."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if any("spacing" in line.lower() for line in lines):
        found = re.search(r"to (\[[^\]]*\])", lines[-1])
        shown = f" {found.group(1)}" if found else ""
        return f"{what} has a zero or invalid spacing{shown} in its header"
    if any("orthonormal" in line.lower() for line in lines):
        return f"{what} has a direction matrix that is not orthonormal (a skewed or degenerate grid)"
    detail = next((line for line in lines if "ERROR" in line or "rror" in line), "unreadable")
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
    problem = header_problem(path, what)
    if problem is not None:
        raise InputError(path, problem)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        header = read_nifti_header(path) if is_nifti(path) else None
        if header is not None and header.version == 2:
            raise InputError(
                path, f"{what} is a NIfTI-2 file, which this ITK cannot read: save it as NIfTI-1"
            ) from None
        raise InputError(path, itk_read_problem(exc, what)) from None
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


def sidecar_thickness(path: str | Path) -> float | None:
    """SliceThickness from a BIDS JSON sidecar beside the image, if there is one."""
    path = Path(path)
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    sidecar = path.with_name(name + ".json")
    if not sidecar.exists():
        return None
    try:
        value = json.loads(sidecar.read_text()).get("SliceThickness")
    except (json.JSONDecodeError, OSError, AttributeError):
        log.warning("%s: unreadable JSON sidecar, ignored", sidecar)
        return None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def brain_from_mask_values(array: np.ndarray, path: str | Path) -> np.ndarray:
    """The brain (bool, same shape) that a mask's values mark.

    0/1: a binary mask. Non-negative integers: a label map, every label is brain. Values within
    [0, 1]: a probability map, brain from PROBABILITY_THRESHOLD on. Anything else (negative values,
    fractions above 1, too many labels) is most likely an image given as a mask: refused.
    """
    if not np.all(np.isfinite(array)):
        raise InputError(path, "mask has NaN or Inf voxels")
    low, high = float(array.min()), float(array.max())
    if low < 0:
        raise InputError(path, f"mask has negative values (down to {low:g}); a mask is 0 outside, 1 inside")
    if high <= 1 and (array.dtype.kind in "iub" or np.all((array == 0) | (array == 1))):
        return array > 0
    integers = array.dtype.kind in "iu" or bool(np.all(array == np.round(array)))
    if integers:
        labels = len(np.unique(array)) - int(low == 0)
        if labels <= MAX_MASK_LABELS:
            log.info("%s: mask is a label map (%d labels), every label is taken as brain", path, labels)
            return array > 0
    elif high <= 1:
        log.info("%s: mask is a probability map, brain where p >= %g", path, PROBABILITY_THRESHOLD)
        return array >= PROBABILITY_THRESHOLD
    fractions = "" if integers else ", with fractions"
    raise InputError(
        path,
        f"mask has values other than 0/1 (from {low:.4g} to {high:.4g}{fractions}) and is neither a label "
        "map nor a probability map: is it an image rather than a mask?",
    )


def read_mask(path: str | Path, stack_image: sitk.Image) -> np.ndarray:
    """A mask on the stack's grid as bool [k, j, i]; a mask on another grid is resampled (nearest)."""
    mask_image = read_image(path, "mask")
    array = sitk.GetArrayFromImage(mask_image)
    if is_nifti(path) and nifti_has_nonfinite(path):
        raise InputError(path, "mask has NaN or Inf voxels")
    brain = brain_from_mask_values(array, path)
    if not same_grid(mask_image, stack_image):
        log.info("%s: mask is on another grid than its stack; resampled (nearest neighbour)", path)
        binary = sitk.GetImageFromArray(brain.astype(np.uint8))
        binary.CopyInformation(mask_image)
        resampled = sitk.Resample(binary, stack_image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        on_stack = sitk.GetArrayFromImage(resampled) > 0
        if not on_stack.any() and brain.any():
            raise InputError(path, "mask does not overlap its stack (geometry cannot be matched)")
        brain = on_stack
    if not brain.any():
        raise InputError(path, "mask is empty")
    return brain


def stack_voxels(image: sitk.Image, path: str | Path) -> np.ndarray:
    """The stack's voxels as float32 [k, j, i]: integers are converted before any arithmetic can overflow."""
    data = sitk.GetArrayFromImage(image)
    if data.dtype.kind not in "iuf":
        raise InputError(path, f"stack has an unsupported voxel type {data.dtype}")
    if data.dtype.kind == "f" and np.isfinite(data).all():
        largest = float(np.abs(data).max(initial=0.0))
        if largest > float(np.finfo(np.float32).max):
            raise InputError(path, f"stack has voxel values beyond the float32 range (up to {largest:.3g})")
    data = data.astype(np.float32)
    if not np.all(np.isfinite(data)) or (is_nifti(path) and nifti_has_nonfinite(path)):
        raise InputError(path, "stack has NaN or Inf voxels")
    return data


def check_stack_shape(data: np.ndarray, spacing: np.ndarray, path: str | Path) -> None:
    """Refuse stacks that are too thin to register, or too large to be in millimetres."""
    nk, nj, ni = data.shape
    if nk < MIN_SLICES:
        raise InputError(
            path, f"stack has a single slice; at least {MIN_SLICES} are needed to register it in 3-D"
        )
    if min(ni, nj) < 2:
        raise InputError(
            path,
            f"stack slices are {ni} x {nj} pixels, too small: a slice needs at least 2 pixels each way "
            "(the slice axis must be the image's third axis)",
        )
    extent = spacing * np.array([ni, nj, nk])
    if extent.max() > MAX_EXTENT_MM:
        raise InputError(
            path,
            f"stack spans {extent.max():.0f} mm, more than any MRI field of view ({MAX_EXTENT_MM:.0f} mm): "
            f"is its spacing {tuple(round(float(s), 4) for s in spacing)} really in millimetres?",
        )


def is_no_mask(entry: str | Path | None) -> bool:
    """Whether a mask entry means "this stack has no mask": None or the word "none" (any case)."""
    return entry is None or (isinstance(entry, str) and entry.strip().lower() == NO_MASK)


def read_stack(
    path: str | Path, mask_path: str | Path | None = None, thickness: float | None = None
) -> Stack:
    """Read one stack and its mask (None or "none": no mask, all ones); thickness from the argument,
    the sidecar or the header."""
    if is_no_mask(mask_path):
        mask_path = None
    image = read_image(path, "stack")
    data = stack_voxels(image, path)
    check_stack_shape(data, np.asarray(image.GetSpacing()), path)
    mask = read_mask(mask_path, image) if mask_path is not None else np.ones(data.shape, dtype=bool)
    if thickness is None:
        thickness = sidecar_thickness(path)
    if thickness is None:
        thickness = float(image.GetSpacing()[2])
    if not thickness > 0:
        raise InputError(path, f"slice thickness must be positive, got {thickness}")
    if not (mask & (data != 0)).any():
        raise InputError(path, "stack has no non-zero voxel inside its mask")
    return Stack(
        str(path),
        data,
        mask,
        image_affine(image),
        float(thickness),
        None if mask_path is None else str(mask_path),
    )


def check_distinct_paths(paths: list[str]) -> None:
    """Refuse a stack file given twice (its slices would count twice)."""
    seen: dict[Path, int] = {}
    for s, path in enumerate(paths):
        resolved = Path(path).resolve()
        if resolved in seen:
            raise InputError(path, f"stack is given twice (as stacks {seen[resolved] + 1} and {s + 1})")
        seen[resolved] = s


def warn_identical_stacks(stacks: list[Stack]) -> None:
    """Warn about two stacks with the same grid and voxels (one stack copied under two names): their
    slices count twice. Only a warning, since a copy does no harm beyond that weight."""
    for s, stack in enumerate(stacks):
        for other in stacks[:s]:
            if (
                stack.data.shape == other.data.shape
                and np.array_equal(stack.affine, other.affine)
                and np.array_equal(stack.data, other.data)
            ):
                log.warning("%s: stack is identical to %s; its slices count twice", stack.path, other.path)


def world_box(stack: Stack) -> tuple[np.ndarray, np.ndarray]:
    """The LPS bounding box (low (3,), high (3,)) of the stack's masked voxels, each voxel a whole box."""
    low, high = [], []
    for axis in range(3):
        present = np.nonzero(stack.mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        low.append(present[0] - 0.5)
        high.append(present[-1] + 0.5)
    index = np.array(list(product(*zip(low[::-1], high[::-1], strict=True))))  # (8, 3) as (i, j, k)
    world = apply_affine(stack.affine, index)
    return world.min(axis=0), world.max(axis=0)


def check_fields_of_view(stacks: list[Stack], reference: int | None = None) -> None:
    """Refuse a stack whose (masked) region lies entirely outside the reference stack's.

    Boxes are axis-aligned in LPS, so oblique stacks are compared generously: only a stack that
    cannot share any anatomy with the reference is refused. Without a reference index, the stack
    whose box overlaps most others is the reference (the first on a tie).
    """
    boxes = [world_box(stack) for stack in stacks]

    def overlap(a: int, b: int) -> bool:
        return bool(np.all(boxes[a][0] < boxes[b][1]) and np.all(boxes[b][0] < boxes[a][1]))

    if reference is None:
        counts = [sum(overlap(s, t) for t in range(len(stacks)) if t != s) for s in range(len(stacks))]
        reference = int(np.argmax(counts))
    for s, stack in enumerate(stacks):
        if s != reference and not overlap(s, reference):
            low, high = boxes[s]
            ref_low, ref_high = boxes[reference]
            gap = float(np.max(np.maximum(low - ref_high, ref_low - high)))
            raise InputError(
                stack.path,
                f"stack lies entirely outside the field of view of {stacks[reference].path} "
                f"({'masked regions' if stack.mask_path or stacks[reference].mask_path else 'images'} "
                f"{gap:.0f} mm apart): check the origin in its header",
            )


def read_stacks(
    paths: list[str],
    mask_paths: list[str | None] | None = None,
    thicknesses: list[float] | None = None,
) -> list[Stack]:
    """Read all stacks; one thickness broadcasts to every stack; masks are one per stack or none.

    A mask entry that is None or "none" (any case) means that stack has no mask. The stacks must be
    distinct and share a field of view.
    """
    if not paths:
        raise InputError(None, "no input stack given")
    masks = [None if is_no_mask(entry) else str(entry) for entry in mask_paths or []]
    thicknesses = thicknesses or []
    if masks and len(masks) != len(paths):
        named = next((m for m in masks if m is not None), "--stack-masks")
        raise InputError(named, f"{len(masks)} masks given for {len(paths)} stacks")
    if len(thicknesses) not in (0, 1, len(paths)):
        raise InputError(paths[0], f"{len(thicknesses)} thicknesses given for {len(paths)} stacks")
    if len(thicknesses) == 1:
        thicknesses = thicknesses * len(paths)
    check_distinct_paths(paths)
    stacks = [
        read_stack(path, masks[s] if masks else None, thicknesses[s] if thicknesses else None)
        for s, path in enumerate(paths)
    ]
    warn_identical_stacks(stacks)
    check_fields_of_view(stacks)
    return stacks


def psf_sigmas(stack: Stack, in_plane_factor: float = IN_PLANE_FWHM_FACTOR) -> np.ndarray:
    """PSF standard deviations (3,) in mm along the stack's i, j, k axes."""
    spacing = stack.spacing
    fwhm = np.array([in_plane_factor * spacing[0], in_plane_factor * spacing[1], stack.thickness])
    return fwhm * FWHM_TO_SIGMA


def extract_slices(stacks: list[Stack], in_plane_factor: float = IN_PLANE_FWHM_FACTOR) -> SliceSet:
    """Every masked pixel of every slice with its nominal world position; empty slices are skipped."""
    values, positions, pixel_slice, pixel_index = [], [], [], []
    slice_stack, slice_k, slice_centre, slice_axes, sigma = [], [], [], [], []
    for s, stack in enumerate(stacks):
        nk, nj, ni = stack.data.shape
        axes = stack.direction
        sig = psf_sigmas(stack, in_plane_factor)
        for k in range(nk):
            jj, ii = np.nonzero(stack.mask[k])
            if len(ii) == 0:
                continue
            index = np.stack([ii, jj, np.full_like(ii, k)], -1).astype(np.float64)
            world = apply_affine(stack.affine, index)
            centre_index = np.array([(ni - 1) / 2.0, (nj - 1) / 2.0, k])
            values.append(stack.data[k, jj, ii])
            positions.append(world)
            pixel_slice.append(np.full(len(ii), len(slice_stack), dtype=np.int64))
            pixel_index.append((k * nj + jj) * ni + ii)
            slice_stack.append(s)
            slice_k.append(k)
            slice_centre.append(apply_affine(stack.affine, centre_index))
            slice_axes.append(axes)
            sigma.append(sig)
    return SliceSet(
        values=np.concatenate(values).astype(np.float32),
        positions=np.concatenate(positions),
        pixel_slice=np.concatenate(pixel_slice),
        pixel_index=np.concatenate(pixel_index).astype(np.int64),
        slice_stack=np.asarray(slice_stack, dtype=np.int64),
        slice_k=np.asarray(slice_k, dtype=np.int64),
        slice_centre=np.asarray(slice_centre),
        slice_axes=np.asarray(slice_axes),
        psf_sigma=np.asarray(sigma),
    )


def coarsen_slices(slices: SliceSet, stacks: list[Stack], factor: int = 2) -> SliceSet:
    """The same slices at 1/factor in-plane resolution, for the coarse stage of coarse-to-fine.

    Keeps one pixel per factor x factor block (its top-left pixel must be in the mask), moved to
    the block centre, with the block mean as its value and an in-plane PSF widened to the block.
    Slice ids, centres and axes are unchanged, so motion carries over between stages.
    """
    stack_of_pixel = slices.slice_stack[slices.pixel_slice]
    keep = np.zeros(slices.n_pixels, dtype=bool)
    values = slices.values.copy()
    positions = slices.positions.copy()
    for s, stack in enumerate(stacks):
        on_stack = np.nonzero(stack_of_pixel == s)[0]
        nk, nj, ni = stack.data.shape
        flat = slices.pixel_index[on_stack]
        i, j, k = flat % ni, (flat // ni) % nj, flat // (ni * nj)
        corner = (i % factor == 0) & (j % factor == 0)
        sel = on_stack[corner]
        keep[sel] = True
        pad = ((0, 0), (0, (-nj) % factor), (0, (-ni) % factor))
        padded = np.pad(stack.data, pad, mode="edge")
        blocks = padded.reshape(nk, padded.shape[1] // factor, factor, padded.shape[2] // factor, factor)
        means = blocks.mean(axis=(2, 4))
        values[sel] = means[k[corner], j[corner] // factor, i[corner] // factor]
        shift = (factor - 1) / 2.0 * (stack.affine[:3, 0] + stack.affine[:3, 1])
        positions[sel] += shift
    sigma = slices.psf_sigma.copy()
    sigma[:, :2] *= factor
    return SliceSet(
        values=values[keep],
        positions=positions[keep],
        pixel_slice=slices.pixel_slice[keep],
        pixel_index=slices.pixel_index[keep],
        slice_stack=slices.slice_stack,
        slice_k=slices.slice_k,
        slice_centre=slices.slice_centre,
        slice_axes=slices.slice_axes,
        psf_sigma=sigma,
    )
