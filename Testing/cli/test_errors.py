"""The catalogue of bad inputs and faults: files that are not what they claim (wrong, damaged, cut
short), settings out of range, outputs that must not be written (inputs under any name, devices,
links, locked by another run), and writes that fail (a full disk, a file-size limit), each through a
real ``python -m GaussianSVRLib reconstruct`` process.

Each case must exit with code 2, print exactly one line on stderr naming the file (or flag) and the
problem (after the warnings it expects, if any), with no traceback; print nothing on stdout, or with
``--progress json`` exactly one protocol "error" message (which also proves the run failed before
optimization started); leave nothing new in its output folder nor beside its inputs; and leave its
inputs (and any earlier output) byte-identical.

The processes are independent and spend most of their time importing torch, so the module fixture
runs them a few at a time and the tests then check one outcome each.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from GaussianSVRLib.cli import EXIT_INPUT_ERROR
from GaussianSVRLib.io.progress import decode
from GaussianSVRLib.settings import Settings
from GaussianSVRLib.sim.simulate import SimulationResult

#: Whole processes end to end: left out of the quick loop (make test-quick).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
#: Tiny settings, so that an error the engine fails to catch early still ends in seconds.
TINY = ["--n-gaussians", "200", "--iterations", "2", "--batch-pixels", "1024", "--no-prealign"]
#: Generous: a case that takes this long ran the optimization, which is itself the bug.
TIMEOUT_S = 240
PARALLEL_RUNS = 4


@dataclass
class Case:
    """One bad invocation. args: the reconstruct flags (TINY and --progress are added)."""

    args: list[str]
    names: list[str]  # what the one stderr line must name: file paths or flags
    problem: str  # a keyword of the problem, matched case-insensitively
    watched: list[Path]  # folders where nothing may appear
    json: bool = False  # --progress json instead of the default bar mode
    inputs: list[Path] = field(default_factory=list)  # filled in: files that must stay unchanged
    file_size_limit: int | None = None  # RLIMIT_FSIZE of the run, in bytes
    warnings: list[str] = field(default_factory=list)  # keywords of the warnings expected before the error


@dataclass
class Snapshot:
    """The entries of the watched folders and the hashes of the inputs."""

    listings: dict[Path, list[str]]
    hashes: dict[Path, str]


@dataclass
class Outcome:
    case: Case
    returncode: int | None  # None: timed out
    stdout: str
    stderr: str
    seconds: float
    before: Snapshot
    after: Snapshot


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> list[str]:
    """Every entry of the folder, hidden ones (temporary files) included; [] for a missing folder."""
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def write(array: np.ndarray, reference: sitk.Image | None, path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    if reference is not None:
        image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))
    return path


def outputs(out: Path) -> list[str]:
    """Every kind of output, all in ``out``."""
    return [
        "--output-volume", str(out / "recon.nii.gz"),
        "--output-gaussians", str(out / "gaussians.vtp"),
        "--output-json", str(out / "report.json"),
        "--preview-dir", str(out / "preview"),
    ]  # fmt: skip


def stack_args(stacks: SimulationResult, n: int = 3, masks: bool = True) -> list[str]:
    args = ["--input-stacks", *stacks.stack_paths[:n]]
    return args + (["--stack-masks", *stacks.mask_paths[:n]] if masks else [])


def volume_elsewhere(volume: Path, out: Path) -> list[str]:
    """The volume at a bad place; the report in the good folder ``out``, where nothing may appear either."""
    return ["--output-volume", str(volume), "--output-json", str(out / "report.json")]


def unwritable_folder(root: Path) -> Path | None:
    """A folder nobody can create files in: mode 0o500, or for root (whom modes do not stop) /sys.

    None when neither works on this machine.
    """
    locked = root / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    for folder in (locked, Path("/sys")):
        probe = folder / ".gaussiansvr-probe"
        try:
            probe.touch()
        except OSError:
            return folder
        probe.unlink()
    return None


# Each builder gets an empty folder ``root`` (with an empty ``root/out``) and the phantom stacks.
Builder = Callable[[Path, SimulationResult], Case | None]


def missing_file(root: Path, stacks: SimulationResult) -> Case:
    missing = root / "absent.nii.gz"
    args = ["--input-stacks", stacks.stack_paths[0], str(missing)]
    return Case(args + outputs(root / "out"), [str(missing)], "does not exist", [root / "out"], json=True)


def unreadable_file(root: Path, stacks: SimulationResult) -> Case:
    garbage = root / "garbage.nii.gz"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    args = ["--input-stacks", stacks.stack_paths[0], str(garbage)]
    return Case(args + outputs(root / "out"), [str(garbage)], "cannot read", [root, root / "out"])


def image_2d(root: Path, stacks: SimulationResult) -> Case:
    flat = write(np.ones((16, 16), np.float32), None, root / "flat.nii.gz")
    args = ["--input-stacks", str(flat)] + outputs(root / "out")
    return Case(args, [str(flat)], "2-D", [root, root / "out"])


def image_4d(root: Path, stacks: SimulationResult) -> Case:
    stack = sitk.ReadImage(stacks.stack_paths[0])
    series = root / "series.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([stack, stack]), str(series))
    args = ["--input-stacks", stacks.stack_paths[0], str(series)]
    return Case(args + outputs(root / "out"), [str(series)], "4-D", [root, root / "out"], json=True)


def mask_elsewhere(root: Path, stacks: SimulationResult) -> Case:
    """A mask on a grid 500 mm away from its stack: resampling cannot match it."""
    mask = sitk.ReadImage(stacks.mask_paths[1])
    mask.SetOrigin(tuple(np.asarray(mask.GetOrigin()) + [500.0, 0.0, 0.0]))
    moved = root / "mask_elsewhere.nii.gz"
    sitk.WriteImage(mask, str(moved))
    args = ["--input-stacks", *stacks.stack_paths[:2], "--stack-masks", stacks.mask_paths[0], str(moved)]
    return Case(args + outputs(root / "out"), [str(moved)], "overlap", [root, root / "out"])


def empty_mask(root: Path, stacks: SimulationResult) -> Case:
    mask = sitk.ReadImage(stacks.mask_paths[1])
    empty = write(np.zeros(sitk.GetArrayFromImage(mask).shape, np.uint8), mask, root / "mask_empty.nii.gz")
    args = ["--input-stacks", *stacks.stack_paths[:2], "--stack-masks", stacks.mask_paths[0], str(empty)]
    return Case(args + outputs(root / "out"), [str(empty)], "empty", [root, root / "out"], json=True)


def bad_voxel(value: float, keyword: str, extension: str, json: bool) -> Builder:
    """A stack with one non-finite voxel inside the brain.

    NIfTI is what users have; NRRD too because ITK's NIfTI reader (before ITK 6) silently turns
    non-finite voxels into 0, which only the NIfTI cases can catch.
    """

    def build(root: Path, stacks: SimulationResult) -> Case:
        stack = sitk.ReadImage(stacks.stack_paths[1])
        array = sitk.GetArrayFromImage(stack).astype(np.float32)
        k, j, i = (n // 2 for n in array.shape)  # inside the brain mask
        array[k, j, i] = value
        bad = write(array, stack, root / f"stack_{keyword.lower()}{extension}")
        args = ["--input-stacks", stacks.stack_paths[0], str(bad)]
        return Case(args + outputs(root / "out"), [str(bad)], keyword, [root, root / "out"], json=json)

    return build


def wrong_thickness_count(root: Path, stacks: SimulationResult) -> Case:
    args = stack_args(stacks) + ["--thicknesses", "2.4", "2.4"]
    return Case(args + outputs(root / "out"), [stacks.stack_paths[0]], "thicknesses", [root / "out"])


def wrong_mask_count(root: Path, stacks: SimulationResult) -> Case:
    args = stack_args(stacks, masks=False) + ["--stack-masks", *stacks.mask_paths[:2]]
    return Case(args + outputs(root / "out"), [stacks.mask_paths[0]], "masks", [root / "out"], json=True)


def bad_number(flag: str, value: str, problem: str, json: bool = False) -> Builder:
    """A flag value argparse must refuse (non-positive or not finite)."""

    def build(root: Path, stacks: SimulationResult) -> Case:
        args = stack_args(stacks) + outputs(root / "out")
        if flag != "--output-resolution":
            args += ["--output-resolution", "1.5"]
        return Case(args + [flag, value], [flag], problem, [root / "out"], json=json)

    return build


def unwritable_output(root: Path, stacks: SimulationResult) -> Case | None:
    folder = unwritable_folder(root)
    if folder is None:
        return None
    volume = folder / "recon.nii.gz"
    args = stack_args(stacks) + volume_elsewhere(volume, root / "out")
    return Case(args, [str(volume)], "writable", [folder, root / "out"], json=True)


def missing_output_folder(root: Path, stacks: SimulationResult) -> Case:
    volume = root / "out" / "not_there" / "recon.nii.gz"
    args = stack_args(stacks) + volume_elsewhere(volume, root / "out")
    return Case(args, [str(volume)], "does not exist", [root / "out"])


def output_folder_is_file(root: Path, stacks: SimulationResult) -> Case:
    (root / "out" / "a_file").write_text("not a folder\n")
    volume = root / "out" / "a_file" / "recon.nii.gz"
    args = stack_args(stacks) + volume_elsewhere(volume, root / "out")
    return Case(args, [str(volume)], "folder", [root / "out"], json=True)


def grid_too_large(root: Path, stacks: SimulationResult) -> Case:
    args = stack_args(stacks) + outputs(root / "out") + ["--output-resolution", "0.05"]
    case = Case(args, [str(root / "out" / "recon.nii.gz")], "GiB", [root / "out"], json=True)
    case.warnings = ["--output-resolution 0.05 mm is unusual"]
    return case


def cuda_without_gpu(root: Path, stacks: SimulationResult) -> Case | None:
    if torch.cuda.is_available():
        return None
    args = stack_args(stacks) + outputs(root / "out") + ["--device", "cuda"]
    return Case(args, ["--device"], "cuda", [root / "out"])


def tiny_stack(dtype: type = np.float32, shape: tuple[int, int, int] = (6, 12, 12)) -> np.ndarray:
    """A small stack [k, j, i] of non-zero intensities: cases refused at read time need no anatomy."""
    return (np.arange(np.prod(shape)).reshape(shape) % 50 + 1).astype(dtype)


def one_bad_stack(root: Path, stacks: SimulationResult, bad: Path, problem: str, json: bool = False) -> Case:
    """A good stack followed by the bad one, no masks."""
    args = ["--input-stacks", stacks.stack_paths[0], str(bad)] + outputs(root / "out")
    return Case(args, [str(bad)], problem, [root, root / "out"], json=json)


def one_bad_mask(root: Path, stacks: SimulationResult, bad: Path, problem: str, json: bool = False) -> Case:
    """Two good stacks, the second with the bad mask."""
    args = ["--input-stacks", *stacks.stack_paths[:2], "--stack-masks", stacks.mask_paths[0], str(bad)]
    return Case(args + outputs(root / "out"), [str(bad)], problem, [root, root / "out"], json=json)


def patched_nifti(source: str, target: Path, patch: Callable[[bytearray], None]) -> Path:
    """The image rewritten as uncompressed NIfTI-1 by SimpleITK (qform and sform both set), then its
    header bytes changed by ``patch``, as another tool might have written them."""
    sitk.WriteImage(sitk.ReadImage(source), str(target))
    raw = bytearray(target.read_bytes())
    patch(raw)
    target.write_bytes(bytes(raw))
    return target


def write_nrrd(array: np.ndarray, directions: str, path: Path) -> Path:
    """A raw float32 NRRD [k, j, i] with the given "space directions" field, written by hand."""
    header = (f"NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\n"
              f"sizes: {array.shape[2]} {array.shape[1]} {array.shape[0]}\nspace directions: {directions}\n"
              "space origin: (0,0,0)\nendian: little\nencoding: raw\n\n")  # fmt: skip
    path.write_bytes(header.encode() + array.astype("<f4").tobytes())
    return path


def qform_sform_disagree(root: Path, stacks: SimulationResult) -> Case:
    """The sform mirrored left-right against the qform (radiological vs neurological convention)."""

    def mirror_sform(raw: bytearray) -> None:
        row = struct.unpack("<4f", raw[280:296])
        raw[280:296] = struct.pack("<4f", *(-v for v in row))

    bad = patched_nifti(stacks.stack_paths[1], root / "mirrored_sform.nii", mirror_sform)
    return one_bad_stack(root, stacks, bad, "qform and sform disagree", json=True)


def single_slice(root: Path, stacks: SimulationResult) -> Case:
    bad = write(tiny_stack(shape=(1, 12, 12)), None, root / "one_slice.nii.gz")
    return one_bad_stack(root, stacks, bad, "single slice")


def one_pixel_wide(root: Path, stacks: SimulationResult) -> Case:
    bad = write(tiny_stack(shape=(6, 12, 1)), None, root / "one_pixel_wide.nii.gz")
    return one_bad_stack(root, stacks, bad, "at least 2 pixels", json=True)


def complex_voxels(root: Path, stacks: SimulationResult) -> Case:
    bad = write(tiny_stack(np.complex64), None, root / "complex.nii.gz")
    return one_bad_stack(root, stacks, bad, "complex")


def rgb_voxels(root: Path, stacks: SimulationResult) -> Case:
    bad = root / "rgb.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([tiny_stack(np.uint8)] * 3, -1), isVector=True), str(bad))
    return one_bad_stack(root, stacks, bad, "3 components", json=True)


def beyond_float32(root: Path, stacks: SimulationResult) -> Case:
    """A float64 voxel that float32 cannot hold: it would silently become Inf."""
    array = tiny_stack(np.float64)
    array[3, 6, 6] = 1e300
    bad = write(array, None, root / "float64_huge.nii.gz")
    return one_bad_stack(root, stacks, bad, "float32 range")


def zero_spacing(root: Path, stacks: SimulationResult) -> Case:
    bad = write_nrrd(tiny_stack(), "(1.2,0,0) (0,0,0) (0,0,2.4)", root / "zero_spacing.nrrd")
    return one_bad_stack(root, stacks, bad, "zero or invalid spacing [1.2, 0, 2.4]", json=True)


def negative_spacing(root: Path, stacks: SimulationResult) -> Case:
    """pixdim[1] < 0: ITK would flip the axis, another reader would not."""

    def negate_pixdim(raw: bytearray) -> None:
        raw[80:84] = struct.pack("<f", -struct.unpack("<f", raw[80:84])[0])

    bad = patched_nifti(stacks.stack_paths[1], root / "negative_pixdim.nii", negate_pixdim)
    return one_bad_stack(root, stacks, bad, "negative voxel size")


def skewed_directions(root: Path, stacks: SimulationResult) -> Case:
    bad = write_nrrd(tiny_stack(), "(1.2,0,0) (0.3,1.2,0) (0,0,2.4)", root / "skewed.nrrd")
    return one_bad_stack(root, stacks, bad, "not orthonormal", json=True)


def stack_in_micrometres(root: Path, stacks: SimulationResult) -> Case:
    """Spacing written in micrometres: a stack metres wide, whose output grid could never be held."""
    stack = sitk.ReadImage(stacks.stack_paths[1])
    stack.SetSpacing(tuple(1000.0 * v for v in stack.GetSpacing()))
    bad = root / "micrometres.nii.gz"
    sitk.WriteImage(stack, str(bad))
    return one_bad_stack(root, stacks, bad, "more than any MRI field of view")


def outside_field_of_view(root: Path, stacks: SimulationResult) -> Case:
    """Stack 2 and its mask moved 400 mm away together: each is fine, they share nothing with the others."""
    moved = []
    for path, name in ((stacks.stack_paths[1], "far_stack"), (stacks.mask_paths[1], "far_mask")):
        image = sitk.ReadImage(path)
        image.SetOrigin(tuple(np.asarray(image.GetOrigin()) + [0.0, 400.0, 0.0]))
        sitk.WriteImage(image, str(root / f"{name}.nii.gz"))
        moved.append(str(root / f"{name}.nii.gz"))
    args = ["--input-stacks", stacks.stack_paths[0], moved[0], stacks.stack_paths[2],
            "--stack-masks", stacks.mask_paths[0], moved[1], stacks.mask_paths[2]]  # fmt: skip
    return Case(args + outputs(root / "out"), [moved[0]], "outside the field of view", [root, root / "out"])


def mask_negative(root: Path, stacks: SimulationResult) -> Case:
    """A signed distance map (negative inside the brain) given as a mask."""
    mask = sitk.ReadImage(stacks.mask_paths[1])
    bad = root / "distance_map.nii.gz"
    sitk.WriteImage(
        sitk.SignedMaurerDistanceMap(mask, insideIsPositive=False, useImageSpacing=True), str(bad)
    )
    return one_bad_mask(root, stacks, bad, "negative values", json=True)


def image_as_mask(root: Path, stacks: SimulationResult) -> Case:
    """The stack itself given as its mask: intensities, not 0/1."""
    bad = root / "stack_as_mask.nii.gz"
    sitk.WriteImage(sitk.ReadImage(stacks.stack_paths[1]), str(bad))
    return one_bad_mask(root, stacks, bad, "values other than 0/1")


def mask_4d(root: Path, stacks: SimulationResult) -> Case:
    mask = sitk.ReadImage(stacks.mask_paths[1])
    bad = root / "mask_series.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([mask, mask]), str(bad))
    return one_bad_mask(root, stacks, bad, "mask is 4-D", json=True)


def stack_twice(root: Path, stacks: SimulationResult) -> Case:
    args = ["--input-stacks", *stacks.stack_paths[:2], stacks.stack_paths[0]] + outputs(root / "out")
    return Case(args, [stacks.stack_paths[0]], "given twice (as stacks 1 and 3)", [root / "out"])


def empty_file(root: Path, stacks: SimulationResult) -> Case:
    bad = root / "empty.nii.gz"
    bad.touch()
    return one_bad_stack(root, stacks, bad, "empty (0 bytes)", json=True)


def folder_as_stack(root: Path, stacks: SimulationResult) -> Case:
    bad = root / "stacks.nii.gz"
    bad.mkdir()
    return one_bad_stack(root, stacks, bad, "is a folder")


# ---------------------------------------------------------------- files that are not all there


def cut_short(source: Path, target: Path, fraction: float = 0.5) -> Path:
    """A copy of the file cut short, as an interrupted transfer or a full disk leaves it."""
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def truncated_stack(extension: str, dtype: type, problem: str, json: bool = False) -> Builder:
    """A stack of the given voxel type and format whose data stops halfway (ITK fills NIfTI with 0)."""

    def build(root: Path, stacks: SimulationResult) -> Case:
        image = sitk.ReadImage(stacks.stack_paths[1])
        whole = write(sitk.GetArrayFromImage(image).astype(dtype), image, root / f"whole{extension}")
        bad = cut_short(whole, root / f"truncated{extension}")
        whole.unlink()
        return one_bad_stack(root, stacks, bad, problem, json=json)

    return build


def truncated_mask(root: Path, stacks: SimulationResult) -> Case:
    bad = cut_short(Path(stacks.mask_paths[1]), root / "truncated_mask.nii.gz", 0.6)
    return one_bad_mask(root, stacks, bad, "damaged", json=True)


def damaged_gzip(root: Path, stacks: SimulationResult) -> Case:
    data = bytearray(Path(stacks.stack_paths[1]).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 256] = bytes(256)
    bad = root / "damaged.nii.gz"
    bad.write_bytes(bytes(data))
    return one_bad_stack(root, stacks, bad, "damaged")


def no_qform_no_sform(root: Path, stacks: SimulationResult) -> Case:
    def clear_codes(raw: bytearray) -> None:
        raw[252:256] = struct.pack("<hh", 0, 0)

    bad = patched_nifti(stacks.stack_paths[1], root / "no_orientation.nii", clear_codes)
    return one_bad_stack(root, stacks, bad, "neither a qform nor an sform", json=True)


def mask_with_nan(root: Path, stacks: SimulationResult) -> Case:
    mask = sitk.ReadImage(stacks.mask_paths[1])
    array = sitk.GetArrayFromImage(mask).astype(np.float32)
    array[array.shape[0] // 2, 0, 0] = np.nan
    return one_bad_mask(root, stacks, write(array, mask, root / "mask_nan.nii.gz"), "NaN")


def zeros_inside_mask(root: Path, stacks: SimulationResult) -> Case:
    image = sitk.ReadImage(stacks.stack_paths[1])
    mask = sitk.GetArrayFromImage(sitk.ReadImage(stacks.mask_paths[1])) > 0
    array = np.where(mask, 0.0, sitk.GetArrayFromImage(image)).astype(np.float32)
    bad = write(array, image, root / "dark_brain.nii.gz")
    args = ["--input-stacks", stacks.stack_paths[0], str(bad), "--stack-masks", stacks.mask_paths[0],
            stacks.mask_paths[1]] + outputs(root / "out")  # fmt: skip
    return Case(args, [str(bad)], "no non-zero voxel inside its mask", [root, root / "out"], json=True)


def no_mask_and_little_seen_together(root: Path, stacks: SimulationResult) -> Case:
    """No mask: the brain is searched where the stacks overlap, but stack 2 was moved 82 mm away (they
    share a 2 mm sliver)."""
    image = sitk.ReadImage(stacks.stack_paths[1])
    image.SetOrigin(tuple(np.asarray(image.GetOrigin()) + [82.0, 0.0, 0.0]))
    moved = write(sitk.GetArrayFromImage(image), image, root / "moved_stack.nii.gz")
    args = ["--input-stacks", stacks.stack_paths[0], str(moved), "--stack-masks", "none", "none"]
    watched = [root, root / "out"]
    return Case(args + outputs(root / "out"), [stacks.stack_paths[0]], "too little to find", watched)


def missing_mask(root: Path, stacks: SimulationResult) -> Case:
    return one_bad_mask(root, stacks, root / "absent_mask.nii.gz", "does not exist", json=True)


def mask_is_folder(root: Path, stacks: SimulationResult) -> Case:
    (root / "mask_folder.nii.gz").mkdir()
    return one_bad_mask(root, stacks, root / "mask_folder.nii.gz", "is a folder")


def sidecar_thickness_absurd(root: Path, stacks: SimulationResult) -> Case:
    stack = root / "sub-01_run-1_T2w.nii.gz"
    stack.write_bytes(Path(stacks.stack_paths[1]).read_bytes())
    (root / "sub-01_run-1_T2w.json").write_text('{"SliceThickness": 300}')
    args = ["--input-stacks", stacks.stack_paths[0], str(stack), "--stack-masks", stacks.mask_paths[0],
            stacks.mask_paths[1]] + outputs(root / "out")  # fmt: skip
    return Case(args, [str(stack)], "from its sidecar", [root, root / "out"], json=True)


def nifti_2(root: Path, stacks: SimulationResult) -> Case:
    """A NIfTI-2 header (540 bytes), which this ITK cannot read."""
    header = bytearray(544)
    struct.pack_into("<i", header, 0, 540)
    header[4:12] = b"n+2\x00\r\n\x1a\n"
    struct.pack_into("<h", header, 12, 16)  # float32
    struct.pack_into("<8q", header, 16, 3, 8, 8, 4, 1, 1, 1, 1)
    struct.pack_into("<8d", header, 104, 1, 1.2, 1.2, 2.4, 1, 1, 1, 1)
    struct.pack_into("<q", header, 168, 544)
    struct.pack_into("<ii", header, 344, 1, 0)  # a qform only
    bad = root / "nifti2.nii"
    bad.write_bytes(bytes(header) + tiny_stack(shape=(4, 8, 8)).tobytes())
    return one_bad_stack(root, stacks, bad, "NIfTI-2")


def zero_dimension(root: Path, stacks: SimulationResult) -> Case:
    def zero_width(raw: bytearray) -> None:
        struct.pack_into("<h", raw, 42, 0)

    bad = patched_nifti(stacks.stack_paths[1], root / "zero_width.nii", zero_width)
    return one_bad_stack(root, stacks, bad, "stack", json=True)


# ---------------------------------------------------------------- settings out of range


def bad_setting(flag: str, value: str, problem: str, json: bool = False) -> Builder:
    """A setting the engine refuses before reading anything (settings.check or argparse)."""

    def build(root: Path, stacks: SimulationResult) -> Case:
        args = stack_args(stacks) + outputs(root / "out") + [flag, value]
        return Case(args, [flag], problem, [root / "out"], json=json)

    return build


def unknown_flag(root: Path, stacks: SimulationResult) -> Case:
    args = stack_args(stacks) + outputs(root / "out") + ["--output-resoluton", "1.0"]
    return Case(args, ["--output-resoluton"], "unrecognized arguments", [root / "out"], json=True)


def missing_output_volume(root: Path, stacks: SimulationResult) -> Case:
    args = stack_args(stacks) + ["--output-json", str(root / "out" / "report.json")]
    return Case(args, ["--output-volume"], "required", [root / "out"])


def reference_stack_beyond(root: Path, stacks: SimulationResult) -> Case:
    args = stack_args(stacks) + outputs(root / "out") + ["--reference-stack", "7"]
    return Case(args, ["--reference-stack"], "does not exist", [root / "out"], json=True)


# ---------------------------------------------------------------- outputs that must not be written


def output_is_input(kind: str) -> Builder:
    """An output path that is an input: the stack itself, its mask, or its BIDS sidecar."""

    def build(root: Path, stacks: SimulationResult) -> Case:
        stack = root / "sub-01_T2w.nii.gz"
        stack.write_bytes(Path(stacks.stack_paths[1]).read_bytes())
        sidecar = root / "sub-01_T2w.json"
        sidecar.write_text('{"SliceThickness": 2.4}')
        mask = root / "sub-01_mask.nii.gz"
        mask.write_bytes(Path(stacks.mask_paths[1]).read_bytes())
        args = [
            "--input-stacks",
            stacks.stack_paths[0],
            str(stack),
            "--stack-masks",
            stacks.mask_paths[0],
            str(mask),
        ]
        flag, target, what = {
            "stack": ("--output-volume", stack, "input stack"),
            "mask": ("--output-volume", mask, "input mask"),
            "sidecar": ("--output-json", sidecar, "sidecar"),
        }[kind]
        rest = ["--output-volume", str(root / "out" / "v.nii.gz")] if flag != "--output-volume" else []
        return Case(
            args + [flag, str(target)] + rest, [str(target)], what, [root, root / "out"], json=kind == "mask"
        )

    return build


def output_links_to_input(link: str) -> Builder:
    def build(root: Path, stacks: SimulationResult) -> Case:
        target = root / "out" / "recon.nii.gz"
        (os.link if link == "hard" else os.symlink)(stacks.stack_paths[1], target)
        problem = "would overwrite the input stack" if link == "hard" else "symbolic link"
        args = stack_args(stacks) + ["--output-volume", str(target)]
        return Case(args, [str(target)], problem, [root / "out"], json=link == "hard")

    return build


def output_is_special(kind: str) -> Builder:
    """An output path that exists and is no regular file: a named pipe, a device node, a folder."""

    def build(root: Path, stacks: SimulationResult) -> Case | None:
        target = root / "out" / "report.json"
        if kind == "pipe":
            os.mkfifo(target)
        elif kind == "device":
            try:
                os.mknod(
                    target, 0o666 | stat.S_IFCHR, os.makedev(1, 3)
                )  # like /dev/null, in the test's folder
            except (PermissionError, OSError):
                return None
        else:
            target.mkdir()
        args = stack_args(stacks) + [
            "--output-volume",
            str(root / "out" / "v.nii.gz"),
            "--output-json",
            str(target),
        ]
        problem = "is a folder" if kind == "folder" else "not a regular file"
        return Case(args, [str(target)], problem, [root / "out"], json=kind == "pipe")

    return build


def output_extension(flag: str, name: str, problem: str) -> Builder:
    def build(root: Path, stacks: SimulationResult) -> Case:
        target = root / "out" / name
        rest = [] if flag == "--output-volume" else ["--output-volume", str(root / "out" / "v.nii.gz")]
        return Case(stack_args(stacks) + rest + [flag, str(target)], [str(target)], problem, [root / "out"])

    return build


def two_outputs_one_path(root: Path, stacks: SimulationResult) -> Case:
    same = root / "out" / "qc.png"
    volume = str(root / "out" / "v.nii.gz")
    args = stack_args(stacks) + [
        "--output-volume",
        volume,
        "--output-json",
        str(same),
        "--output-qc",
        str(same),
    ]
    return Case(args, [str(same)], "given both as", [root / "out"], json=True)


def preview_dir_is_file(root: Path, stacks: SimulationResult) -> Case:
    (root / "out" / "preview").write_text("a file\n")
    args = stack_args(stacks) + ["--output-volume", str(root / "out" / "v.nii.gz"), "--preview-dir",
                                 str(root / "out" / "preview")]  # fmt: skip
    return Case(args, [str(root / "out" / "preview")], "not a folder", [root / "out"])


def preview_would_overwrite_input(root: Path, stacks: SimulationResult) -> Case:
    """The preview folder is the stacks' folder, where a stack happens to be named like a preview."""
    stack = root / "preview.nii.gz"
    stack.write_bytes(Path(stacks.stack_paths[1]).read_bytes())
    args = ["--input-stacks", stacks.stack_paths[0], str(stack), "--stack-masks", *stacks.mask_paths[:2],
            "--output-volume", str(root / "out" / "v.nii.gz"), "--preview-dir", str(root)]  # fmt: skip
    return Case(args, [str(stack)], "would overwrite the input stack", [root, root / "out"], json=True)


def gaussians_over_their_input(root: Path, stacks: SimulationResult) -> Case:
    """--output-gaussians over the --init-gaussians it continues from."""
    previous = root / "previous.npz"
    previous.write_bytes(b"PK\x03\x04 not read: refused before")
    args = stack_args(stacks) + ["--output-volume", str(root / "out" / "v.nii.gz"), "--init-gaussians",
                                 str(previous), "--output-gaussians", str(root / "previous")]  # fmt: skip
    return Case(args, [str(previous)], "initial Gaussians file", [root, root / "out"])


def outputs_locked(root: Path, stacks: SimulationResult) -> Case:
    """Another run (this test process, alive) holds the lock of the output volume."""
    volume = root / "out" / "v.nii.gz"
    (root / "out" / ".v.nii.gz.gaussiansvr-lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")
    args = stack_args(stacks) + ["--output-volume", str(volume)]
    return Case(args, [str(volume)], f"being written by process {os.getpid()}", [root / "out"], json=True)


def full_disk(root: Path, stacks: SimulationResult) -> Case | None:
    """The output folder is a 1 MiB file system (tmpfs) holding an earlier, good result: the new volume does
    not fit, which ITK's writer reports on stderr only. The earlier file must be left as it was."""
    disk = root / "out" / "disk"
    disk.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
    ).returncode:
        return None
    MOUNTS.append(disk)
    (disk / "v.nii.gz").write_bytes(b"an earlier result\n")
    args = stack_args(stacks) + ["--output-volume", str(disk / "v.nii.gz"), "--output-resolution", "0.6"]
    return Case(args, [str(disk / "v.nii.gz")], "could not be written", [disk])


def file_size_limit(root: Path, stacks: SimulationResult) -> Case:
    """A file-size limit (RLIMIT_FSIZE, as a quota imposes) below the volume's size, over an earlier one."""
    volume = root / "out" / "v.nii.gz"
    volume.write_bytes(b"an earlier result\n")
    args = stack_args(stacks) + ["--output-volume", str(volume), "--output-resolution", "0.6"]
    return Case(args, [str(volume)], "could not be written", [root / "out"], file_size_limit=1 << 20)


def roi_case(roi: list[str], problem: str, names: list[str] | None = None) -> Builder:
    """A box given instead of masks (--roi numbers, or --roi-from FILE: the content of FILE)."""

    def build(root: Path, stacks: SimulationResult) -> Case:
        args = stack_args(stacks, masks=False) + outputs(root / "out") + roi
        return Case(args, names or [roi[0]], problem, [root / "out"])

    return build


def roi_file(content: str | None, problem: str, json: bool = False) -> Builder:
    """--roi-from a file with this content (None: a file that does not exist)."""

    def build(root: Path, stacks: SimulationResult) -> Case:
        path = root / "box.mrk.json"
        if content is not None:
            path.write_text(content)
        args = stack_args(stacks, masks=False) + outputs(root / "out") + ["--roi-from", str(path)]
        return Case(args, [str(path)], problem, [root, root / "out"], json=json)

    return build


def roi_outside_the_stacks(root: Path, stacks: SimulationResult) -> Case:
    args = (
        stack_args(stacks, masks=False)
        + outputs(root / "out")
        + ["--roi", "500", "500", "500", "520", "520", "520"]
    )
    return Case(args, [stacks.stack_paths[0]], "does not reach this stack", [root / "out"], json=True)


def transform_case(extra: list[str], name: str, problem: str) -> Builder:
    def build(root: Path, stacks: SimulationResult) -> Case:
        args = stack_args(stacks) + outputs(root / "out") + [
            "--output-transform", str(root / "out" / name), *extra
        ]  # fmt: skip
        return Case(args, [str(root / "out" / name)], problem, [root / "out"])

    return build


def masks_over_an_input_mask(root: Path, stacks: SimulationResult) -> Case:
    """--output-masks into the stacks' own folder, where an input mask has the name the output takes."""
    stack, mask = root / "s.nii.gz", root / "s_mask.nii.gz"
    stack.write_bytes(Path(stacks.stack_paths[1]).read_bytes())
    mask.write_bytes(Path(stacks.mask_paths[1]).read_bytes())
    args = ["--input-stacks", stacks.stack_paths[0], str(stack), "--stack-masks", stacks.mask_paths[0],
            str(mask), "--output-masks", str(root)] + outputs(root / "out")  # fmt: skip
    return Case(args, [str(mask)], "would overwrite the input mask", [root, root / "out"], json=True)


def masks_of_two_stacks_one_name(root: Path, stacks: SimulationResult) -> Case:
    for folder, source in (("a", stacks.stack_paths[0]), ("b", stacks.stack_paths[1])):
        (root / folder).mkdir()
        (root / folder / "s.nii.gz").write_bytes(Path(source).read_bytes())
    masks = root / "out" / "masks"
    args = ["--input-stacks", str(root / "a" / "s.nii.gz"), str(root / "b" / "s.nii.gz"), "--stack-masks",
            *stacks.mask_paths[:2], "--output-masks", str(masks)] + outputs(root / "out")  # fmt: skip
    return Case(args, [str(root / "b" / "s.nii.gz")], "same file name", [root / "out"])


def masks_folder_is_a_file(root: Path, stacks: SimulationResult) -> Case:
    target = root / "out" / "masks"
    target.write_text("a file")
    args = stack_args(stacks) + outputs(root / "out") + ["--output-masks", str(target)]
    return Case(args, [str(target)], "not a folder", [root / "out"])


#: tmpfs mounted by the cases, unmounted when the module's runs are done.
MOUNTS: list[Path] = []


CASES: dict[str, Builder] = {
    "missing file": missing_file,
    "unreadable file": unreadable_file,
    "2-D image": image_2d,
    "4-D image": image_4d,
    "mask geometry cannot be matched": mask_elsewhere,
    "empty mask": empty_mask,
    "NaN voxels": bad_voxel(float("nan"), "NaN", ".nii.gz", json=False),
    "Inf voxels": bad_voxel(float("inf"), "Inf", ".nii.gz", json=True),
    "NaN voxels in NRRD": bad_voxel(float("nan"), "NaN", ".nrrd", json=False),
    "wrong number of thicknesses": wrong_thickness_count,
    "wrong number of masks": wrong_mask_count,
    "zero resolution": bad_number("--output-resolution", "0", "between 0.05 and 20"),
    "negative resolution": bad_number("--output-resolution", "-1.5", "between 0.05 and 20"),
    "infinite resolution": bad_number("--output-resolution", "inf", "between 0.05 and 20"),
    "zero thickness": bad_number("--thicknesses", "0", "positive", json=True),
    "unwritable output folder": unwritable_output,
    "output folder does not exist": missing_output_folder,
    "output folder is a file": output_folder_is_file,
    "output grid too large for memory": grid_too_large,
    "--device cuda without CUDA": cuda_without_gpu,
    "NIfTI qform and sform disagree": qform_sform_disagree,
    "single slice": single_slice,
    "stack one pixel wide": one_pixel_wide,
    "complex voxels": complex_voxels,
    "RGB voxels": rgb_voxels,
    "float64 values beyond float32": beyond_float32,
    "zero spacing (NRRD)": zero_spacing,
    "negative spacing (NIfTI pixdim)": negative_spacing,
    "skewed direction matrix (NRRD)": skewed_directions,
    "stack spacing in micrometres": stack_in_micrometres,
    "stack outside the others' field of view": outside_field_of_view,
    "mask with negative values": mask_negative,
    "image given as a mask": image_as_mask,
    "4-D mask": mask_4d,
    "same stack given twice": stack_twice,
    "empty (0-byte) file": empty_file,
    "folder given as a stack": folder_as_stack,
    "truncated .nii (int16)": truncated_stack(".nii", np.int16, "truncated", json=True),
    "truncated .nii (float32)": truncated_stack(".nii", np.float32, "truncated"),
    "truncated .nii.gz (uint8)": truncated_stack(".nii.gz", np.uint8, "damaged"),
    "truncated .nii.gz (float64)": truncated_stack(".nii.gz", np.float64, "damaged", json=True),
    "truncated NRRD": truncated_stack(".nrrd", np.float32, "truncated"),
    "truncated MetaImage": truncated_stack(".mha", np.int16, "truncated", json=True),
    "truncated mask": truncated_mask,
    "damaged gzip stream": damaged_gzip,
    "NIfTI without qform and sform": no_qform_no_sform,
    "NIfTI-2 file": nifti_2,
    "NIfTI with a zero dimension": zero_dimension,
    "mask with NaN voxels": mask_with_nan,
    "stack dark inside its mask": zeros_inside_mask,
    "no mask, stacks seeing little together": no_mask_and_little_seen_together,
    "missing mask file": missing_mask,
    "folder given as a mask": mask_is_folder,
    "absurd sidecar thickness": sidecar_thickness_absurd,
    "thickness 1e6 mm": bad_setting("--thicknesses", "1e6", "must be in (0, 30] mm"),
    "n-gaussians below k": bad_setting(
        "--n-gaussians", "4", f"fewer than the {Settings().k_neighbours}", json=True
    ),
    "n-gaussians 1e9": bad_setting("--n-gaussians", "1000000000", "between 0 and"),
    "resolution 1e-300": bad_setting("--output-resolution", "1e-300", "between 0.05 and 20", json=True),
    "resolution 50 mm": bad_setting("--output-resolution", "50", "between 0.05 and 20"),
    "NaN scale regularization": bad_setting("--scale-regularization", "nan", "at least 0", json=True),
    "negative scale regularization": bad_setting("--scale-regularization", "-1", "at least 0"),
    "no neighbours": bad_setting("--k-neighbours", "0", "between 1 and 256"),
    "1000 neighbours": bad_setting("--k-neighbours", "1000", "between 1 and 256", json=True),
    "batch of 0 pixels": bad_setting("--batch-pixels", "0", "between 1 and"),
    "0 iterations": bad_setting("--iterations", "0", "between 1 and", json=True),
    "iterations not a number": bad_setting("--iterations", "many", "not an integer"),
    "negative seed": bad_setting("--seed", "-1", "between 0 and"),
    "seed beyond 2**31": bad_setting("--seed", str(2**40), "between 0 and", json=True),
    "mask dilation 500 mm": bad_setting("--mask-dilation", "500", "between 0 and 50 mm"),
    "NaN mask dilation": bad_setting("--mask-dilation", "nan", "between 0 and 50 mm", json=True),
    "zero checkpoint interval": bad_setting("--checkpoint-interval", "0", "above 0"),
    "negative reference stack": bad_setting("--reference-stack", "-1", "at least 0", json=True),
    "reference stack beyond the stacks": reference_stack_beyond,
    "unknown PSF mode": bad_setting("--psf", "gaussian", "invalid choice"),
    "misspelt flag": unknown_flag,
    "no output volume": missing_output_volume,
    "output volume is an input stack": output_is_input("stack"),
    "output volume is an input mask": output_is_input("mask"),
    "JSON report is a stack's sidecar": output_is_input("sidecar"),
    "output hard-linked to an input": output_links_to_input("hard"),
    "output is a symbolic link": output_links_to_input("symbolic"),
    "output is a named pipe": output_is_special("pipe"),
    "output is a device node": output_is_special("device"),
    "output is a folder": output_is_special("folder"),
    "output volume .mhd (two files)": output_extension("--output-volume", "v.mhd", "two-file"),
    "output volume .png": output_extension("--output-volume", "v.png", "must end with one of"),
    "QC picture not .png": output_extension("--output-qc", "qc.jpg", "must end with .png"),
    "two outputs on one path": two_outputs_one_path,
    "preview folder is a file": preview_dir_is_file,
    "preview would overwrite an input": preview_would_overwrite_input,
    "Gaussians over the ones continued from": gaussians_over_their_input,
    "outputs locked by another run": outputs_locked,
    "disk full (tmpfs)": full_disk,
    "file size limit": file_size_limit,
    "gestational age 60 weeks": bad_setting("--gestational-age", "60", "between 15 and 45 weeks"),
    "unknown output space": bad_setting("--output-space", "mni", "invalid choice", json=True),
    "transform without atlas space": transform_case([], "t.tfm", "with --output-space atlas only"),
    "transform as .nii.gz": transform_case(["--output-space", "atlas"], "t.nii.gz", "must end with one of"),
    "flat ROI": roi_case(["--roi", "0", "0", "0", "10", "0", "10"], "flat", ["--roi"]),
    "ROI with five numbers": roi_case(
        ["--roi", "0", "0", "0", "10", "10"], "expected 6 arguments", ["--roi"]
    ),
    "ROI twice": roi_case(
        ["--roi", *"0 0 0 9 9 9".split(), "--roi-from", "x.json"], "not allowed with", ["--roi-from"]
    ),
    "ROI file missing": roi_file(None, "not found"),
    "ROI file not JSON": roi_file("{markups", "not a readable markups JSON", json=True),
    "ROI file without ROI": roi_file('{"markups": [{"type": "Fiducial"}]}', "holds no markups ROI"),
    "ROI file with a flat ROI": roi_file(
        '{"markups": [{"type": "ROI", "center": [0, 0, 0], "size": [10, 0, 10]}]}', "flat", json=True
    ),
    "ROI file with text for numbers": roi_file(
        '{"markups": [{"type": "ROI", "center": ["a", 0, 0], "size": [10, 10, 10]}]}', "finite numbers"
    ),
    "ROI outside every stack": roi_outside_the_stacks,
    "output mask over an input mask": masks_over_an_input_mask,
    "two stacks' masks on one name": masks_of_two_stacks_one_name,
    "mask folder is a file": masks_folder_is_a_file,
}


def limited(size: int | None) -> Callable[[], None] | None:
    """A preexec_fn that caps the size of files the run writes (write then fails with EFBIG)."""
    if size is None:
        return None

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return apply


def run(case: Case) -> tuple[int | None, str, str, float]:
    # TINY first, so that a case's own settings override it.
    command = [sys.executable, "-m", "GaussianSVRLib", "reconstruct", *TINY, *case.args,
               "--progress", "json" if case.json else "bar"]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    if case.file_size_limit is not None:
        env["GAUSSIANSVR_KERNEL"] = "torch"  # no kernel compilation, whose cache the limit would hit
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
            stdin=subprocess.DEVNULL, preexec_fn=limited(case.file_size_limit),
        )  # fmt: skip
    except subprocess.TimeoutExpired as expired:
        return None, str(expired.stdout or ""), str(expired.stderr or ""), TIMEOUT_S
    return done.returncode, done.stdout, done.stderr, time.monotonic() - started


def snapshot(case: Case) -> Snapshot:
    return Snapshot({folder: listing(folder) for folder in case.watched}, {p: sha256(p) for p in case.inputs})


@pytest.fixture(scope="module")
def outcomes(
    tmp_path_factory: pytest.TempPathFactory, phantom_stacks: SimulationResult
) -> Iterator[dict[str, Outcome | None]]:
    """Build every case in its own folder, run them all a few at a time, and record what changed."""
    cases: dict[str, Case | None] = {}
    for name, build in CASES.items():
        root = tmp_path_factory.mktemp("cli_error")
        (root / "out").mkdir()
        case = build(root, phantom_stacks)
        if case is not None:
            case.inputs = [Path(arg) for arg in case.args if Path(arg).is_file()]
            case.watched.append(Path(phantom_stacks.stack_paths[0]).parent)
        cases[name] = case
    ready = {name: case for name, case in cases.items() if case is not None}
    before = {name: snapshot(case) for name, case in ready.items()}
    with ThreadPoolExecutor(PARALLEL_RUNS) as pool:
        results = dict(zip(ready, pool.map(run, ready.values()), strict=True))
    result: dict[str, Outcome | None] = dict.fromkeys(cases)
    for name, case in ready.items():
        result[name] = Outcome(case, *results[name], before[name], snapshot(case))
    yield result
    for folder in tmp_path_factory.getbasetemp().glob("cli_error*/locked"):
        folder.chmod(0o700)
    for disk in MOUNTS:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.parametrize("name", list(CASES))
def test_error_is_one_line_exit_2_and_leaves_nothing(name: str, outcomes: dict[str, Outcome | None]) -> None:
    outcome = outcomes[name]
    if outcome is None:
        pytest.skip(f"{name}: cannot be set up on this machine")
    case = outcome.case
    assert outcome.returncode is not None, f"still running after {TIMEOUT_S} s: it did not fail early"
    assert "Traceback" not in outcome.stderr, f"after {outcome.seconds:.0f} s:\n{outcome.stderr}"
    assert outcome.returncode == EXIT_INPUT_ERROR, f"after {outcome.seconds:.0f} s:\n{outcome.stderr}"
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1 + len(case.warnings), f"stderr has {len(lines)} lines:\n{outcome.stderr}"
    for line, warning in zip(lines, case.warnings, strict=False):
        assert line.startswith("WARNING") and warning in line, line
    lines = lines[len(case.warnings) :]
    for named in case.names:
        assert named in lines[0], f"{named!r} not named in: {lines[0]}"
    assert case.problem.lower() in lines[0].lower(), lines[0]
    if case.json:
        messages = [decode(line) for line in outcome.stdout.splitlines()]
        assert len(messages) == 1 and messages[0] is not None, outcome.stdout
        assert messages[0]["type"] == "error", messages[0]
        assert case.problem.lower() in messages[0]["message"].lower()
        assert all(named in messages[0]["message"] for named in case.names)
    else:
        assert outcome.stdout == ""
    assert outcome.after.listings == outcome.before.listings, "files left behind"
    assert outcome.after.hashes == outcome.before.hashes, "an input was modified"
    assert outcome.before.hashes, "no input file was checked"
