"""Benchmark of whole reconstructions: quality, motion recovery, wall time and peak memory.

Cases: stacks simulated (``simulate.simulate_stacks``, cached under bench/output/simulated) from
atlas volumes of different gestational ages with increasing per-slice motion, one with drop-out
slices, one with six oblique stacks; plus the real subject sub-01, compared with its bundled
MIALSRTK reconstruction. Ablations on the "target" case (the issue's target): PSF mode, K, N and
the coarse-to-fine schedule.

Every reconstruction runs in a fresh process (this script with --child), so its peak memory is
its own: the max RSS of that process from os.wait4 (RUSAGE_CHILDREN would give the maximum over
all children so far, not per run). Wall time: reconstruct() alone, measured in the child (reading
the stacks and writing the volume included; simulation, process start-up and evaluation
excluded). Each configuration runs ``--repeats`` times with reconstruction seeds 0, 1, ... on
the same simulated stacks; tables give medians.

Usage: python bench/bench_reconstruction.py [--quick] [--repeats 3] [--ablation-repeats N]
       [--cases target,real] [--ablations psf,k,n,c2f|none] [--iterations N] [--preset standard]
       [--write docs/benchmarks_reconstruction.md]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from GaussianSVRLib.export.montage import write_montage
from GaussianSVRLib.io.outputs import write_json
from GaussianSVRLib.pipeline import Outputs, reconstruct
from GaussianSVRLib.qa.metrics import evaluate, motion_errors
from GaussianSVRLib.settings import preset
from GaussianSVRLib.sim import simulate

ATLAS_DIR = Path("/work/shared/data/fetal-atlas-spina-bifida-cc0")
REAL_DIR = Path("/work/shared/data/fetal-raw-stacks-sub01-cc0")
REAL_REFERENCE = "sub-01_rec-SR_T2w_mialsrtk_output.nii.gz"
#: Reference voxels above this fraction of its 99th percentile form the evaluation mask of "real"
#: (MIALSRTK's output is brain-extracted but its edge carries interpolation dust down to 1e-8).
REAL_MASK_FRACTION = 0.05
OUTPUT = ROOT / "bench" / "output"
DEFAULT_SECTION = ROOT / "docs" / "benchmarks_reconstruction.md"
QUICK_ITERATIONS = 10
TARGETS = {"psnr_gain_db": 8.0, "rotation_deg": 1.0, "translation_mm": 0.5, "time_s": 120.0, "memory_gb": 4.0}


@dataclass(frozen=True)
class Case:
    """A benchmark case: simulated from an atlas volume (``atlas`` stem) or the real subject."""

    name: str
    summary: str
    atlas: str | None = None
    simulation: dict[str, Any] = field(default_factory=dict)

    @property
    def simulated(self) -> bool:
        return self.atlas is not None


def _simulated(name: str, summary: str, atlas: str, **changes: Any) -> Case:
    parameters = {
        "n_stacks": 4,
        "in_plane": 0.8,
        "thickness": 3.0,
        "max_rotation_deg": 5.0,
        "max_translation_mm": 3.0,
        "noise": 0.02,
        "dropout": 0.0,
        "oblique": False,
        "seed": 0,
    }
    return Case(name, summary, atlas, {**parameters, **changes})


CASES = {
    case.name: case
    for case in (
        _simulated("target", "GA28, 4 stacks, ±5°/±3 mm (the issue's target)", "SB_GA28_operated"),
        _simulated(
            "mild",
            "GA23, 4 stacks, ±2°/±1 mm",
            "SB_GA23_notoperated",
            max_rotation_deg=2.0,
            max_translation_mm=1.0,
        ),
        _simulated(
            "strong",
            "GA31, 4 stacks, ±8°/±4 mm",
            "SB_GA31_operated",
            max_rotation_deg=8.0,
            max_translation_mm=4.0,
        ),
        _simulated(
            "dropout", "GA26, 4 stacks, ±5°/±3 mm, 5 % drop-out slices", "SB_GA26_operated", dropout=0.05
        ),
        _simulated(
            "six-oblique", "GA33, 6 oblique stacks, ±5°/±3 mm", "SB_GA33_operated", n_stacks=6, oblique=True
        ),
        Case("real", "sub-01, 6 real stacks (3 mm, sidecars) vs MIALSRTK"),
    )
}

#: Ablation group -> (Settings field, values); each value that equals the preset's reuses its runs.
ABLATIONS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "psf": ("psf_mode", ("exact", "normalized", "none")),
    "k": ("k_neighbours", (8, 16, 32)),
    "n": ("n_gaussians", (3000, 12000, 24000)),
    "c2f": ("coarse_to_fine", (True, False)),
}


def ablation_values(group: str, settings: dict[str, Any]) -> list[Any]:
    """The group's values, the preset's own value first when it is not among them."""
    setting, values = ABLATIONS[group]
    return list(values) if settings[setting] in values else [settings[setting], *values]


def ablation_overrides(setting: str, value: Any, settings: dict[str, Any]) -> dict[str, Any]:
    return {} if value == settings[setting] else {setting: value}


# ---------------------------------------------------------------------------------------------
# The child: one reconstruction in a fresh process.


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(spec_path: Path) -> None:
    """Run reconstruct() as described by spec.json (preset, settings, stacks, masks, optional
    thicknesses, gaussians and masks folder, volume, report paths); write result.json beside it.

    result.json: wall and CPU seconds of reconstruct(), the Gaussian count it used and the seconds
    per optimizer step (first to last progress event, neighbour refreshes included).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = json.loads(spec_path.read_text())
    settings = preset(spec["preset"]).updated(**spec["settings"])
    steps: list[tuple[int, float]] = []

    def events(kind: str, **fields: Any) -> None:
        if kind == "progress" and fields["stage"] != "brain search":
            steps.append((fields["iter"], time.perf_counter()))

    started, cpu = time.perf_counter(), cpu_seconds()
    result = reconstruct(
        spec["stacks"],
        spec["masks"],
        spec.get("thicknesses"),
        settings,
        Outputs(
            volume=spec["volume"],
            gaussians=spec.get("gaussians"),
            report=spec["report"],
            masks_dir=spec.get("masks_dir"),
        ),
        events=events,
    )
    record = {
        "wall_s": time.perf_counter() - started,
        "cpu_s": cpu_seconds() - cpu,
        "n_gaussians_used": len(result.gaussians["means"]),
    }
    if len(steps) > 1:
        record["step_s"] = (steps[-1][1] - steps[0][1]) / (steps[-1][0] - steps[0][0])
    write_json(record, spec_path.with_name("result.json"))


def run_child(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """One reconstruction in a fresh process: its return code, wall time and peak RSS (GB)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").unlink(missing_ok=True)
    spec_path = folder / "spec.json"
    write_json(spec, spec_path)
    with open(folder / "log.txt", "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    record: dict[str, Any] = {
        "returncode": process.returncode,
        "peak_memory_gb": usage.ru_maxrss * 1024 / 1e9,
    }
    if process.returncode == 0:
        record.update(json.loads((folder / "result.json").read_text()))
    else:
        record["log_tail"] = (folder / "log.txt").read_text().splitlines()[-5:]
    return record


# ---------------------------------------------------------------------------------------------
# Case data: simulation (cached), ground truth, naive average.


@dataclass
class CaseData:
    stacks: list[str]
    masks: list[str]
    reference: sitk.Image
    mask: sitk.Image
    truth: list[dict[str, Any]] | None
    simulate_s: float | None
    mask_rule: str


def _source_digest() -> str:
    """Hash of simulate.py: a change to the simulator invalidates the cached stacks."""
    return hashlib.sha1(Path(simulate.__file__).read_bytes()).hexdigest()[:12]


def simulate_case(case: Case) -> tuple[simulate.SimulationResult, float | None]:
    """The case's simulated stacks, from the cache when its parameters and simulate.py are unchanged."""
    folder = OUTPUT / "simulated" / case.name
    key = {"atlas": case.atlas, **case.simulation, "simulate_py": _source_digest()}
    key_path = folder / "case.json"
    transforms = folder / "transforms.json"
    if key_path.exists() and transforms.exists() and json.loads(key_path.read_text()) == key:
        data = simulate.read_transforms(transforms)
        stacks = [stack["path"] for stack in data["stacks"]]
        masks = [stack["mask_path"] for stack in data["stacks"]]
        return simulate.SimulationResult(stacks, masks, str(transforms)), None
    key_path.unlink(missing_ok=True)
    volume = sitk.ReadImage(str(ATLAS_DIR / f"{case.atlas}_T2w.nii.gz"))
    mask = sitk.ReadImage(str(ATLAS_DIR / f"{case.atlas}_brainmask.nii.gz"))
    started = time.perf_counter()
    result = simulate.simulate_stacks(volume, mask, folder, **case.simulation)
    elapsed = time.perf_counter() - started
    write_json(key, key_path)
    return result, elapsed


def real_mask(reference: sitk.Image) -> sitk.Image:
    array = sitk.GetArrayFromImage(reference)
    threshold = REAL_MASK_FRACTION * np.percentile(array[array > 0], 99)
    mask = sitk.GetImageFromArray((array > threshold).astype(np.uint8))
    mask.CopyInformation(reference)
    return mask


def load_case(case: Case) -> CaseData:
    if case.simulated:
        result, elapsed = simulate_case(case)
        reference = sitk.Cast(sitk.ReadImage(str(ATLAS_DIR / f"{case.atlas}_T2w.nii.gz")), sitk.sitkFloat32)
        mask = sitk.ReadImage(str(ATLAS_DIR / f"{case.atlas}_brainmask.nii.gz"))
        truth = simulate.read_truth(result.transforms_path)
        return CaseData(
            result.stack_paths,
            result.mask_paths,
            reference,
            mask,
            truth,
            elapsed,
            "the atlas brain mask",
        )
    stems = [f"sub-01_run-{run}_T2w" for run in range(1, 7)]
    reference = sitk.Cast(sitk.ReadImage(str(REAL_DIR / REAL_REFERENCE)), sitk.sitkFloat32)
    return CaseData(
        [str(REAL_DIR / f"{stem}.nii.gz") for stem in stems],
        [str(REAL_DIR / f"{stem}_desc-brain_mask.nii.gz") for stem in stems],
        reference,
        real_mask(reference),
        None,
        None,
        f"MIALSRTK reference voxels > {REAL_MASK_FRACTION:g} x its 99th percentile",
    )


QUALITY_KEYS = ("psnr", "ssim", "ncc", "nrmse")


def quality(image: sitk.Image, data: CaseData) -> dict[str, float]:
    values = evaluate(image, data.reference, data.mask)
    return {key: values[key] for key in (*QUALITY_KEYS, "alignment_angle_deg", "alignment_shift_mm")}


def slice_statistics(report: dict[str, Any], truth: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Median motion errors against the truth (all slices), and which slices were excluded."""
    slices = report["slices"]
    excluded = {(s["stack"], s["k"]) for s in slices if s["excluded"]}
    stats: dict[str, Any] = {"n_slices": len(slices), "n_excluded": len(excluded)}
    if truth is None:
        return stats
    rotation, translation = motion_errors(slices, truth)
    dropped = {(t["stack"], t["k"]) for t in truth if t.get("dropout")}
    stats.update(
        rotation_error_deg=float(np.median(rotation)),
        translation_error_mm=float(np.median(translation)),
        n_dropout=len(dropped),
        n_dropout_excluded=len(dropped & excluded),
    )
    return stats


# ---------------------------------------------------------------------------------------------
# Running the configurations.


def variant_label(overrides: dict[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(overrides.items())) or "default"


def median_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of every numeric field over the successful runs, and how many there were.

    A field that is undefined in some runs (None, e.g. a precision with nothing excluded) takes the
    median of the runs that define it.
    """

    def numeric(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    good = [run for run in runs if run["returncode"] == 0]
    summary: dict[str, Any] = {"n_ok": len(good), "n_runs": len(runs)}
    keys = {key for run in good for key, value in run.items() if numeric(value)} - {"returncode", "seed"}
    for key in sorted(keys):
        summary[key] = statistics.median(run[key] for run in good if numeric(run.get(key)))
    return summary


class Bench:
    """Runs (case, settings overrides) configurations, each once per seed, and keeps the results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = {"iterations": QUICK_ITERATIONS} if args.quick else {}
        if args.iterations is not None:
            self.base["iterations"] = args.iterations
        self.cases: dict[str, dict[str, Any]] = {}
        self.data: dict[str, CaseData] = {}

    def case_record(self, name: str) -> dict[str, Any]:
        if name not in self.cases:
            case = CASES[name]
            print(f"[{name}] preparing the case ...", flush=True)
            data = self.data[name] = load_case(case)
            naive = simulate.naive_average(data.stacks, data.reference)
            self.cases[name] = {
                "definition": {"summary": case.summary, "atlas": case.atlas, "simulation": case.simulation},
                "simulate_s": data.simulate_s,
                "evaluation_mask": data.mask_rule,
                "naive": quality(naive, data),
                "variants": {},
            }
            naive_psnr = self.cases[name]["naive"]["psnr"]
            print(f"[{name}] naive average PSNR {naive_psnr:.2f} dB", flush=True)
        return self.cases[name]

    def variant(self, name: str, overrides: dict[str, Any], repeats: int) -> dict[str, Any]:
        """The runs of one configuration (computed on first request, seeds 0..repeats-1), medians."""
        record = self.case_record(name)
        label = variant_label(overrides)
        if label in record["variants"]:
            return record["variants"][label]
        data = self.data[name]
        runs = []
        for seed in range(repeats):
            folder = OUTPUT / name / "runs" / f"{label}_seed{seed}"
            spec = {
                "preset": self.args.preset,
                "settings": {**self.base, **overrides, "seed": seed},
                "stacks": data.stacks,
                "masks": data.masks,
                # Thickness: the slice spacing for simulated stacks, the BIDS sidecars for sub-01.
                "thicknesses": None,
                "volume": str(folder / "volume.nii.gz"),
                "report": str(folder / "report.json"),
            }
            saved = folder / "result.json"
            if self.args.resume and saved.exists() and json.loads(saved.read_text()).get("spec") == spec:
                run = json.loads(saved.read_text())["run"]
            else:
                run = {"seed": seed, **run_child(spec, folder)}
                if run["returncode"] == 0:
                    self.evaluate_run(name, label, run, spec)
                write_json({"spec": spec, "run": run}, saved)
            runs.append(run)
            print(f"[{name}] {label} seed {seed}: {run_line(run)}", flush=True)
        record["variants"][label] = {"overrides": overrides, "runs": runs, "median": median_summary(runs)}
        return record["variants"][label]

    def evaluate_run(self, name: str, label: str, run: dict[str, Any], spec: dict[str, Any]) -> None:
        """Quality and motion errors of a finished run, into ``run``; a failure marks the run failed."""
        data = self.data[name]
        try:
            image = sitk.ReadImage(spec["volume"])
            report = json.loads(Path(spec["report"]).read_text())
            started = time.perf_counter()
            run.update(quality(image, data))
            run["evaluate_s"] = time.perf_counter() - started
            run.update(slice_statistics(report, data.truth))
        except Exception as error:  # one bad run must not end an hour of benchmark
            run["returncode"] = "evaluation failed"
            run["log_tail"] = [f"{type(error).__name__}: {error}"]
            return
        run["timings"] = report["timings"]
        run["thicknesses"] = [stack["thickness"] for stack in report["stacks"]]
        if run["seed"] == 0 and label == "default":
            write_montage(image, OUTPUT / name / "montage.png", title=montage_title(name, run))


def montage_title(name: str, run: dict[str, Any]) -> str:
    against = " vs MIALSRTK" if name == "real" else ""
    return f"{name}{against}: PSNR {run['psnr']:.1f} dB, NCC {run['ncc']:.2f}"


def run_line(run: dict[str, Any]) -> str:
    if run["returncode"] != 0:
        code = run["returncode"]
        status = f"exit {code}" if isinstance(code, int) else code
        return f"FAILED ({status}): {run['log_tail'][-1] if run['log_tail'] else ''}"
    motion = ""
    if "rotation_error_deg" in run:
        motion = f", rot {run['rotation_error_deg']:.2f} deg, trans {run['translation_error_mm']:.2f} mm"
    return (
        f"PSNR {run['psnr']:.2f} SSIM {run['ssim']:.3f} NCC {run['ncc']:.3f}{motion}, "
        f"{run['wall_s']:.1f} s, {run['peak_memory_gb']:.2f} GB"
    )


# ---------------------------------------------------------------------------------------------
# Machine description and the markdown section.


def machine(load: tuple[float, float, float]) -> dict[str, Any]:
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            model,
        )

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    import torch

    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": model,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_start": load,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": git("rev-parse", "--short", "HEAD") or "unknown",
        "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def _number(value: float | None, digits: int, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _row(label: str, median: dict[str, Any], psnr_reference: float | None) -> str:
    if median["n_ok"] == 0:
        return f"| {label} | failed ({median['n_runs']} runs) |" + " |" * 8
    get = median.get
    delta = None if psnr_reference is None else median["psnr"] - psnr_reference
    failed = "" if median["n_ok"] == median["n_runs"] else f" ({median['n_runs'] - median['n_ok']} failed)"
    cells = [
        f"{label}{failed}",
        _number(get("psnr"), 2),
        _number(delta, 2, signed=True),
        _number(get("ssim"), 3),
        _number(get("ncc"), 3),
        _number(get("rotation_error_deg"), 2),
        _number(get("translation_error_mm"), 2),
        _number(get("wall_s"), 1),
        _number(get("cpu_s"), 0),
        _number(get("peak_memory_gb"), 2),
    ]
    return "| " + " | ".join(cells) + " |"


def targets_table(target: dict[str, Any]) -> list[str]:
    median = target["variants"]["default"]["median"]
    if median["n_ok"] == 0:
        return ["The target case failed: no target can be checked."]
    measured = {
        "psnr_gain_db": median["psnr"] - target["naive"]["psnr"],
        "rotation_deg": median.get("rotation_error_deg"),
        "translation_mm": median.get("translation_error_mm"),
        "time_s": median["wall_s"],
        "memory_gb": median["peak_memory_gb"],
    }
    rows = [
        ("PSNR gain over the naive average", "≥ 8 dB", "psnr_gain_db", "dB", True),
        ("median slice rotation error", "≤ 1°", "rotation_deg", "°", False),
        ("median slice translation error", "≤ 0.5 mm", "translation_mm", "mm", False),
        ("wall time of the reconstruction", "≤ 120 s", "time_s", "s", False),
        ("peak memory", "≤ 4 GB", "memory_gb", "GB", False),
    ]
    lines = ["| target | required | measured (median) | |", "|---|---|---|---|"]
    for what, required, key, unit, at_least in rows:
        value, bound = measured[key], TARGETS[key]
        met = value is not None and (value >= bound if at_least else value <= bound)
        lines.append(
            f"| {what} | {required} | {_number(value, 2)} {unit} | {'met' if met else '**not met**'} |"
        )
    return lines


TABLE_COLUMNS = (
    "PSNR (dB) | ΔPSNR vs {versus} | SSIM | NCC | rot err (°) | trans err (mm) | time (s) | CPU (s) "
    "| peak mem (GB)"
)


def table_header(first: str, versus: str) -> list[str]:
    return [f"| {first} | {TABLE_COLUMNS.format(versus=versus)} |", "|---" * 10 + "|"]


def repeats_phrase(repeats: int) -> str:
    if repeats == 1:
        return "One run (reconstruction seed 0)"
    return f"Medians of {repeats} runs (reconstruction seeds 0 to {repeats - 1})"


def section(results: dict[str, Any]) -> str:
    info, settings = results["machine"], results["settings"]
    dirty = " + uncommitted changes" if info["uncommitted_changes"] else ""
    schedule = "on" if settings["coarse_to_fine"] else "off"
    lines = section_heading(
        "Whole reconstructions (`bench/bench_reconstruction.py`)",
        results["quick"],
        f"{settings['iterations']} iterations",
    )
    lines += [
        f"Measured {info['date']} at commit {info['commit']}{dirty} on {info['cpu']}, {info['nproc']} cores "
        f"(torch {info['torch']}, {info['torch_threads']} threads, Python {info['python']}); load average "
        f"{info['load_start'][0]:.1f} at start, {results['load_end'][0]:.1f} at end (the cores were "
        f"shared); bench time {results['bench_s'] / 60:.0f} min.",
        "",
        f"Settings: preset `{results['preset']}` ({settings['n_gaussians'] or 'automatic'} Gaussians, K = "
        f"{settings['k_neighbours']}, {settings['iterations']} iterations, PSF `{settings['psf_mode']}`, "
        f"coarse-to-fine {schedule}, output {settings['output_resolution']} mm, device "
        f"{settings['device']}). {repeats_phrase(results['repeats'])} on the same simulated stacks per case.",
        "",
        "- Each reconstruction runs in a fresh process. Time: wall clock of `reconstruct()` (reading",
        "  the stacks, pre-alignment, initialization, optimization, rendering and writing the volume);",
        "  simulation and evaluation excluded. CPU: user + system seconds of `reconstruct()` (both",
        "  cores; less sensitive to other load than wall time). Peak memory: max RSS of that process",
        "  (imports included).",
        "- PSNR, SSIM, NCC: `metrics.evaluate` (rigid alignment to the reference, least-squares",
        "  intensity fit) inside the atlas brain mask, against the atlas volume the stacks were",
        "  simulated from. ΔPSNR: against the naive average of the stacks resampled onto the same grid",
        "  (`simulate.naive_average`), evaluated the same way.",
        "- rot / trans err: median over all slices of `metrics.motion_errors` against the simulated",
        "  transforms (global rigid frame removed).",
        "- real: agreement with the bundled MIALSRTK reconstruction (from 3 of the 6 stacks,",
        f"  TV-regularized), not a ground truth; evaluation mask: {results['real_mask_rule']}.",
        "- Montages (first run of each case): `bench/output/<case>/montage.png`.",
        "",
    ]
    cases = results["cases"]
    lines += [
        "| case | data | Gaussians | naive PSNR / SSIM / NCC | slices excluded |",
        "|---|---|---|---|---|",
    ]
    for name, record in cases.items():
        naive = record["naive"]
        median = record["variants"]["default"]["median"]
        excluded = _number(median.get("n_excluded"), 0) + f" of {_number(median.get('n_slices'), 0)}"
        if median.get("n_dropout"):
            excluded += (
                f" ({_number(median['n_dropout_excluded'], 0)} of the {median['n_dropout']} drop-outs)"
            )
        lines.append(
            f"| {name} | {record['definition']['summary']} | {_number(median.get('n_gaussians_used'), 0)} | "
            f"{naive['psnr']:.2f} / {naive['ssim']:.3f} / {naive['ncc']:.3f} | {excluded} |"
        )
    lines += ["", *table_header("case", "naive")]
    for name, record in cases.items():
        lines.append(_row(name, record["variants"]["default"]["median"], record["naive"]["psnr"]))
    if "target" in cases:
        lines += [
            "",
            "Targets of the issue (target case, this machine):",
            "",
            *targets_table(cases["target"]),
        ]
    if results["ablations"]:
        target = cases["target"]
        default_psnr = target["variants"]["default"]["median"].get("psnr")
        lines += [
            "",
            "Ablations on the target case (one setting changed from the preset; ΔPSNR vs the preset's row; "
            f"{repeats_phrase(results['ablation_repeats']).lower()} per row):",
            "",
            *table_header("setting", "preset"),
        ]
        for group in results["ablations"]:
            setting = ABLATIONS[group][0]
            for value in ablation_values(group, settings):
                median = target["variants"][variant_label(ablation_overrides(setting, value, settings))][
                    "median"
                ]
                shown = value
                if setting == "n_gaussians" and value == 0:
                    shown = f"auto ({_number(median.get('n_gaussians_used'), 0)})"
                tag = f"{setting} = {shown}" + (" (preset)" if value == settings[setting] else "")
                lines.append(_row(tag, median, default_psnr))
    lines.append("")
    return "\n".join(lines)


def add_run_arguments(parser: argparse.ArgumentParser, section: Path, quick: str) -> None:
    """The flags every whole-reconstruction benchmark shares: --repeats, --resume, --quick (doing
    what ``quick`` says), --iterations, --preset, --write (default ``section``)."""
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (seeds 0..n-1)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse runs whose result.json matches their settings (a long benchmark can be resumed)",
    )
    parser.add_argument("--quick", action="store_true", help=f"smoke test: {quick}")
    parser.add_argument("--iterations", type=int, help="override the preset's iterations")
    parser.add_argument("--preset", default="standard", choices=("preview", "standard", "high"))
    parser.add_argument(
        "--write",
        type=Path,
        help=f"markdown section (default {section.relative_to(ROOT)}; with --quick, bench/output/)",
    )


def results_header(
    info: dict[str, Any], started: float, args: argparse.Namespace, settings: dict[str, Any]
) -> dict[str, Any]:
    """What every benchmark's results JSON starts with: the machine (``machine()`` at the start),
    the load at the end, the bench's duration since ``started`` (perf_counter), the run flags and
    the settings used."""
    return {
        "machine": info,
        "load_end": os.getloadavg(),
        "bench_s": time.perf_counter() - started,
        "quick": args.quick,
        "repeats": args.repeats,
        "preset": args.preset,
        "settings": settings,
    }


def section_heading(title: str, quick: bool, what_quick_ran: str) -> list[str]:
    """The section's heading, and under it the smoke-test warning when ``quick``."""
    lines = [f"## {title}", ""]
    if quick:
        lines += [
            f"**Smoke test (`--quick`, {what_quick_ran}): these numbers say the pipeline runs, not how "
            "well it reconstructs.**",
            "",
        ]
    return lines


def write_text_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------


def parse_list(text: str, known: list[str], what: str) -> list[str]:
    if text == "none":
        return []
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)}, or none)")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument(
        "--ablations",
        default=",".join(ABLATIONS),
        help=f"comma-separated, of: {', '.join(ABLATIONS)}; or none",
    )
    add_run_arguments(parser, DEFAULT_SECTION, f"{QUICK_ITERATIONS} iterations per run")
    parser.add_argument("--ablation-repeats", type=int, help="runs per ablation (default: --repeats)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    ablation_repeats = args.repeats if args.ablation_repeats is None else args.ablation_repeats
    if min(args.repeats, ablation_repeats) < 1:
        raise SystemExit("--repeats and --ablation-repeats must be at least 1")
    cases = parse_list(args.cases, list(CASES), "case")
    ablations = parse_list(args.ablations, list(ABLATIONS), "ablation")
    write = args.write or (OUTPUT / "benchmarks_reconstruction.md" if args.quick else DEFAULT_SECTION)

    started = time.perf_counter()
    info = machine(os.getloadavg())
    bench = Bench(args)
    for name in cases:
        bench.variant(name, {}, args.repeats)
    settings = preset(args.preset).updated(**bench.base).as_dict()
    for group in ablations:
        setting = ABLATIONS[group][0]
        for value in ablation_values(group, settings):
            bench.variant("target", ablation_overrides(setting, value, settings), ablation_repeats)
    # Cases in their canonical order, "target" first; ablations alone still show the target's row.
    ordered = {name: bench.cases[name] for name in CASES if name in bench.cases}
    results = {
        **results_header(info, started, args, settings),
        "ablation_repeats": ablation_repeats,
        "targets": TARGETS,
        "real_mask_rule": f"MIALSRTK reference voxels > {REAL_MASK_FRACTION:g} x its 99th percentile",
        "ablations": ablations,
        "cases": ordered,
    }
    write_json(results, OUTPUT / "reconstruction.json")
    text = section(results)
    write_text_atomically(write, text)
    print("\n" + text)
    print(f"wrote {write} and {OUTPUT / 'reconstruction.json'}")


if __name__ == "__main__":
    main()
