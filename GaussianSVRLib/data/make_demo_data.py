"""Derive the bundled demo data (GaussianSVRLib/data/atlas, .../sub01) from the project's shared data folder.

    python GaussianSVRLib/data/make_demo_data.py PATH/TO/shared/data [--out GaussianSVRLib/data]

Every image is cropped with SimpleITK, so the world position of every kept voxel is unchanged (the
origin moves to the first kept voxel; spacing and direction are kept) and its value and voxel type
are those of the source. Masks are cropped with exactly the same box as their image, so they stay
on its grid. After writing, every output is read back and checked against its source.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ATLAS_DIR = "fetal-atlas-spina-bifida-cc0"
STACKS_DIR = "fetal-raw-stacks-sub01-cc0"
#: GA 28 (operated): mid range of the atlas (21-34 weeks) and the atlas brain volume (168 ml)
#: closest to the sub-01 stack masks (149-171 ml), so simulated and real demos show a similar brain.
ATLAS_NAME = "SB_GA28_operated"
#: Runs 1-2 are near-axial, 3-4 near-coronal, 5-6 near-sagittal: two axial stacks plus one of each
#: other family. Runs 1, 3 and 6 are the ones the bundled MIALSRTK reconstruction was made from.
STACK_RUNS = (1, 2, 3, 6)
ATLAS_MARGIN_MM = 10.0
STACK_MARGIN_MM = 15.0
#: Sidecar fields kept: acquisition facts a reconstruction can use; site and device identifiers are
#: dropped. SliceThickness is the one the engine reads (GaussianSVRLib.stacks.sidecar_thickness).
SIDECAR_FIELDS = (
    "Modality",
    "MagneticFieldStrength",
    "Manufacturer",
    "ManufacturersModelName",
    "MRAcquisitionType",
    "SeriesDescription",
    "ScanningSequence",
    "SequenceVariant",
    "SeriesNumber",
    "AcquisitionTime",
    "SliceThickness",
    "SpacingBetweenSlices",
    "EchoTime",
    "RepetitionTime",
    "FlipAngle",
    "PhaseEncodingDirection",
    "ConversionSoftware",
    "ConversionSoftwareVersion",
)
ATLAS_NOTICES = ("LICENSE.txt", "README_fidon_data.md")
STACK_NOTICES = ("dataset_description.json", "README_dataset.txt", "LICENSE_repo_BSD3.txt")


def mask_box(mask: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box of the non-zero voxels as (first, last + 1), both (3,) in (i, j, k) order."""
    array = sitk.GetArrayFromImage(mask) > 0
    if not array.any():
        raise ValueError("mask is empty")
    nonzero = np.nonzero(array)  # (k, j, i)
    first = np.array([nonzero[axis].min() for axis in (2, 1, 0)])
    last = np.array([nonzero[axis].max() for axis in (2, 1, 0)])
    return first, last + 1


def grow_box(
    box: tuple[np.ndarray, np.ndarray], image: sitk.Image, margin_mm: float, axes: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """The box grown by margin_mm along the given (i, j, k) axes, clipped to the image; others span it all."""
    first, stop = box[0].copy(), box[1].copy()
    size = np.array(image.GetSize())
    for axis in range(3):
        if axis in axes:
            pad = math.ceil(margin_mm / image.GetSpacing()[axis])
            first[axis], stop[axis] = max(first[axis] - pad, 0), min(stop[axis] + pad, size[axis])
        else:
            first[axis], stop[axis] = 0, size[axis]
    return first, stop


def crop(image: sitk.Image, box: tuple[np.ndarray, np.ndarray]) -> sitk.Image:
    """The voxels of box, with the geometry that keeps each voxel at its world position."""
    first, stop = box
    return sitk.RegionOfInterest(image, [int(n) for n in stop - first], [int(i) for i in first])


def write_nifti(image: sitk.Image, path: Path) -> None:
    """Write .nii.gz atomically, gzip level 9 with no timestamp so reruns give identical bytes."""
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        plain = Path(scratch) / "image.nii"
        sitk.WriteImage(image, str(plain), useCompression=False)
        packed = Path(scratch) / "image.nii.gz"
        with open(packed, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
            gz.write(plain.read_bytes())
        os.replace(packed, path)


def write_text(text: str, path: Path) -> None:
    """Write a text file atomically."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def check_crop(source: sitk.Image, box: tuple[np.ndarray, np.ndarray], path: Path) -> None:
    """Read path back: same voxel type, values and world positions as the box of source."""
    written = sitk.ReadImage(str(path))
    first, stop = box
    problems = []
    if written.GetPixelID() != source.GetPixelID():
        problems.append(f"voxel type {written.GetPixelIDTypeAsString()} != {source.GetPixelIDTypeAsString()}")
    if tuple(written.GetSize()) != tuple(int(n) for n in stop - first):
        problems.append(f"size {written.GetSize()} != {tuple(stop - first)}")
    if not np.allclose(written.GetSpacing(), source.GetSpacing(), rtol=0, atol=1e-6):
        problems.append("spacing changed")
    if not np.allclose(written.GetDirection(), source.GetDirection(), rtol=0, atol=1e-6):
        problems.append("direction changed")
    corners = [np.array([c0, c1, c2]) for c0 in (0, 1) for c1 in (0, 1) for c2 in (0, 1)]
    for corner in corners:
        index = corner * (stop - first - 1)
        here = written.TransformIndexToPhysicalPoint([int(i) for i in index])
        there = source.TransformIndexToPhysicalPoint([int(i) for i in index + first])
        if not np.allclose(here, there, rtol=0, atol=1e-3):
            problems.append(f"voxel {tuple(index)} moved from {there} to {here}")
    expected = sitk.GetArrayViewFromImage(source)[first[2] : stop[2], first[1] : stop[1], first[0] : stop[0]]
    if not np.array_equal(sitk.GetArrayViewFromImage(written), expected):
        problems.append("voxel values differ from the source")
    if problems:
        raise RuntimeError(f"{path}: " + "; ".join(problems))


def check_same_grid(image_path: Path, mask_path: Path) -> None:
    """The mask lies on its image's grid (the engine then uses it without resampling)."""
    image, mask = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(mask_path))
    same = (
        image.GetSize() == mask.GetSize()
        and np.allclose(image.GetSpacing(), mask.GetSpacing(), rtol=0, atol=1e-6)
        and np.allclose(image.GetOrigin(), mask.GetOrigin(), rtol=0, atol=1e-4)
        and np.allclose(image.GetDirection(), mask.GetDirection(), rtol=0, atol=1e-6)
    )
    if not same:
        raise RuntimeError(f"{mask_path}: not on the grid of {image_path}")


def crop_pair(
    image_path: Path, mask_path: Path, out_dir: Path, margin_mm: float, axes: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Crop an image and its mask around the mask; returns (source size, cropped size)."""
    image, mask = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(mask_path))
    box = grow_box(mask_box(mask), image, margin_mm, axes)
    for source, path in ((image, image_path), (mask, mask_path)):
        target = out_dir / path.name
        write_nifti(crop(source, box), target)
        check_crop(source, box, target)
    check_same_grid(out_dir / image_path.name, out_dir / mask_path.name)
    return tuple(image.GetSize()), tuple(int(n) for n in box[1] - box[0])


def reduce_sidecar(source: Path, target: Path) -> None:
    """Copy the SIDECAR_FIELDS of a BIDS JSON sidecar that are present, in that order."""
    fields = json.loads(source.read_text())
    kept = {key: fields[key] for key in SIDECAR_FIELDS if key in fields}
    if "SliceThickness" not in kept:
        raise RuntimeError(f"{source}: no SliceThickness")
    write_text(json.dumps(kept, indent=2) + "\n", target)


def copy_notices(source_dir: Path, names: tuple[str, ...], out_dir: Path) -> None:
    for name in names:
        shutil.copyfile(source_dir / name, out_dir / name)


def make_atlas(shared: Path, out: Path) -> None:
    source_dir, out_dir = shared / ATLAS_DIR, out / "atlas"
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = crop_pair(
        source_dir / f"{ATLAS_NAME}_T2w.nii.gz",
        source_dir / f"{ATLAS_NAME}_brainmask.nii.gz",
        out_dir,
        ATLAS_MARGIN_MM,
        axes=(0, 1, 2),
    )
    copy_notices(source_dir, ATLAS_NOTICES, out_dir)
    print(f"atlas {ATLAS_NAME}: {sizes[0]} -> {sizes[1]}")


def make_stacks(shared: Path, out: Path) -> None:
    source_dir, out_dir = shared / STACKS_DIR, out / "sub01"
    out_dir.mkdir(parents=True, exist_ok=True)
    for run in STACK_RUNS:
        stem = f"sub-01_run-{run}_T2w"
        sizes = crop_pair(
            source_dir / f"{stem}.nii.gz",
            source_dir / f"{stem}_desc-brain_mask.nii.gz",
            out_dir,
            STACK_MARGIN_MM,
            axes=(0, 1),
        )
        reduce_sidecar(source_dir / f"{stem}.json", out_dir / f"{stem}.json")
        print(f"{stem}: {sizes[0]} -> {sizes[1]}")
    copy_notices(source_dir, STACK_NOTICES, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shared_data", type=Path, help="the shared data folder (holds the two datasets)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent, help="default: this folder"
    )
    args = parser.parse_args(argv)
    for name in (ATLAS_DIR, STACKS_DIR):
        if not (args.shared_data / name).is_dir():
            print(f"{args.shared_data / name}: folder not found", file=sys.stderr)
            return 2
    make_atlas(args.shared_data, args.out)
    make_stacks(args.shared_data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
