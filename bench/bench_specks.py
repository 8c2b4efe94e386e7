"""Specks around the brain on the real stacks (issue 11): the volume cut to the brain the stacks agree
on (``cut_to_brain``, the default) against the whole grid.

Per case (the six sub-01 stacks, then each set of five with one stack left out) both settings are
reconstructed in fresh processes. A speck is a voxel of the result farther than SPECK_MARGIN_MM from
the brain and brighter than the result's median inside it (``qa/specks.py``). The brain is an
independent one, MIALSRTK's support (its reconstruction's non-zero voxels, holes filled; see
bench_real.reference_masks), carried onto the result's grid by the rigid alignment of the result to
MIALSRTK; voxels outside MIALSRTK's field of view are not counted. The six-stack montages of both
settings go one above the other into docs/images/specks_real.png.

Usage: python bench/bench_specks.py [--quick] [--cases all,without1,...] [--write docs/benchmarks_specks.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_real as real
import bench_reconstruction as base

from GaussianSVRLib.io.outputs import write_png
from GaussianSVRLib.qa.metrics import rigid_align
from GaussianSVRLib.qa.specks import SPECK_MARGIN_MM, bright_outside

OUTPUT = base.OUTPUT / "specks"
SECTION = base.ROOT / "docs" / "benchmarks_specks.md"
PICTURE = base.ROOT / "docs" / "images" / "specks_real.png"
#: The setting before (the whole grid) and after (the default): the montages go in this order.
SETTINGS = {"whole grid": {"cut_to_brain": False}, "cut": {}}
CASES = ["all", *(f"without{run}" for run in real.RUNS)]


def reference_brain() -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """MIALSRTK's volume, its support (uint8) and its evaluation mask (for the alignment)."""
    reference = sitk.Cast(sitk.ReadImage(str(base.REAL_DIR / base.REAL_REFERENCE)), sitk.sitkFloat32)
    support = sitk.GetImageFromArray(real.reference_support(reference).astype(np.uint8))
    support.CopyInformation(reference)
    mask, _, _ = real.reference_masks(reference)
    return reference, support, mask


def specks(volume: sitk.Image, reference: sitk.Image, support: sitk.Image, mask: sitk.Image) -> dict:
    """Specks of a result against MIALSRTK's support, on the result's grid."""
    transform = rigid_align(volume, reference, mask).GetInverse()

    def carried(image: sitk.Image) -> np.ndarray:
        return (
            sitk.GetArrayFromImage(sitk.Resample(image, volume, transform, sitk.sitkNearestNeighbor, 0)) > 0
        )

    seen = sitk.Image(reference.GetSize(), sitk.sitkUInt8) + 1
    seen.CopyInformation(reference)
    values = sitk.GetArrayFromImage(volume)
    spacing = volume.GetSpacing()[::-1]
    count = bright_outside(values, carried(support), spacing, carried(seen))
    return {"specks": count, "specks_ml": count * float(np.prod(spacing)) / 1000.0}


def measure(case: str, setting: str, iterations: dict, brain) -> dict:
    left_out = None if case == "all" else int(case.removeprefix("without"))
    used = [run for run in real.RUNS if run != left_out]
    folder = OUTPUT / case / setting.replace(" ", "_")
    spec = {
        "preset": "standard",
        "settings": {**iterations, **SETTINGS[setting]},
        "stacks": [real.stack_paths(run)[0] for run in used],
        "masks": [real.stack_paths(run)[1] for run in used],
        "thicknesses": None,
        "volume": str(folder / "volume.nii.gz"),
        "report": str(folder / "report.json"),
    }
    run = base.run_child(spec, folder)
    if run["returncode"] != 0:
        raise RuntimeError(f"{case} {setting}: {run['log_tail']}")
    volume = sitk.ReadImage(spec["volume"])
    row = {"time": run["wall_s"], **specks(volume, *brain)}
    print(case, setting, row, flush=True)
    if case == "all":
        title = f"sub-01, six stacks, {setting}: {row['specks']} specks"
        base.write_montage(volume, folder / "montage.png", title=title)
    return row


def side_by_side(paths: list[Path], out: Path) -> None:
    """Montages (PNG) one above the other, padded to the widest."""
    pictures = [sitk.GetArrayFromImage(sitk.ReadImage(str(path))) for path in paths]
    width = max(picture.shape[1] for picture in pictures)
    gap = np.zeros((8, width), np.uint8)
    rows = []
    for picture in pictures:
        rows += [np.pad(picture, ((0, 0), (0, width - picture.shape[1]))), gap]
    write_png(np.vstack(rows[:-1]), out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the six stacks only, 10 iterations")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    cases = ["all"] if args.quick else args.cases.split(",")
    iterations = {"iterations": base.QUICK_ITERATIONS} if args.quick else {}
    started, info = time.perf_counter(), base.machine(os.getloadavg())
    brain = reference_brain()
    rows = {
        (case, setting): measure(case, setting, iterations, brain) for case in cases for setting in SETTINGS
    }
    picture = (base.OUTPUT / "quick" / PICTURE.name) if args.quick else PICTURE
    picture.parent.mkdir(parents=True, exist_ok=True)
    if "all" in cases:
        side_by_side(
            [OUTPUT / "all" / setting.replace(" ", "_") / "montage.png" for setting in SETTINGS], picture
        )
    lines = [
        *base.section_heading(
            "Specks around the brain on the real stacks (issue 11)", args.quick, "10 iterations"
        ),
        f"Measured {info['date']} at commit {info['commit']} on {info['nproc']} CPUs ({info['cpu']}); "
        f"bench took {time.perf_counter() - started:.0f} s. One reconstruction per row (seed 0), "
        f"preset `standard`. Specks: voxels of the result farther than {SPECK_MARGIN_MM:g} mm outside "
        "MIALSRTK's support (its reconstruction's brain, carried onto the result by a rigid "
        "alignment) and brighter than the result's median inside it, within MIALSRTK's field of view "
        "(`bench/bench_specks.py`, `qa/specks.py`). `cut`: the volume cut to the brain most stacks' "
        "masks agree on (`export/support.py`, the default); `whole grid`: `--no-cut-to-brain`, the "
        "Gaussians everywhere.",
        "",
        "| stacks | specks, whole grid | specks, cut | ml, whole grid | ml, cut | time (s), whole grid "
        "| time (s), cut |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        whole, cut = rows[(case, "whole grid")], rows[(case, "cut")]
        name = "all six" if case == "all" else f"five, run-{case.removeprefix('without')} left out"
        lines.append(
            f"| {name} | {whole['specks']} | {cut['specks']} | {whole['specks_ml']:.2f} "
            f"| {cut['specks_ml']:.2f} | {whole['time']:.0f} | {cut['time']:.0f} |"
        )
    if "all" in cases:
        lines += ["", f"![whole grid above, cut below](images/{PICTURE.name})"]
    text = "\n".join(lines) + "\n"
    print(text)
    write = args.write or (base.OUTPUT / "quick" / SECTION.name if args.quick else SECTION)
    write.parent.mkdir(parents=True, exist_ok=True)
    write.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
