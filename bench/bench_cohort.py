"""Benchmark of a cohort: N simulated subjects (the bundled atlas, a different motion and noise each) as a
BIDS dataset, reconstructed one at a time (the sum of single runs, each its own process with every
CPU) and by ``gaussiansvr batch`` on its default local Dask cluster; wall times side by side.

    python bench/bench_cohort.py [--subjects 8] [--preset preview]

Writes docs/benchmarks_cohort.md (or --write) and bench/output/cohort/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench_reconstruction as base
import SimpleITK as sitk

from GaussianSVRLib.cohort.batch import local_cluster_size, physical_memory
from GaussianSVRLib.devices import cpu_threads
from GaussianSVRLib.sim.simulate import simulate_stacks

ATLAS = ROOT / "GaussianSVRLib" / "data" / "atlas"
OUTPUT = ROOT / "bench" / "output" / "cohort"
SECTION = ROOT / "docs" / "benchmarks_cohort.md"


def make_dataset(folder: Path, subjects: int) -> tuple[Path, Path]:
    """bids/ (and masks/): sub-01 ... as 4 stacks each simulated from the atlas with its own seed."""
    bids, masks = folder / "bids", folder / "masks"
    if (bids / "dataset_description.json").is_file() and len(list(bids.glob("sub-*"))) == subjects:
        return bids, masks
    shutil.rmtree(folder, ignore_errors=True)
    volume = sitk.ReadImage(str(ATLAS / "SB_GA28_operated_T2w.nii.gz"))
    mask = sitk.ReadImage(str(ATLAS / "SB_GA28_operated_brainmask.nii.gz"))
    for s in range(subjects):
        label = f"sub-{s + 1:02d}"
        sim = simulate_stacks(volume, mask, folder / "sim" / label, seed=100 + s)
        for directory in (bids / label / "anat", masks / label / "anat"):
            directory.mkdir(parents=True)
        for r, (stack, stack_mask) in enumerate(zip(sim.stack_paths, sim.mask_paths, strict=True)):
            shutil.copy(stack, bids / label / "anat" / f"{label}_run-{r + 1}_T2w.nii.gz")
            shutil.copy(stack_mask, masks / label / "anat" / f"{label}_run-{r + 1}_desc-brain_mask.nii.gz")
    (bids / "dataset_description.json").write_text(
        json.dumps({"Name": "simulated cohort", "BIDSVersion": "1.9.0"})
    )
    return bids, masks


def gaussiansvr(*args: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "GaussianSVRLib", *args], cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode not in (0,):
        raise SystemExit(f"gaussiansvr {' '.join(args[:2])} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--preset", default="preview", choices=("preview", "standard", "high"))
    parser.add_argument("--write", type=Path, default=SECTION)
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 subjects")
    args = parser.parse_args()
    if args.quick:
        args.subjects = 2
    started = time.perf_counter()
    info = base.machine(os.getloadavg())
    bids, masks = make_dataset(OUTPUT / "data", args.subjects)
    singles = []
    for subject in sorted(p.name for p in bids.glob("sub-*")):
        out = OUTPUT / "single" / subject
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        stacks = sorted((bids / subject / "anat").glob("*_T2w.nii.gz"))
        subject_masks = [
            masks / subject / "anat" / s.name.replace("_T2w", "_desc-brain_mask") for s in stacks
        ]
        singles.append(gaussiansvr("reconstruct", "--input-stacks", *map(str, stacks), "--stack-masks",
                                   *map(str, subject_masks), "--output-volume", str(out / "volume.nii.gz"),
                                   "--preset", args.preset, "--progress", "none"))  # fmt: skip
        print(f"{subject}: {singles[-1]:.1f} s alone", flush=True)
    shutil.rmtree(OUTPUT / "batch", ignore_errors=True)
    batch = gaussiansvr(
        "batch", str(bids), str(OUTPUT / "batch"), "--masks-dir", str(masks), "--preset", args.preset
    )
    workers, threads = local_cluster_size(cpu_threads(), physical_memory())
    print(
        f"batch: {batch:.1f} s on {workers} workers x {threads} thread(s); "
        f"sum of single runs {sum(singles):.1f} s"
    )
    lines = [
        *base.section_heading("Cohort (gaussiansvr batch)", args.quick, "2 subjects"),
        f"Measured {info['date']} at commit {info['commit']} on {info['nproc']} CPUs ({info['cpu']}), load "
        f"{info['load_start'][0]:.2f} at the start and {os.getloadavg()[0]:.2f} at the end; bench took "
        f"{time.perf_counter() - started:.0f} s. {args.subjects} subjects, each the bundled 28-week atlas "
        f"simulated as 4 stacks (0.8 mm, 3 mm slices, ±5°/±3 mm, 2 % noise) with its own seed; preset "
        f"`{args.preset}`; one run each (the single runs one after the other, each its own process with "
        "every CPU).",
        "",
        "| | wall time (s) |",
        "|---|---|",
        f"| sum of the {args.subjects} single runs | {sum(singles):.1f} |",
        f"| `gaussiansvr batch` (local Dask cluster: {workers} workers x {threads} thread) | {batch:.1f} |",
        f"| ratio (batch / sum) | {batch / sum(singles):.2f} |",
        "",
        f"Single runs (s): {', '.join(f'{t:.1f}' for t in singles)}. The batch time includes starting the "
        "cluster, the montages, the sidecars and the QC table and page.",
        "",
    ]
    args.write.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
