"""Masks that make themselves (issue 13): the brain search against the manual masks of the real stacks
and against the true masks of simulated cases.

    python bench/bench_brain_search.py [--cases real,target,surround-23,...] [--quick]

Per case, two reconstructions in fresh processes (preset `standard`): with the given masks (manual or
true) and with none (the brain search). Reports the Dice of every stack's automatic mask against its
given mask, the brain volume found, the search's seconds and the whole run's against the masked run,
the stacks' agreement; on simulated cases PSNR / SSIM inside the true mask of both runs. Writes
docs/benchmarks_brain_search.md (or --write) and bench/output/brain_search/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench_reconstruction as base
import bench_resolution as resolution
import numpy as np
import SimpleITK as sitk

from GaussianSVRLib.qa.metrics import evaluate

OUTPUT = ROOT / "bench" / "output" / "brain_search"
SECTION = ROOT / "docs" / "benchmarks_brain_search.md"
#: Simulated cases: those of bench_resolution.py, and one week never used while the search was tuned.
SIMULATED = {**resolution.CASES, "surround-25": ("SB_GA25_notoperated", True)}


def real_case() -> tuple[list[str], list[str]]:
    stems = [f"sub-01_run-{run}_T2w" for run in range(1, 7)]
    return (
        [str(base.REAL_DIR / f"{stem}.nii.gz") for stem in stems],
        [str(base.REAL_DIR / f"{stem}_desc-brain_mask.nii.gz") for stem in stems],
    )


def run(stacks: list[str], masks: list[str] | None, folder: Path, settings: dict) -> dict:
    spec = {"preset": "standard", "settings": settings, "stacks": stacks, "masks": masks,
            "thicknesses": None, "volume": str(folder / "volume.nii.gz"),
            "report": str(folder / "report.json"), "masks_dir": str(folder / "masks")}  # fmt: skip
    record = base.run_child(spec, folder)
    if record["returncode"] != 0:
        raise RuntimeError(f"{folder}: {record['log_tail']}")
    record["report"] = json.loads((folder / "report.json").read_text())
    record["volume"] = sitk.ReadImage(spec["volume"])
    return record


def dice(found: Path, given: str) -> float:
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(found))) > 0
    b = sitk.GetArrayFromImage(sitk.ReadImage(given)) > 0
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def agreement(report: dict) -> float:
    return statistics.median(stack["agreement"] for stack in report["stacks"])


def measure(name: str, settings: dict) -> dict:
    if name == "real":
        stacks, masks = real_case()
        truth = None
    else:
        resolution.CASES.setdefault(name, SIMULATED[name])
        result, volume, mask = resolution.simulated(name)
        stacks, masks, truth = result.stack_paths, result.mask_paths, (volume, mask)
    masked = run(stacks, masks, OUTPUT / name / "given", settings)
    found = run(stacks, None, OUTPUT / name / "searched", settings)
    search = found["report"]["brain_search"]
    written = OUTPUT / name / "searched" / "masks"
    dices = [
        dice(written / f"{Path(path).name.removesuffix('.nii.gz')}_mask.nii.gz", given)
        for path, given in zip(stacks, masks, strict=True)
    ]
    row = {
        "dice min": min(dices), "dice median": statistics.median(dices),
        "brain ml": search["brain_volume_ml"],
        "search s": search["seconds"], "time given": masked["wall_s"], "time searched": found["wall_s"],
        "agreement given": agreement(masked["report"]), "agreement searched": agreement(found["report"]),
    }  # fmt: skip
    if truth is not None:
        given_q, found_q = evaluate(masked["volume"], *truth), evaluate(found["volume"], *truth)
        row |= {"psnr given": given_q["psnr"], "psnr searched": found_q["psnr"],
                "ssim given": given_q["ssim"], "ssim searched": found_q["ssim"]}  # fmt: skip
    base.write_montage(
        found["volume"], OUTPUT / name / "montage_searched.png", title=f"{name}: brain searched"
    )
    print(name, {k: round(v, 3) for k, v in row.items()}, "dice per stack", np.round(dices, 3), flush=True)
    return row | {"dices": dices}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(["real", *SIMULATED]))
    parser.add_argument("--write", type=Path, default=SECTION)
    parser.add_argument("--quick", action="store_true", help="smoke test: the target case, 10 iterations")
    args = parser.parse_args()
    settings = {"iterations": base.QUICK_ITERATIONS} if args.quick else {}
    if args.quick:
        args.cases = "target"
    started, info = time.perf_counter(), base.machine(os.getloadavg())
    rows = {name: measure(name, settings) for name in args.cases.split(",")}
    columns = ["dice min", "dice median", "brain ml", "search s", "time given", "time searched",
               "agreement given", "agreement searched", "psnr given", "psnr searched", "ssim given",
               "ssim searched"]  # fmt: skip
    digits = {
        "brain ml": 0,
        "search s": 0,
        "time given": 0,
        "time searched": 0,
        "psnr given": 2,
        "psnr searched": 2,
    }

    def cell(row: dict, column: str) -> str:
        return f"{row[column]:.{digits.get(column, 3)}f}" if column in row else "-"

    lines = [
        *base.section_heading("Masks that make themselves: the brain search (issue 13)", False, ""),
        f"Measured {info['date']} at commit {info['commit']} on {info['nproc']} CPUs ({info['cpu']}), load "
        f"{info['load_start'][0]:.2f} at the start and {os.getloadavg()[0]:.2f} at the end; bench took "
        f"{time.perf_counter() - started:.0f} s. One reconstruction per case and way (preset `standard`, "
        "seed 0): with the given masks (the manual masks of the real stacks, the true masks of the "
        "simulations) and with none, the brain searched (`GaussianSVRLib/brain_search.py`). Simulated "
        "cases as in the resolution benchmark (4 stacks, 0.8 mm, 3 mm slices, ±5°/±3 mm); `surround-25` "
        "was never used while the search was tuned.",
        "",
        "- dice: of every stack's automatic mask against its given one, on the stack's grid.",
        "- brain ml: the brain the search found, before its 1.6 mm margin.",
        "- search s: the search's own seconds (its quick reconstruction included); time: whole runs.",
        "- agreement: median over the stacks of their agreement with the result (the QC report's).",
        "- psnr, ssim: of either result against the truth inside the true brain mask.",
        "",
        "| case | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        *(f"| {name} | " + " | ".join(cell(row, c) for c in columns) + " |" for name, row in rows.items()),
        "",
        "Montages of the searched runs: `bench/output/brain_search/<case>/montage_searched.png`.",
    ]
    args.write.parent.mkdir(parents=True, exist_ok=True)
    args.write.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
