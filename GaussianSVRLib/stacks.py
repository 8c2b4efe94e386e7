"""Reading and checking stacks and masks; the slices they hold, with their world geometry.

A stack is read once into a ``Stack`` (array, mask, voxel -> LPS affine, slice thickness); the
optimizer sees only ``SliceSet``: every masked pixel of every slice with its nominal world
position, and per slice its pivot, axes and PSF widths.
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path

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


@dataclass
class Stack:
    """One stack of thick slices. ``data`` and ``mask`` are indexed [k, j, i]; k is the slice axis."""

    path: str
    data: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    thickness: float

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


def read_image(path: str | Path, what: str = "image") -> sitk.Image:
    """Read a 3-D image with SimpleITK; InputError naming the file for every expected problem."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, f"{what} file does not exist")
    if path.is_dir():
        raise InputError(path, f"{what} path is a folder, not a file")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "ERROR" in line or "rror" in line), "unreadable")
        raise InputError(path, f"cannot read the {what} ({detail.strip()[:120]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel")
    if image.GetDimension() != 3:
        raise InputError(path, f"{what} is {image.GetDimension()}-D, a 3-D image is needed")
    spacing = np.asarray(image.GetSpacing())
    if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
        raise InputError(path, f"{what} has a non-positive spacing {tuple(spacing)}")
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=ORTHONORMAL_TOLERANCE):
        raise InputError(path, f"{what} has a direction matrix that is not orthonormal")
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


def read_mask(path: str | Path, stack_image: sitk.Image) -> np.ndarray:
    """A mask on the stack's grid as bool [k, j, i]; a mask on another grid is resampled (nearest)."""
    mask_image = read_image(path, "mask")
    array = sitk.GetArrayFromImage(mask_image)
    if not np.all(np.isfinite(array)):
        raise InputError(path, "mask has NaN or Inf voxels")
    if not same_grid(mask_image, stack_image):
        log.info("%s: mask is on another grid than its stack; resampled (nearest neighbour)", path)
        binary = sitk.Cast(mask_image > 0, sitk.sitkUInt8)
        resampled = sitk.Resample(binary, stack_image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        array = sitk.GetArrayFromImage(resampled)
        if not array.any() and (sitk.GetArrayFromImage(binary) > 0).any():
            raise InputError(path, "mask does not overlap its stack (geometry cannot be matched)")
    mask = array > 0
    if not mask.any():
        raise InputError(path, "mask is empty")
    return mask


#: NIfTI-1 datatype codes of floating-point voxels -> numpy type (complex ones included).
NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8", 32: "c8", 1792: "c16"}


def nifti_has_nonfinite(path: str | Path) -> bool:
    """True when a NIfTI-1/2 file stores NaN or Inf voxels.

    ITK's NIfTI reader (before ITK 6, InsightSoftwareConsortium/ITK#6683) replaces them with 0 while
    reading, so the array SimpleITK returns cannot show them: look at the bytes on disk.
    """
    path = Path(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as file:
        head = file.read(540)
        for order in "<>":
            size = int(np.frombuffer(head[:4], order + "i4")[0])
            if size in (348, 540):
                break
        else:
            return False
        if size == 348:
            dims = np.frombuffer(head[40:56], order + "i2")
            datatype = int(np.frombuffer(head[70:72], order + "i2")[0])
            offset = int(np.frombuffer(head[108:112], order + "f4")[0])
        else:
            datatype = int(np.frombuffer(head[12:14], order + "i2")[0])
            dims = np.frombuffer(head[16:80], order + "i8")
            offset = int(np.frombuffer(head[168:176], order + "i8")[0])
        if datatype not in NIFTI_FLOAT_TYPES:
            return False
        count = int(np.prod(dims[1 : 1 + int(dims[0])], dtype=np.int64))
        file.seek(offset)
        data = np.frombuffer(file.read(), order + NIFTI_FLOAT_TYPES[datatype], count=count)
    return not bool(np.isfinite(data).all())


def read_stack(
    path: str | Path, mask_path: str | Path | None = None, thickness: float | None = None
) -> Stack:
    """Read one stack (and its optional mask); thickness from the argument, the sidecar or the header."""
    image = read_image(path, "stack")
    data = sitk.GetArrayFromImage(image)
    if data.dtype.kind not in "iuf":
        raise InputError(path, f"stack has an unsupported voxel type {data.dtype}")
    data = data.astype(np.float32)
    if not np.all(np.isfinite(data)) or (
        str(path).lower().endswith((".nii", ".nii.gz")) and nifti_has_nonfinite(path)
    ):
        raise InputError(path, "stack has NaN or Inf voxels")
    if min(data.shape[1:]) < 2:
        raise InputError(path, f"stack slices are {data.shape[2]} x {data.shape[1]} pixels, too small")
    mask = read_mask(mask_path, image) if mask_path is not None else np.ones(data.shape, dtype=bool)
    if thickness is None:
        thickness = sidecar_thickness(path)
    if thickness is None:
        thickness = float(image.GetSpacing()[2])
    if not thickness > 0:
        raise InputError(path, f"slice thickness must be positive, got {thickness}")
    if not (mask & (data != 0)).any():
        raise InputError(path, "stack has no non-zero voxel inside its mask")
    return Stack(str(path), data, mask, image_affine(image), float(thickness))


def read_stacks(
    paths: list[str], mask_paths: list[str] | None = None, thicknesses: list[float] | None = None
) -> list[Stack]:
    """Read all stacks; one thickness broadcasts to every stack, masks are one per stack or none."""
    if not paths:
        raise InputError(None, "no input stack given")
    mask_paths = mask_paths or []
    thicknesses = thicknesses or []
    if mask_paths and len(mask_paths) != len(paths):
        raise InputError(mask_paths[0], f"{len(mask_paths)} masks given for {len(paths)} stacks")
    if len(thicknesses) not in (0, 1, len(paths)):
        raise InputError(paths[0], f"{len(thicknesses)} thicknesses given for {len(paths)} stacks")
    if len(thicknesses) == 1:
        thicknesses = thicknesses * len(paths)
    return [
        read_stack(path, mask_paths[s] if mask_paths else None, thicknesses[s] if thicknesses else None)
        for s, path in enumerate(paths)
    ]


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
