"""Speed of a standard run (issue 12): where the time goes, by stage and within the optimizer, for
this tree and a baseline commit measured in the same run.

    python bench/bench_speed.py [--baseline 45d0b1e] [--repeats 3] [--quick] [--device cuda]
                                [--write docs/...]

The case is bench_reconstruction's ``target`` (GA28 atlas, 4 stacks, 0.8 mm pixels, 3 mm slices,
±5°/±3 mm). Each run is the command line ``gaussiansvr reconstruct`` in a fresh process, with the
tree under test first on PYTHONPATH (the baseline is checked out as a git worktree under
bench/output/speed/); the versions alternate within each repeat, so a ratio sees the same load.
Every version first runs once with 2 iterations so that numba's compile cache is warm. Stage and
optimizer times come from each run's report (``timings``); wall: the whole process; peak memory:
its max RSS; first preview: from the "started" to the first "checkpoint" message on the progress
protocol (``--progress json``), previews on as in the Slicer module. Writes
docs/benchmarks_speed.md (or --write). ``--device`` passes the device to every run (bench/gpu_check.sh
measures CUDA so); the section names it (the GPU's model for CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_reconstruction as base
import SimpleITK as sitk

from GaussianSVRLib.devices import DEVICES

ROOT = base.ROOT
OUTPUT = base.OUTPUT / "speed"
SECTION = ROOT / "docs" / "benchmarks_speed.md"
STAGES = ("read_s", "initialize_s", "optimize_s", "refit_s", "render_s", "total_s")


def tree_of(revision: str | None) -> Path:
    """The source tree of revision: this checkout for None, else a worktree (made once)."""
    if revision is None:
        return ROOT
    commit = subprocess.run(
        ["git", "rev-parse", "--short", revision], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = OUTPUT / f"tree-{commit}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True)
    return tree


def device_name(device: str) -> str:
    """What the runs computed on: "cpu", or the GPU's model for CUDA (auto: what torch sees)."""
    import torch

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return f"cuda ({torch.cuda.get_device_name(0)})" if cuda else "cpu"


def slug(name: str) -> str:
    return name.replace(" ", "-")


def run(
    tree: Path, data: base.CaseData, folder: Path, seed: int, iterations: int | None, extra: tuple = ()
) -> dict:
    """One reconstruction by the command line of tree, with previews as the Slicer module asks for
    them: wall seconds, peak RSS (GB), the report and the seconds from "started" to the first
    "checkpoint" message (None without one), as the progress protocol's reader sees them."""
    folder.mkdir(parents=True, exist_ok=True)
    report = folder / "report.json"
    command = [sys.executable, "-m", "GaussianSVRLib", "reconstruct", "--input-stacks", *data.stacks,
               "--stack-masks", *data.masks, "--output-volume", str(folder / "volume.nii.gz"),
               "--output-json", str(report), "--preview-dir", str(folder / "previews"),
               "--seed", str(seed), "--progress", "json"]  # fmt: skip
    if iterations is not None:
        command += ["--iterations", str(iterations)]
    command += list(extra)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    seen: dict[str, float] = {}
    started = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        process = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        for line in process.stdout:
            kind = json.loads(line).get("type") if line.startswith("{") else None
            seen.setdefault(kind, time.perf_counter())
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{folder}: " + " | ".join((folder / "log.txt").read_text().splitlines()[-5:]))
    first = seen["checkpoint"] - seen["started"] if {"started", "checkpoint"} <= seen.keys() else None
    return {"wall": wall, "peak_gb": usage.ru_maxrss * 1024 / 1e9, "first_preview": first,
            "report": json.loads(report.read_text())}  # fmt: skip


def measure(name: str, tree: Path, data: base.CaseData, seed: int, extra: tuple = ()) -> dict:
    record = run(tree, data, OUTPUT / slug(name) / f"seed{seed}", seed, None, extra)
    timings = record["report"]["timings"]
    row = {"wall": record["wall"], "peak memory (GB)": record["peak_gb"]}
    if record["first_preview"] is not None:
        row["first preview after started"] = record["first_preview"]
    row.update({stage: timings.get(stage, 0.0) for stage in STAGES})
    row.update({f"opt:{k}": v for k, v in timings.get("optimize_profile_s", {}).items()})
    quality = base.quality(sitk.ReadImage(str(OUTPUT / slug(name) / f"seed{seed}" / "volume.nii.gz")), data)
    row.update({"psnr": quality["psnr"], "ssim": quality["ssim"]})
    print(name, seed, {k: round(v, 2) for k, v in row.items()}, flush=True)
    return row


def medians(rows: list[dict]) -> dict:
    keys = sorted({key for row in rows for key in row})
    return {key: statistics.median(row.get(key, 0.0) for row in rows) for key in keys}


def section(results: dict) -> str:
    info, names = results["machine"], list(results["runs"])
    summary = {name: medians(rows) for name, rows in results["runs"].items()}
    title = "Speed: where a standard run's time goes (issue 12)"
    lines = base.section_heading(title, results["quick"], "one repeat")
    lines += [
        f"Measured {info['date']} at commit {info['commit']}"
        f"{' with uncommitted changes' if info['uncommitted_changes'] else ''} on {info['nproc']} CPUs "
        f"({info['cpu']}), device {results.get('device', 'cpu')}, torch {info['torch']}; load "
        f"{info['load_start'][0]:.2f} at the start and "
        f"{results['load_end'][0]:.2f} at the end; bench {results['bench_s']:.0f} s. Case `target` "
        f"(GA28, 4 stacks, ±5°/±3 mm), preset standard, previews on (`--preview-dir`), "
        f"medians of {results['repeats']} runs "
        f"(seeds 0..{results['repeats'] - 1}); the versions alternate within each repeat. "
        "Seconds; stages and optimizer sections (`opt:`) from the run's report, wall for the whole "
        "process (start-up and imports included). `opt:kernel_forward` and `opt:kernel_backward` (the "
        "fused kernels) are parts of `opt:forward` and `opt:backward`; `opt:pose_search` includes its "
        "own kernel calls and neighbour lists.",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    keys = ["wall", *STAGES, "first preview after started", "peak memory (GB)", "psnr", "ssim"]
    keys += sorted({k for m in summary.values() for k in m if k.startswith("opt:")})
    for key in keys:
        digits = 3 if key == "ssim" else 2
        cells = " | ".join(f"{summary[n].get(key, 0.0):.{digits}f}" for n in names)
        lines.append(f"| {key} | {cells} |")
    if len(names) == 2:
        first, second = (results["runs"][n] for n in names)
        ratios = [a["total_s"] / b["total_s"] for a, b in zip(first, second, strict=True)]
        listed = ", ".join(f"{r:.2f}" for r in ratios)
        lines += ["", f"Ratio of total_s, {names[0]} / {names[1]}, per repeat: {listed} "
                  f"(median {statistics.median(ratios):.2f}x)."]  # fmt: skip
    if results.get("scaling"):
        lines += scaling_table(results["scaling"])
    return "\n".join(lines) + "\n"


#: The scaling part: stacks of the target geometry (auto Gaussians), and Gaussians on its 4 stacks.
SCALING_STACKS = (1, 2, 4, 8)
SCALING_GAUSSIANS = (6000, 12000, 24000, 48000)


def scaling(tree: Path) -> list[dict]:
    """Single runs of this tree: time and memory against pixels (stacks) and Gaussians."""
    rows = []
    runs = [(n, None) for n in SCALING_STACKS] + [(4, g) for g in SCALING_GAUSSIANS]
    for n_stacks, gaussians in runs:
        case = base._simulated(
            f"speed-{n_stacks}-stacks", f"GA28, {n_stacks} stacks", "SB_GA28_operated", n_stacks=n_stacks
        )
        data = base.load_case(case)
        extra = ("--n-gaussians", str(gaussians)) if gaussians else ()
        folder = OUTPUT / "scaling" / f"{n_stacks}-stacks-{gaussians or 'auto'}"
        record = run(tree, data, folder, 0, None, extra)
        report, timings = record["report"], record["report"]["timings"]
        profile = timings.get("optimize_profile_s", {})
        row = {"stacks": n_stacks, "pixels": report["n_pixels"], "gaussians": report["n_gaussians"],
               "total_s": timings["total_s"], "optimize_s": timings["optimize_s"],
               "refit_s": timings.get("refit_s", 0.0),
               "neighbours_s": profile.get("neighbours", 0.0),
               "kernels_s": profile.get("kernel_forward", 0.0) + profile.get("kernel_backward", 0.0),
               "pose_search_s": profile.get("pose_search", 0.0), "peak_gb": record["peak_gb"]}  # fmt: skip
        print(row, flush=True)
        rows.append(row)
    return rows


def scaling_table(rows: list[dict]) -> list[str]:
    keys = list(rows[0])
    lines = ["", "### Scaling (single runs of this tree)", "",
             "Time (s) and peak memory (GB) against the pixels (1 to 8 stacks of the target geometry, "
             "automatic Gaussians) and the Gaussians (4 stacks). A step's cost is set by the batch "
             "(32k pixels x K = 16), not by P or N: what grows with P is the neighbour refresh (every "
             "pixel, every 20 steps), with N the initialization, Adam and the covariances; refit_s "
             "counts the refitting rounds of a run that left a stack agreeing poorly.", "",
             "| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys)]  # fmt: skip
    for row in rows:
        cells = [f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", help="a commit to measure beside this tree")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--write", type=Path, default=SECTION)
    parser.add_argument("--scaling", action="store_true", help="also the scaling table (8 single runs)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="the runs' --device")
    args = parser.parse_args()
    extra = ("--device", args.device)
    if args.quick:
        args.repeats = 1
    started, info = time.perf_counter(), base.machine(os.getloadavg())
    data = base.load_case(base.CASES["target"])
    trees = {"this tree": ROOT}
    if args.baseline:
        trees = {f"baseline {args.baseline}": tree_of(args.baseline), **trees}
    for name, tree in trees.items():
        run(tree, data, OUTPUT / slug(name) / "warm-up", 0, 2, extra)
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for seed in range(args.repeats):
        for name, tree in trees.items():
            runs[name].append(measure(name, tree, data, seed, extra))
    results = {"machine": info, "quick": args.quick, "repeats": args.repeats, "runs": runs,
               "device": device_name(args.device)}  # fmt: skip
    if args.scaling:
        results["scaling"] = scaling(ROOT)
    results.update(load_end=os.getloadavg(), bench_s=time.perf_counter() - started)
    base.write_json(results, OUTPUT / "speed.json")
    text = section(results)
    print(text)
    base.write_text_atomically(args.write, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
