"""The motion prior in acquisition time (issue 15): is a trajectory better fitted when slices acquired
one after the other are tied together?

    python bench/bench_motion_prior.py [--weights 0,0.001,0.003,0.01] [--repeats 1] [--quick]

Cases (target geometry: GA28 atlas, 4 stacks, 0.8 mm, 3 mm slices, 2 % noise): ``trajectory``, a
smooth path in acquisition time with one jump per stack, ±10°/±5 mm, interleaved order (the stacks'
sidecars carry SliceTiming); ``target``, today's independent per-slice ±5°/±3 mm. Each weight of
--motion-smoothness in a fresh process (preset standard, seeds 0..repeats-1); PSNR / SSIM inside the
true mask and the median slice rotation error, medians over the repeats. Writes
docs/benchmarks_motion_prior.md (or --write).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_reconstruction as base
import SimpleITK as sitk

from GaussianSVRLib.qa.metrics import motion_errors

CASES = {
    "trajectory": base._simulated(
        "prior-trajectory", "GA28, trajectory ±10°/±5 mm, 1 jump per stack", "SB_GA28_operated",
        max_rotation_deg=10.0, max_translation_mm=5.0, motion="trajectory", jumps=1,
    ),
    "target": base.CASES["target"],
}  # fmt: skip
SECTION = base.ROOT / "docs" / "benchmarks_motion_prior.md"
OUTPUT = base.OUTPUT / "motion_prior"


def measure(name: str, weight: float, seed: int, settings: dict) -> dict:
    data = base.load_case(CASES[name])
    folder = OUTPUT / name / f"w{weight:g}_seed{seed}"
    spec = {"preset": "standard", "settings": {**settings, "motion_smoothness": weight, "seed": seed},
            "stacks": data.stacks, "masks": data.masks, "thicknesses": None,
            "volume": str(folder / "volume.nii.gz"), "report": str(folder / "report.json")}  # fmt: skip
    record = base.run_child(spec, folder)
    if record["returncode"] != 0:
        raise RuntimeError(f"{folder}: {record['log_tail']}")
    report = json.loads((folder / "report.json").read_text())
    rotation, _ = motion_errors(report["slices"], data.truth)
    values = base.quality(sitk.ReadImage(spec["volume"]), data)
    row = {"psnr": values["psnr"], "ssim": values["ssim"], "time": record["wall_s"],
           "rotation error": float(statistics.median(rotation))}  # fmt: skip
    print(name, weight, seed, {k: round(v, 3) for k, v in row.items()}, flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="0,0.001,0.003,0.01")
    parser.add_argument("--cases", default="trajectory,target")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--write", type=Path, default=SECTION)
    parser.add_argument("--quick", action="store_true", help="smoke test: 10 iterations, weights 0 and 0.01")
    args = parser.parse_args()
    settings = {"iterations": base.QUICK_ITERATIONS} if args.quick else {}
    weights = [0.0, 0.01] if args.quick else [float(w) for w in args.weights.split(",")]
    started, info = time.perf_counter(), base.machine(os.getloadavg())
    rows = []
    for name in args.cases.split(","):
        for weight in weights:
            runs = [measure(name, weight, seed, settings) for seed in range(args.repeats)]
            rows.append((name, weight, {k: statistics.median(r[k] for r in runs) for k in runs[0]}))
    lines = [
        *base.section_heading("The motion prior in acquisition time (issue 15)", args.quick, "10 iterations"),
        f"Measured {info['date']} at commit {info['commit']} on {info['nproc']} CPUs ({info['cpu']}), load "
        f"{info['load_start'][0]:.2f} at the start and {os.getloadavg()[0]:.2f} at the end; bench took "
        f"{time.perf_counter() - started:.0f} s; medians of {args.repeats} run(s) per row (seeds 0, 1, ...).",
        "",
        *(f"- {name}: {CASES[name].summary}" for name in args.cases.split(",")),
        "- weight: `--motion-smoothness`; rotation error: median over all slices (degrees).",
        "",
        "| case | weight | psnr | ssim | rotation error | time s |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {weight:g} | {row['psnr']:.2f} | {row['ssim']:.3f} | {row['rotation error']:.2f} | "
            f"{row['time']:.0f} |"
            for name, weight, row in rows
        ),  # fmt: skip
    ]
    base.write_text_atomically(args.write, "\n".join(lines) + "\n")
    print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
