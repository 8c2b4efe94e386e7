"""Brain masks as files: what their values mean, and the mask on its stack's grid."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..geometry import same_grid
from .images import read_image

log = logging.getLogger(__name__)


#: A mask of integers with more distinct non-zero values than this is an image, not a label map.
MAX_MASK_LABELS = 255


#: A probability mask (values within [0, 1]) marks brain from this probability on.
PROBABILITY_THRESHOLD = 0.5


#: The mask entry (any case) of a stack that has no mask.
NO_MASK = "none"


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


def is_no_mask(entry: str | Path | None) -> bool:
    """Whether a mask entry means "this stack has no mask": None or the word "none" (any case)."""
    return entry is None or (isinstance(entry, str) and entry.strip().lower() == NO_MASK)
