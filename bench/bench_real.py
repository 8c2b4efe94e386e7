"""Benchmark on real acquisitions: the six HASTE stacks of sub-01 (CC0), with and without N4.

Per bias correction mode (the ``bias_correction`` setting, "none" and "n4"):

a. all six stacks reconstructed, compared with the bundled MIALSRTK reconstruction (``metrics.evaluate``
   after rigid alignment; see EVALUATION_EROSION_MM for the evaluation mask), with a montage;
b. leave-one-stack-out: each stack in turn is left out, the other five are reconstructed, and the
   left-out stack's agreement with the result is measured (``agreement.stack_agreement``: its slices
   registered to the Gaussians, median slice NCC inside its mask); the same agreement of every stack
   with the six-stack reconstruction, which did see it, is the in-sample ceiling.

In "n4" mode the stack checked for agreement is N4-corrected too (``bias.correct_bias``), as the
reconstruction's own inputs were. Thicknesses come from the BIDS sidecars (3.0 mm).

Every reconstruction runs in a fresh process (bench_reconstruction's child), so its peak memory is
its own (max RSS from os.wait4); wall and CPU time are those of ``reconstruct()`` in the child.
``--repeats`` runs per configuration (reconstruction seeds 0, 1, ...); tables give medians. Runs are
kept under bench/output/real_stacks/runs/, raw numbers in bench/output/real_stacks.json, montages in
bench/output/real_stacks/.

Usage: python bench/bench_real.py [--quick] [--repeats 3] [--bias none,n4] [--held-out 1,2,3,4,5,6]
       [--iterations N] [--preset standard] [--resume] [--write docs/benchmarks_real.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_reconstruction as base

from GaussianSVRLib.export.montage import write_montage
from GaussianSVRLib.fit.bias import correct_bias
from GaussianSVRLib.io.gaussians_file import load_gaussians
from GaussianSVRLib.io.outputs import write_json
from GaussianSVRLib.io.stacks import read_stack
from GaussianSVRLib.qa.agreement import AgreementSettings, stack_agreement
from GaussianSVRLib.qa.metrics import evaluate, rigid_align
from GaussianSVRLib.settings import preset

RUNS = tuple(range(1, 7))
OUTPUT = base.OUTPUT / "real_stacks"
RESULTS = base.OUTPUT / "real_stacks.json"
DEFAULT_SECTION = base.ROOT / "docs" / "benchmarks_real.md"
BIAS_MODES = ("none", "n4")
#: The reference's support: voxels above this fraction of its 99th percentile (MIALSRTK's output is
#: masked, with interpolation dust down to 1e-8 outside), holes filled.
SUPPORT_FRACTION = 1e-3
#: The evaluation mask is that support eroded by this much. MIALSRTK's output fades to zero over the
#: outer ~4 mm of its support (its brain mask, built from the stacks' thick-slice masks, and
#: blocky): in shells 0-2, 2-4, 4-7 and 7-12 mm inside the support its mean intensity is 13, 48, 85
#: and 104 (interior 98), while the brain there is bright CSF and cortex. That edge is a property of
#: the reference's mask, not of the anatomy, so it is left out (see the profile printed in the section).
EVALUATION_EROSION_MM = 4.5
#: Distance shells (mm inside the support) of the printed reference profile.
PROFILE_SHELLS_MM = (0.0, 2.0, 4.0, 7.0, 12.0, np.inf)
QUICK_AGREEMENT_ITERATIONS = 10


def stack_paths(run: int) -> tuple[str, str]:
    stem = f"sub-01_run-{run}_T2w"
    return str(base.REAL_DIR / f"{stem}.nii.gz"), str(base.REAL_DIR / f"{stem}_desc-brain_mask.nii.gz")


def slice_normal(run: int) -> str:
    """The world axis (LPS) closest to a stack's slice normal: its orientation family."""
    image = sitk.ReadImage(stack_paths(run)[0])
    normal = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
    return ("L-R", "A-P", "S-I")[int(np.argmax(np.abs(normal)))]


# ---------------------------------------------------------------------------------------------
# The reference, its evaluation mask and the quality of a reconstruction against it.


def reference_support(reference: sitk.Image) -> np.ndarray:
    """The reference's support [k, j, i]: voxels above SUPPORT_FRACTION of its 99th percentile, holes
    filled."""
    array = sitk.GetArrayFromImage(reference)
    p99 = np.percentile(array[array > 0], 99)
    return ndimage.binary_fill_holes(array > SUPPORT_FRACTION * p99)


def reference_masks(reference: sitk.Image) -> tuple[sitk.Image, sitk.Image, list[dict[str, float]]]:
    """The evaluation mask (support eroded by EVALUATION_EROSION_MM), the previous benchmark's
    thresholded mask, and the reference's mean intensity per shell of depth inside its support."""
    array = sitk.GetArrayFromImage(reference)
    support = reference_support(reference)
    depth = ndimage.distance_transform_edt(support, sampling=reference.GetSpacing()[::-1])
    mask = depth > EVALUATION_EROSION_MM
    profile = []
    for low, high in zip(PROFILE_SHELLS_MM[:-1], PROFILE_SHELLS_MM[1:], strict=True):
        shell = support & (depth > low) & (depth <= high)
        profile.append({"from_mm": low, "to_mm": high, "mean": float(array[shell].mean())})
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(reference)
    return image, base.real_mask(reference), profile


def quality(volume: sitk.Image, reference: sitk.Image, mask: sitk.Image, threshold_mask: sitk.Image) -> dict:
    """Rigidly aligned to the reference inside the evaluation mask, then ``metrics.evaluate`` inside
    both masks; returns the metrics and the aligned volume (on the reference grid)."""
    transform = rigid_align(volume, reference, mask)
    aligned = sitk.Resample(sitk.Cast(volume, sitk.sitkFloat32), reference, transform, sitk.sitkLinear, 0.0)
    values = evaluate(aligned, reference, mask, align=False)
    previous = evaluate(aligned, reference, threshold_mask, align=False)
    return {
        "metrics": {
            **{key: values[key] for key in ("ncc", "psnr", "ssim", "nrmse")},
            **{f"{key}_threshold_mask": previous[key] for key in ("ncc", "psnr", "ssim")},
        },
        "aligned": aligned,
    }


# ---------------------------------------------------------------------------------------------
# Runs.


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base_settings: dict[str, Any] = {"iterations": base.QUICK_ITERATIONS} if args.quick else {}
        if args.iterations is not None:
            self.base_settings["iterations"] = args.iterations
        settings = preset(args.preset).updated(**self.base_settings)
        self.agreement = AgreementSettings(
            iterations=QUICK_AGREEMENT_ITERATIONS if args.quick else AgreementSettings.iterations,
            k_neighbours=settings.k_neighbours,
            psf_mode=settings.psf_mode,
            in_plane_fwhm=settings.in_plane_fwhm,
        )
        self.reference = sitk.Cast(sitk.ReadImage(str(base.REAL_DIR / base.REAL_REFERENCE)), sitk.sitkFloat32)
        self.mask, self.threshold_mask, self.profile = reference_masks(self.reference)
        self.checked: dict[tuple[str, int], Any] = {}

    def checked_stack(self, bias: str, run: int):
        """The stack as the agreement sees it: read with its mask and sidecar thickness, N4 in n4 mode."""
        if (bias, run) not in self.checked:
            stack = read_stack(*stack_paths(run))
            self.checked[(bias, run)] = correct_bias(stack) if bias == "n4" else stack
        return self.checked[(bias, run)]

    def agreement_of(self, gaussians: dict[str, np.ndarray], bias: str, run: int) -> dict[str, Any]:
        started = time.perf_counter()
        result = stack_agreement(gaussians, self.checked_stack(bias, run), self.agreement)
        return {
            "median_ncc": result.median_ncc,
            "ncc": result.ncc,
            "slice_k": result.slice_k,
            "start": result.start,
            "seconds": time.perf_counter() - started,
        }

    def run(self, bias: str, left_out: int | None, seed: int) -> dict[str, Any]:
        """One reconstruction (six stacks, or all but ``left_out``) and its checks; reused with --resume."""
        name = "all" if left_out is None else f"without{left_out}"
        folder = OUTPUT / "runs" / f"{bias}_{name}_seed{seed}"
        used = [run for run in RUNS if run != left_out]
        spec = {
            "preset": self.args.preset,
            "settings": {**self.base_settings, "bias_correction": bias, "seed": seed},
            "stacks": [stack_paths(run)[0] for run in used],
            "masks": [stack_paths(run)[1] for run in used],
            "volume": str(folder / "volume.nii.gz"),
            "gaussians": str(folder / "gaussians.npz"),
            "report": str(folder / "report.json"),
            "agreement": asdict(self.agreement),
        }
        saved = folder / "result.json"
        if self.args.resume and saved.exists() and json.loads(saved.read_text()).get("spec") == spec:
            record = json.loads(saved.read_text())["run"]
        else:
            record = {"seed": seed, **base.run_child(spec, folder)}
            if record["returncode"] == 0:
                self.check(record, spec, bias, left_out, seed)
            write_json({"spec": spec, "run": record}, saved)
        print(f"[{bias} {name} seed {seed}] {run_line(record)}", flush=True)
        return record

    def check(self, record: dict[str, Any], spec: dict[str, Any], bias: str, left_out: int | None, seed: int):
        """Quality against MIALSRTK and in-sample agreement (six stacks), or the held-out agreement."""
        try:
            report = json.loads(Path(spec["report"]).read_text())
            record["n_slices"] = len(report["slices"])
            record["n_excluded"] = sum(item["excluded"] for item in report["slices"])
            gaussians = load_gaussians(spec["gaussians"])
            if left_out is not None:
                record["held_out"] = self.agreement_of(gaussians, bias, left_out)
                return
            volume = sitk.ReadImage(spec["volume"])
            started = time.perf_counter()
            measured = quality(volume, self.reference, self.mask, self.threshold_mask)
            record.update(measured["metrics"], evaluate_s=time.perf_counter() - started)
            if seed == 0:
                title = f"{bias}: NCC {record['ncc']:.3f} vs MIALSRTK"
                write_montage(
                    measured["aligned"], OUTPUT / f"montage_{bias}.png", mask=self.mask, title=title
                )
                native = f"{bias}: own {volume.GetSpacing()[0]:g} mm grid"
                write_montage(volume, OUTPUT / f"montage_{bias}_native.png", title=native)
            record["in_sample"] = {str(run): self.agreement_of(gaussians, bias, run) for run in RUNS}
        except Exception as error:  # one bad run must not end the benchmark
            record["returncode"] = "checks failed"
            record["log_tail"] = [f"{type(error).__name__}: {error}"]


def run_line(record: dict[str, Any]) -> str:
    if record["returncode"] != 0:
        return f"FAILED ({record['returncode']}): {record['log_tail'][-1] if record['log_tail'] else ''}"
    parts = [f"{record['wall_s']:.1f} s, {record['peak_memory_gb']:.2f} GB"]
    if "ncc" in record:
        parts.append(f"NCC {record['ncc']:.3f} PSNR {record['psnr']:.2f} vs MIALSRTK")
        inside = [value["median_ncc"] for value in record["in_sample"].values()]
        parts.append("in-sample NCC " + " ".join(f"{value:.3f}" for value in inside))
    if "held_out" in record:
        parts.append(f"held-out NCC {record['held_out']['median_ncc']:.3f}")
    return ", ".join(parts)


def median_of(records: list[dict[str, Any]], get) -> float | None:
    """Median of get(record) over the successful records that have it."""
    values = []
    for record in records:
        if record["returncode"] != 0:
            continue
        try:
            values.append(float(get(record)))
        except (KeyError, TypeError):
            continue
    values = [value for value in values if np.isfinite(value)]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------------
# The markdown section.


def _n(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def whole_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| bias correction | NCC | PSNR (dB) | SSIM | NCC, thresholded mask | slices excluded | time (s) "
        "| CPU (s) | peak mem (GB) |",
        "|---" * 9 + "|",
    ]
    for bias, mode in results["modes"].items():
        runs = mode["all"]
        ok = sum(run["returncode"] == 0 for run in runs)
        failed = "" if ok == len(runs) else f" ({len(runs) - ok} of {len(runs)} failed)"
        n_excluded = median_of(runs, lambda r: r["n_excluded"])
        excluded = f"{_n(n_excluded, 0)} of {_n(median_of(runs, lambda r: r['n_slices']), 0)}"
        cells = [
            f"{bias}{failed}",
            _n(median_of(runs, lambda r: r["ncc"]), 3),
            _n(median_of(runs, lambda r: r["psnr"]), 2),
            _n(median_of(runs, lambda r: r["ssim"]), 3),
            _n(median_of(runs, lambda r: r["ncc_threshold_mask"]), 3),
            excluded,
            _n(median_of(runs, lambda r: r["wall_s"]), 1),
            _n(median_of(runs, lambda r: r["cpu_s"]), 0),
            _n(median_of(runs, lambda r: r["peak_memory_gb"]), 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def agreement_table(results: dict[str, Any]) -> list[str]:
    modes = list(results["modes"])
    header = ["stack", "slice normal"]
    for bias in modes:
        header += [f"held out ({bias})", f"in-sample ({bias})"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    columns: dict[str, list[float]] = {}
    for run in RUNS:
        cells = [f"run-{run}", results["slice_normals"][str(run)]]
        for bias in modes:
            mode = results["modes"][bias]
            held = median_of(mode["held_out"].get(str(run), []), lambda r: r["held_out"]["median_ncc"])
            inside = median_of(mode["all"], lambda r, run=run: r["in_sample"][str(run)]["median_ncc"])
            for key, value in ((f"held{bias}", held), (f"in{bias}", inside)):
                if value is not None:
                    columns.setdefault(key, []).append(value)
            cells += [_n(held, 3), _n(inside, 3)]
        lines.append("| " + " | ".join(cells) + " |")
    summary = ["median over stacks", ""]
    for bias in modes:
        for key in (f"held{bias}", f"in{bias}"):
            summary.append(_n(statistics.median(columns[key]) if columns.get(key) else None, 3))
    lines.append("| " + " | ".join(summary) + " |")
    return lines


def section(results: dict[str, Any]) -> str:
    info, settings, agreement = results["machine"], results["settings"], results["agreement"]
    dirty = " + uncommitted changes" if info["uncommitted_changes"] else ""
    lines = base.section_heading(
        "Real stacks: sub-01 against MIALSRTK, leave-one-stack-out, N4 (`bench/bench_real.py`)",
        results["quick"],
        f"{settings['iterations']} iterations, {agreement['iterations']} agreement steps",
    )
    # The deepest shell is open-ended: inf in memory, null once written to JSON.
    profile = ", ".join(
        f"{shell['from_mm']:g}"
        + ("+" if shell["to_mm"] is None or shell["to_mm"] == float("inf") else f"-{shell['to_mm']:g}")
        + f" mm: {shell['mean']:.0f}"
        for shell in results["reference_profile"]
    )
    lines += [
        f"Measured {info['date']} at commit {info['commit']}{dirty} on {info['cpu']}, {info['nproc']} cores "
        f"(torch {info['torch']}, {info['torch_threads']} threads, Python {info['python']}); load average "
        f"{info['load_start'][0]:.1f} at start, {results['load_end'][0]:.1f} at end; bench time "
        f"{results['bench_s'] / 60:.0f} min.",
        "",
        f"Data: the six HASTE stacks of sub-01 (1.125 mm in-plane, 3.0 mm slices from the BIDS sidecars, "
        f"manual brain masks). Settings: preset `{results['preset']}` (K = {settings['k_neighbours']}, "
        f"{settings['iterations']} iterations, PSF `{settings['psf_mode']}`, output "
        f"{settings['output_resolution']} mm); `bias_correction` as in each row. "
        f"{base.repeats_phrase(results['repeats'])} per configuration.",
        "",
        "- vs MIALSRTK: the bundled reconstruction (TV super-resolution from runs 6, 3, 1; not a",
        "  ground truth). The six-stack reconstruction is aligned rigidly to it inside the evaluation",
        "  mask, then `metrics.evaluate` (least-squares intensity fit) inside that mask. Evaluation",
        f"  mask: the reference's support (voxels > {SUPPORT_FRACTION:g} x its 99th percentile, holes",
        f"  filled) eroded by {EVALUATION_EROSION_MM:g} mm. MIALSRTK's masked output fades to zero near",
        "  the edge of its support, where the brain is bright CSF and cortex: its mean intensity by",
        f"  depth inside the support is {profile}. The column 'NCC, thresholded mask' uses the",
        f"  previous benchmark's mask (reference > {base.REAL_MASK_FRACTION:g} x its 99th percentile),",
        "  which keeps most of that fading edge.",
        "- Agreement (`agreement.stack_agreement`): the stack's slices are registered to the",
        "  reconstruction's Gaussians (stack-level rigid registration to their rendering, then",
        f"  per-slice rigid motion + intensity scale, {agreement['iterations']} Adam steps, Gaussians",
        f"  frozen, PSF `{agreement['psf_mode']}`); the number is the median over the stack's slices",
        "  of the NCC between observed and predicted pixels inside the stack's mask. Held out: the",
        "  reconstruction from the other five stacks; in-sample: the six-stack reconstruction, which",
        "  fitted that stack (a ceiling). With N4 the checked stack is N4-corrected too.",
        "- Time: wall clock of `reconstruct()` in a fresh process (N4 included when on); CPU: its user +",
        "  system seconds; peak memory: max RSS of that process.",
        "- Montages (seed 0) in `bench/output/real_stacks/`: `montage_<bias>.png` aligned to and cut",
        "  like the reference (`montage_reference.png`), `montage_<bias>_native.png` on its own grid.",
        "",
        "Six stacks against MIALSRTK:",
        "",
        *whole_table(results),
        "",
        "Agreement of each stack (median slice NCC):",
        "",
        *agreement_table(results),
        "",
    ]
    held_times = [
        run["wall_s"]
        for mode in results["modes"].values()
        for runs in mode["held_out"].values()
        for run in runs
        if run["returncode"] == 0
    ]
    if held_times:
        lines += [f"Five-stack reconstructions: median {statistics.median(held_times):.1f} s wall.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def parse_choice(text: str, known: list[str], what: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in known]
    if unknown or not chosen:
        raise SystemExit(f"unknown or no {what}: {text!r} (known: {', '.join(known)})")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bias", default=",".join(BIAS_MODES), help="comma-separated, of: none, n4")
    parser.add_argument(
        "--held-out", default=",".join(map(str, RUNS)), help="runs to leave out in turn (1-6), or none"
    )
    base.add_run_arguments(
        parser,
        DEFAULT_SECTION,
        f"{base.QUICK_ITERATIONS} iterations, {QUICK_AGREEMENT_ITERATIONS} agreement steps",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    modes = parse_choice(args.bias, list(BIAS_MODES), "bias correction")
    held_out = (
        []
        if args.held_out == "none"
        else [int(r) for r in parse_choice(args.held_out, list(map(str, RUNS)), "runs")]
    )
    write = args.write or (base.OUTPUT / "benchmarks_real.md" if args.quick else DEFAULT_SECTION)

    started = time.perf_counter()
    info = base.machine(os.getloadavg())
    bench = Bench(args)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    write_montage(
        bench.reference, OUTPUT / "montage_reference.png", mask=bench.mask, title="MIALSRTK reference"
    )
    results_modes: dict[str, Any] = {}
    for bias in modes:
        record: dict[str, Any] = {"all": [], "held_out": {}}
        for seed in range(args.repeats):
            record["all"].append(bench.run(bias, None, seed))
            for run in held_out:
                record["held_out"].setdefault(str(run), []).append(bench.run(bias, run, seed))
        results_modes[bias] = record
    results = {
        **base.results_header(
            info, started, args, preset(args.preset).updated(**bench.base_settings).as_dict()
        ),
        "agreement": asdict(bench.agreement),
        "evaluation_erosion_mm": EVALUATION_EROSION_MM,
        "reference_profile": bench.profile,
        "slice_normals": {str(run): slice_normal(run) for run in RUNS},
        "modes": results_modes,
    }
    write_json(results, RESULTS)
    text = section(results)
    base.write_text_atomically(write, text)
    print("\n" + text)
    print(f"wrote {write} and {RESULTS}")


if __name__ == "__main__":
    main()
