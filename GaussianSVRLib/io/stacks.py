"""Reading and checking stacks: a stack is read once into a ``Stack`` (array, mask, voxel -> LPS
affine, slice thickness)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..geometry import apply_affine, image_affine
from ..settings import Range
from .images import IMAGE_EXTENSIONS, read_image
from .masks import is_no_mask, read_mask

log = logging.getLogger(__name__)


#: Fewer slices cannot be registered in 3-D.
MIN_SLICES = 2
#: Wider than any MRI field of view: a stack that spans more has a spacing in wrong units.
MAX_EXTENT_MM = 1000.0
#: Slice thicknesses (mm) that can be reconstructed, and those MRI stacks usually have (else a warning).
THICKNESS_LIMITS = Range(0.0, 30.0, low_open=True)
THICKNESS_PLAUSIBLE = Range(0.5, 10.0)
#: Voxels are kept near 1 (a power-of-two rescale, exact) when they are this far from it: beyond,
#: squares and sums in float32 overflow or underflow.
SAFE_MAGNITUDE = Range(1e-12, 1e12)


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
    #: The file's voxel values are ``data * intensity_unit`` (see normalized_intensities).
    intensity_unit: float = 1.0

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        return self.affine[:3, :3] / self.spacing

    @property
    def n_slices(self) -> int:
        return self.data.shape[0]


def sidecar_path(path: str | Path) -> Path:
    """The BIDS JSON sidecar that belongs to an image (whether it exists or not)."""
    path = Path(path)
    lower = path.name.lower()
    stem = next((path.name[: -len(e)] for e in IMAGE_EXTENSIONS if lower.endswith(e)), path.stem)
    return path.with_name(stem + ".json")


def sidecar_value(path: str | Path, key: str) -> object | None:
    """The value of ``key`` in the BIDS JSON sidecar beside the image, None without sidecar or key;
    an unreadable sidecar is ignored with a warning."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text(encoding="utf-8")).get(key)
    except (json.JSONDecodeError, OSError, AttributeError, UnicodeDecodeError):
        log.warning("%s: unreadable JSON sidecar, ignored", sidecar)
        return None


def is_number(value: object) -> bool:
    """An int or a float from JSON (a boolean is no number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sidecar_thickness(path: str | Path) -> float | None:
    """SliceThickness from a BIDS JSON sidecar beside the image, if there is one; a sidecar without a
    usable value is ignored with a warning."""
    value = sidecar_value(path, "SliceThickness")
    if value is None:
        return None
    if not is_number(value) or not value > 0:
        log.warning("%s: SliceThickness %r is not a positive number, ignored", sidecar_path(path), value)
        return None
    return float(value)


def check_thickness(thickness: float, path: str | Path, source: str) -> float:
    """The slice thickness (mm) if it can be reconstructed; a warning when it is unusual."""
    if thickness not in THICKNESS_LIMITS:
        raise InputError(
            path, f"slice thickness {thickness:g} mm (from {source}) must be {THICKNESS_LIMITS} mm"
        )
    if thickness not in THICKNESS_PLAUSIBLE:
        log.warning(
            "%s: slice thickness %g mm (from %s) is unusual (usually %s mm)", path, thickness, source,
            THICKNESS_PLAUSIBLE,
        )  # fmt: skip
    return float(thickness)


def stack_voxels(image: sitk.Image, path: str | Path) -> tuple[np.ndarray, float]:
    """The stack's voxels as float32 [k, j, i] and the unit they are in (file value = voxel * unit).

    Integers are converted before any arithmetic can overflow. Values far from 1 (a stack scaled by
    1e-30, or near the float32 maximum) are rescaled by a power of two, in float64, so that the
    reconstruction's float32 arithmetic neither overflows nor underflows.
    """
    data = sitk.GetArrayFromImage(image)
    if data.dtype.kind not in "iuf":
        raise InputError(path, f"stack has an unsupported voxel type {data.dtype}")
    data = data.astype(np.float64)
    if not np.all(np.isfinite(data)):
        raise InputError(path, "stack has NaN or Inf voxels")
    magnitude = np.abs(data[data != 0])
    unit = 1.0
    if magnitude.size and not (magnitude.min() in SAFE_MAGNITUDE and magnitude.max() in SAFE_MAGNITUDE):
        unit = float(2.0 ** np.round(np.log2(np.median(magnitude))))
        data = data / unit
    largest = float(np.abs(data).max(initial=0.0))
    if largest > float(np.finfo(np.float32).max) / 1e6:
        raise InputError(
            path,
            f"stack has voxel values beyond the float32 range of the reconstruction (up to "
            f"{largest * unit:.3g}, median {np.median(magnitude):.3g}): a few voxels are far brighter "
            "than the rest",
        )
    return data.astype(np.float32), unit


def normalized_intensities(stack: Stack) -> Stack:
    """The stack divided by the median of its non-zero voxels inside its mask (so every stack starts at
    a comparable level whatever the scanner's scaling); ``intensity_unit`` keeps the file's units."""
    inside = np.abs(stack.data[stack.mask & (stack.data != 0)])
    level = float(np.median(inside)) if inside.size else 1.0
    return replace(
        stack, data=(stack.data / level).astype(np.float32), intensity_unit=stack.intensity_unit * level
    )


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


def read_stack(
    path: str | Path, mask_path: str | Path | None = None, thickness: float | None = None
) -> Stack:
    """Read one stack and its mask (None or "none": no mask, all ones); thickness from the argument,
    the sidecar or the header."""
    if is_no_mask(mask_path):
        mask_path = None
    image = read_image(path, "stack")
    data, unit = stack_voxels(image, path)
    check_stack_shape(data, np.asarray(image.GetSpacing()), path)
    mask = read_mask(mask_path, image) if mask_path is not None else np.ones(data.shape, dtype=bool)
    source = "--thicknesses"
    if thickness is None:
        thickness, source = sidecar_thickness(path), f"its sidecar {sidecar_path(path).name}"
    if thickness is None:
        thickness, source = float(image.GetSpacing()[2]), "the slice spacing in its header"
    thickness = check_thickness(thickness, path, source)
    if not (mask & (data != 0)).any():
        raise InputError(path, "stack has no non-zero voxel inside its mask")
    return Stack(
        str(path),
        data,
        mask,
        image_affine(image),
        float(thickness),
        None if mask_path is None else str(mask_path),
        unit,
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
