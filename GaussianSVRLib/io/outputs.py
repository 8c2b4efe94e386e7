"""Writing files whole or not at all.

Every writer is atomic: it writes a hidden temporary file in the destination folder whose name keeps
the destination's extension (so writers that choose the format by extension pick the right one) and
renames it over the destination with ``os.replace``. On any failure the temporary file is removed,
the error propagates and an existing destination is left untouched.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

_COMPOUND_EXTENSIONS = (".nii.gz",)


#: Formats that keep the voxels in a second file named inside the header: a rename cannot move both.
_DETACHED_HEADER_EXTENSIONS = (".nhdr", ".mhd", ".hdr", ".img")


def _extension(path: Path) -> str:
    lower = path.name.lower()
    for compound in _COMPOUND_EXTENSIONS:
        if lower.endswith(compound):
            return path.name[-len(compound) :]
    return path.suffix


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
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
    with atomic_path(target) as temporary:
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
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
