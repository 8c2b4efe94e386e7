"""Where reconstructions lose (issue 11): blur or artifacts, on the black-background target case and on
cases where the brain is not alone (a synthetic skull, fluid and uterus around the atlas,
sim/surroundings.py), at three weeks of gestation, one (32) never used while tuning.

    python bench/bench_resolution.py [--repeats 3] [--cases target,surround-28]
    python bench/bench_resolution.py --levers [NAMES] [--repeats 3] [--cases target,surround-28]

Per case and reconstruction seed: PSNR / SSIM / NCC inside the brain mask (metrics.evaluate), the
effective resolution and the PSNR against the truth blurred by it, and PSNR by depth from the mask
boundary (qa/resolution.py). Writes docs/benchmarks_resolution.md (or --write) and
bench/output/resolution/. With --levers: the same numbers for each lever of LEVERS (settings changed
from the standard preset) beside the preset itself, with the change in PSNR and time, in
docs/benchmarks_resolution_levers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench_reconstruction as base
import SimpleITK as sitk

from GaussianSVRLib.io.outputs import write_json
from GaussianSVRLib.qa.metrics import evaluate
from GaussianSVRLib.qa.resolution import band_names, loss_analysis
from GaussianSVRLib.sim import simulate
from GaussianSVRLib.sim.surroundings import surround

OUTPUT = ROOT / "bench" / "output" / "resolution"
SECTION = ROOT / "docs" / "benchmarks_resolution.md"
LEVERS_SECTION = ROOT / "docs" / "benchmarks_resolution_levers.md"
#: The levers of issue 11 measured by --levers: name -> settings changed from the standard preset.
LEVERS = {
    "standard": {},
    "not cut to the brain": {"cut_to_brain": False},
    "K 32": {"k_neighbours": 32},
    "12k Gaussians, K 32": {"n_gaussians": 12000, "k_neighbours": 32},
}
#: case -> (atlas stem, with surroundings); every case: 4 stacks, 0.8 mm, 3 mm slices, ±5°/±3 mm.
CASES = {
    "target": ("SB_GA28_operated", False),
    "surround-28": ("SB_GA28_operated", True),
    "surround-23": ("SB_GA23_notoperated", True),
    "surround-32": ("SB_GA32_operated", True),
}
SIMULATION = {"n_stacks": 4, "in_plane": 0.8, "thickness": 3.0, "max_rotation_deg": 5.0,
              "max_translation_mm": 3.0, "noise": 0.02, "seed": 0}  # fmt: skip
BANDS = band_names()


@cache
def simulated(name: str) -> tuple[simulate.SimulationResult, sitk.Image, sitk.Image]:
    """The case's stacks (simulated once per set of parameters), its truth and brain mask (built once
    per process: the surroundings take seconds)."""
    atlas, surrounded = CASES[name]
    volume = sitk.ReadImage(str(base.ATLAS_DIR / f"{atlas}_T2w.nii.gz"), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(base.ATLAS_DIR / f"{atlas}_brainmask.nii.gz"))
    if surrounded:
        volume, mask = surround(volume, mask, seed=SIMULATION["seed"])
    folder = OUTPUT / "simulated" / name
    key = {"atlas": atlas, "surroundings": surrounded, **SIMULATION, "simulate_py": base._source_digest()}
    transforms = folder / "transforms.json"
    if (folder / "case.json").exists() and json.loads((folder / "case.json").read_text()) == key:
        data = simulate.read_transforms(transforms)
        result = simulate.SimulationResult(
            [s["path"] for s in data["stacks"]], [s["mask_path"] for s in data["stacks"]], str(transforms)
        )
    else:
        result = simulate.simulate_stacks(volume, mask, folder, **SIMULATION)
        write_json(key, folder / "case.json")
    return result, volume, mask


def measure(name: str, seed: int, settings: dict, lever: str = "") -> dict:
    result, volume, mask = simulated(name)
    folder = OUTPUT / name / lever.replace(" ", "_") / f"seed{seed}"
    spec = {"preset": "standard", "settings": {**settings, "seed": seed}, "stacks": result.stack_paths,
            "masks": result.mask_paths, "thicknesses": None, "volume": str(folder / "volume.nii.gz"),
            "report": str(folder / "report.json")}  # fmt: skip
    run = base.run_child(spec, folder)
    if run["returncode"] != 0:
        raise RuntimeError(f"{name} seed {seed}: {run['log_tail']}")
    image = sitk.ReadImage(spec["volume"])
    quality = evaluate(image, volume, mask)
    loss = loss_analysis(image, volume, mask)
    if seed == 0:
        base.write_montage(
            image, folder.parent / "montage.png", title=f"{name} {lever}: PSNR {quality['psnr']:.1f} dB"
        )
    return {
        "psnr": quality["psnr"], "ssim": quality["ssim"], "ncc": quality["ncc"],
        "fwhm": loss["effective_fwhm_mm"], "vs_blurred": loss["psnr_vs_blurred"],
        "specks": loss["bright_outside"],
        **{f"depth {band}": loss["psnr_by_depth"][band] for band in BANDS}, "time": run["wall_s"],
    }  # fmt: skip


COLUMNS = ["psnr", "ssim", "ncc", "fwhm", "vs_blurred", *(f"depth {b}" for b in BANDS), "specks", "time"]
DIGITS = {"ssim": 3, "ncc": 3, "fwhm": 2, "specks": 0, "time": 0}
DEFINITIONS = [
    "- PSNR, SSIM, NCC: `metrics.evaluate` inside the brain mask (rigid alignment, affine intensity fit).",
    "- FWHM: effective resolution, the FWHM (mm) of the isotropic Gaussian blur of the truth that the "
    "result matches best inside the mask; the in-plane PSF of 0.8 mm pixels has FWHM 0.96 mm.",
    "- vs blurred: PSNR (dB) against the truth blurred by that FWHM: what blur does not explain (artifacts).",
    "- depth a-b: PSNR (dB) of the voxels a to b mm inside the mask boundary.",
    "- specks: voxels (of the truth's 0.8 mm grid) farther than 3 mm outside the brain mask and brighter "
    "than the result's median inside it (`qa/specks.py`); nothing is fitted there.",
]


def medians(name: str, repeats: int, settings: dict, lever: str = "") -> dict:
    runs = [measure(name, seed, settings, lever) for seed in range(repeats)]
    row = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    print(name, lever, {key: round(value, 3) for key, value in row.items()}, flush=True)
    return row


def table(rows: dict[str, dict], first: str, columns: list[str]) -> list[str]:
    return [
        f"| {first} | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        *(
            f"| {name} | " + " | ".join(f"{row[c]:.{DIGITS.get(c, 2)}f}" for c in columns) + " |"
            for name, row in rows.items()
        ),
    ]


def measured_line(info: dict, started: float, repeats: int) -> str:
    return (
        f"Measured {info['date']} at commit {info['commit']} on {info['nproc']} CPUs ({info['cpu']}), load "
        f"{info['load_start'][0]:.2f} at the start and {os.getloadavg()[0]:.2f} at the end; bench took "
        f"{time.perf_counter() - started:.0f} s. Medians of {repeats} reconstructions (seeds 0 to "
        f"{repeats - 1}) of one simulation per case: 4 stacks, 0.8 mm pixels, 3 mm slices, ±5°/±3 mm per "
        "slice, 2 % noise."
    )


def levers_section(
    cases: list[str], levers: list[str], repeats: int, settings: dict, info: dict, started: float
) -> list[str]:
    """The levers (names of LEVERS, the first the reference) on every case; "d psnr" and "time x"
    against the first."""
    rows = {}
    for name in cases:
        standard = None
        for lever in levers:
            changes = LEVERS[lever]
            row = medians(name, repeats, {**settings, **changes}, lever)
            standard = standard or row
            row["d psnr"] = row["psnr"] - standard["psnr"]
            row["time x"] = row["time"] / standard["time"]
            rows[f"{name}, {lever}"] = row
    return [
        *base.section_heading("Levers for sharpness and artifacts (issue 11)", False, ""),
        measured_line(info, started, repeats) + " Each lever changes the standard preset as named "
        "(`LEVERS` in `bench/bench_resolution.py`); `d psnr` and `time x` are against the preset's row "
        "of the same case, measured in the same run.",
        "",
        *DEFINITIONS,
        "",
        *table(rows, "case, lever", ["psnr", "d psnr", "ssim", "fwhm", "vs_blurred", "depth 0-1.6", "specks",
                                     "time", "time x"]),
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cases", default=None, help="default: every case, or target,surround-28 with --levers"
    )
    parser.add_argument(
        "--levers",
        nargs="?",
        const=",".join(LEVERS),
        help="measure the levers of LEVERS (default all; or names, comma-separated, the first the reference)",
    )
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: the target case, once, 10 iterations"
    )
    args = parser.parse_args()
    settings = {"iterations": base.QUICK_ITERATIONS} if args.quick else {}
    cases = args.cases or ("target,surround-28" if args.levers else ",".join(CASES))
    if args.quick:
        cases, args.repeats = "target", 1
    started, info = time.perf_counter(), base.machine(os.getloadavg())
    if args.levers:
        levers = args.levers.split(",")
        unknown = [lever for lever in levers if lever not in LEVERS]
        if unknown:
            parser.error(f"unknown levers {unknown}; LEVERS has {list(LEVERS)}")
        lines = levers_section(cases.split(","), levers, args.repeats, settings, info, started)
        write = args.write or LEVERS_SECTION
    else:
        rows = {name: medians(name, args.repeats, settings) for name in cases.split(",")}
        lines = [
            *base.section_heading(
                "Blur or artifacts: effective resolution and PSNR by depth (issue 11)", False, ""
            ),
            measured_line(info, started, args.repeats) + " Preset `standard`. `target`: the atlas on a "
            "black background (today's target case); `surround-*`: the same atlas week with a synthetic "
            "skull, scalp, amniotic fluid and uterus outside its brain mask "
            "(`GaussianSVRLib/sim/surroundings.py`; week 32 was never used while tuning). The "
            "reconstruction gets the true brain masks.",
            "",
            *DEFINITIONS,
            "",
            *table(rows, "case", COLUMNS),
            "",
            "Montages (seed 0): `bench/output/resolution/<case>/montage.png`.",
        ]
        write = args.write or SECTION
    write.parent.mkdir(parents=True, exist_ok=True)
    write.write_text("\n".join(lines) + "\n")
    print(f"wrote {write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
