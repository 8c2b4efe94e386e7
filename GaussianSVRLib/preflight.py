"""Everything checked before a run does any work, in one place, for the command line and the Python API.

The settings (their ranges, see settings.check), every output path (its format, its folder, that it
can be replaced, that it is no input under another name), and a lock on the outputs so that a second
run cannot write the same ones. The inputs themselves are judged as they are read (io/).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError
from .export.paths import Outputs
from .io.gaussians_file import init_path
from .io.masks import is_no_mask
from .io.outputs import (
    TRANSFORM_EXTENSIONS,
    OutputLock,
    check_folder_target,
    check_image_extension,
    check_not_inputs,
    check_target,
    same_file,
)
from .io.stacks import sidecar_path
from .settings import Settings, check

#: How each output is named in messages.
OUTPUT_NAMES = {
    "volume": "output volume",
    "gaussians": "Gaussians file",
    "ellipsoids": "ellipsoid file",
    "report": "JSON report",
    "qc": "quality-control picture",
    "transform": "transform file",
}


def input_files(
    stack_paths: Sequence[str],
    mask_paths: Sequence[str | None] | None,
    settings: Settings,
    roi_path: str | None = None,
) -> dict[Path, str]:
    """Every file the run reads, by what it is: stacks, their BIDS sidecars, masks, initial Gaussians,
    the ROI file."""
    files: dict[Path, str] = {Path(roi_path): "ROI file"} if roi_path else {}
    for path in stack_paths:
        files[Path(path)] = "input stack"
        if sidecar_path(path).is_file():
            files[sidecar_path(path)] = "sidecar of the input stack"
    for path in mask_paths or []:
        if not is_no_mask(path):
            files[Path(path)] = "input mask"
    if settings.init_gaussians:
        files[init_path(settings.init_gaussians)] = "initial Gaussians file"
    return files


def check_outputs(outputs: Outputs, stack_paths: Sequence[str] = ()) -> dict[Path, str]:
    """Refuse unusable output paths; returns every file the run may write, by what it is."""
    files = outputs.files()
    if "volume" in files:
        check_image_extension(files["volume"])
    if "qc" in files and not files["qc"].name.lower().endswith(".png"):
        raise InputError(files["qc"], "the quality-control picture must end with .png")
    if "transform" in files and not files["transform"].name.lower().endswith(TRANSFORM_EXTENSIONS):
        raise InputError(
            files["transform"], f"the transform file must end with one of {', '.join(TRANSFORM_EXTENSIONS)}"
        )
    targets: dict[Path, str] = {}
    for kind, path in files.items():
        check_target(path, OUTPUT_NAMES[kind])
        for other, what in targets.items():
            if same_file(path, other):
                raise InputError(path, f"is given both as the {what} and as the {OUTPUT_NAMES[kind]}")
        targets[path] = OUTPUT_NAMES[kind]
    if outputs.preview_dir is not None:
        check_folder_target(outputs.preview_dir, "preview folder")
        for path in outputs.previews().values():
            if path.exists() or path.is_symlink():
                check_target(path, "preview file")
            targets[path] = "preview file"
    if outputs.masks_dir is not None:
        check_folder_target(outputs.masks_dir, "mask folder")
        named: dict[Path, str] = {}
        for stack, path in zip(stack_paths, outputs.mask_files(list(stack_paths)), strict=True):
            if path in named:
                raise InputError(
                    stack, f"has the same file name as {named[path]}: their masks would both be {path}"
                )
            named[path] = stack
            if path.exists() or path.is_symlink():
                check_target(path, "output mask")
            targets[path] = f"output mask of {stack}"
    return targets


def check_run(
    stack_paths: Sequence[str],
    mask_paths: Sequence[str | None] | None,
    settings: Settings,
    outputs: Outputs,
    roi_path: str | None = None,
) -> list[str]:
    """Every check that needs no input read: the settings, the outputs, outputs against inputs. Returns
    the settings' warnings; raises InputError. Imports no torch (the command line runs it first)."""
    warnings = check(settings)
    if outputs.transform is not None and settings.output_space != "atlas":
        raise InputError(outputs.transform, "a transform file is written with --output-space atlas only")
    inputs = input_files(stack_paths, mask_paths, settings, roi_path)
    check_not_inputs(check_outputs(outputs, stack_paths), inputs)
    return warnings


@contextmanager
def preflight(
    stack_paths: Sequence[str], mask_paths: Sequence[str | None] | None, settings: Settings, outputs: Outputs
) -> Iterator[list[str]]:
    """Check before any work and hold the outputs' lock for the run; yields the settings' warnings."""
    warnings = check_run(stack_paths, mask_paths, settings, outputs)
    # The preview files are rewritten all run long: their folder is locked as one, and the masks' too.
    folders = [Path(folder) for folder in (outputs.preview_dir, outputs.masks_dir) if folder]
    locked = [*outputs.files().values(), *folders]
    with OutputLock(locked):
        yield warnings
