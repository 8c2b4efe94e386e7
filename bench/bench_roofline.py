"""The training kernel against the machine: ns per pixel-Gaussian pair per core beside a roofline estimate.

The estimate of a pair's cost is the larger of its arithmetic over the core's float64 peak and its
memory traffic over the core's memory bandwidth, both measured here, not taken from a data sheet:
the peak as torch's float64 matrix product on one thread (BLAS reaches close to what the FMA units
give), the bandwidth as a one-thread sum over an array far larger than the caches.

The arithmetic per pair is counted from the source of model/kernels.py (``FLOPS``; an add, a
multiply or a compare counts 1, a fused multiply-add 2, and exp, sqrt and each divide are listed
apart and counted as ``SPECIAL_FLOPS`` each, about what a vectorized libm spends). The traffic per
pair is what cannot stay in the caches: the neighbour index (int64) read by the forward and the
backward, and the pair weight (float64) the forward writes and the backward reads. The Gaussians'
parameters (11 floats each) and the per-thread gradient buffers (11 doubles each) are gathered from
L2: 6k Gaussians hold 0.8 MB.

The kernel runs as the optimizer runs it (kernels.evaluate_slices_fused): B pixels of thick slices
in random order, M slices with their motion and PSF, K nearest Gaussians, mode "exact", the
Gaussians and the slices' motion requiring grad. Numba runs on 1 thread (the per-core figure) and on
every core the process may use (the scaling). Medians of ``--repeats`` runs.

Usage: python bench/bench_roofline.py [--quick] [--repeats 5] [--write docs/benchmarks_roofline.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_forward import PSF_SIGMA, cpu_name, ellipsoid_points, load_average, make_gaussians

from GaussianSVRLib.model import kernels
from GaussianSVRLib.model.psf import to_sym6

#: Arithmetic per pair counted from kernels.py, mode "exact", with a PSF: (ordinary flops, specials).
#: Forward: d (3), S = Sigma + PSF (6), adjugate (18), det and its clamp (6), the quadratic form (18),
#: -0.5 q / det (1 + div), exp, sqrt(det Sigma / det) (1 + div + sqrt), the two sums (3).
#: Backward: d, S, adjugate, det (33 again), 1 / det (div), adj d (15), q (5), the weight's gradient
#: (3), d log w / d delta (7), the squared offsets (9), hq and hd (10), d log w / d S (63), the
#: per-pixel sums (9), the Gaussian accumulators (11 + 3 + div + 2).
FLOPS = {"forward": (56, 4), "backward": (170, 2)}
#: What an exp, a sqrt or a divide counts as (about a vectorized libm's cost in multiply-adds).
SPECIAL_FLOPS = 10
#: Bytes per pair that stream from memory: forward reads the index, writes the weight; the
#: backward reads both.
BYTES = {"forward": 8 + 8, "backward": 8 + 8}

CONFIG = {"B": 32_768, "K": 24, "N": 6_000, "M": 200}
QUICK_CONFIG = {"B": 4_096, "K": 24, "N": 6_000, "M": 50}


def float64_peak(seconds: float = 1.0) -> float:
    """FLOP/s of a float64 matrix product (1024^2) on one thread: the core's achievable peak."""
    a = torch.randn(1024, 1024, dtype=torch.float64)
    b = torch.randn(1024, 1024, dtype=torch.float64)
    torch.mm(a, b)
    runs, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b)
        runs.append(time.perf_counter() - t0)
    return 2 * 1024**3 / min(runs)


def bandwidth(seconds: float = 1.0) -> float:
    """Bytes/s of a one-thread sum over 512 MB (far beyond the caches)."""
    x = torch.ones(64 * 1024 * 1024, dtype=torch.float64)
    x.sum()
    runs, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        x.sum()
        runs.append(time.perf_counter() - t0)
    return x.numel() * 8 / statistics.median(runs)


def make_slices(config: dict, gaussians: dict, rng: np.random.Generator) -> dict:
    """B pixels on M thick slices (four orientations, small motions) with their K nearest Gaussians."""
    b, m = config["B"], config["M"]
    positions = ellipsoid_points(b, rng)
    slice_id = rng.integers(0, m, size=b)
    orientation = Rotation.from_rotvec(
        np.array([[0, 0, 0], [np.pi / 2, 0, 0], [0, np.pi / 2, 0], [0.4, 0.3, 0.2]])[np.arange(m) % 4]
    ).as_matrix()
    psf = (orientation * PSF_SIGMA[None, None, :] ** 2) @ orientation.transpose(0, 2, 1)
    rotations = Rotation.from_rotvec(rng.normal(scale=np.radians(3), size=(m, 3))).as_matrix()
    offsets = rng.normal(scale=1.0, size=(m, 3))
    moved = np.einsum("bij,bj->bi", rotations[slice_id], positions) + offsets[slice_id]
    neighbours = cKDTree(gaussians["means"].numpy()).query(moved, config["K"])[1]
    as_float = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return {
        "positions": as_float(positions),
        "slice_id": torch.from_numpy(slice_id.astype(np.int64)),
        "rotations": as_float(rotations),
        "offsets": as_float(offsets),
        "neighbours": torch.from_numpy(neighbours.astype(np.int64)),
        "psf6": to_sym6(as_float(psf)),
    }


def step(gaussians: dict, slices: dict, upstream: torch.Tensor) -> tuple[float, float]:
    """Seconds of one forward and one backward of the training kernel."""
    leaf = {name: t.clone().requires_grad_() for name, t in gaussians.items()}
    motion = {name: slices[name].clone().requires_grad_() for name in ("rotations", "offsets", "psf6")}
    start = time.perf_counter()
    values = kernels.evaluate_slices_fused(
        slices["positions"], slices["slice_id"], motion["rotations"], motion["offsets"], slices["neighbours"],
        leaf["means"], leaf["cov6"], leaf["cov_det"], leaf["intensities"], motion["psf6"], "exact",
    )  # fmt: skip
    middle = time.perf_counter()
    (values * upstream).sum().backward()
    return middle - start, time.perf_counter() - middle


def time_kernel(gaussians: dict, slices: dict, threads: int, repeats: int, seed: int) -> dict[str, float]:
    """Median seconds of the forward and the backward on ``threads`` numba threads."""
    import numba

    upstream = torch.tensor(np.random.default_rng(seed).normal(size=len(slices["positions"])))
    upstream = upstream.float()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    try:
        step(gaussians, slices, upstream)
        runs = [step(gaussians, slices, upstream) for _ in range(repeats)]
    finally:
        torch.set_num_threads(previous)
        kernels.use_torch_threads()
    return {part: statistics.median(r[i] for r in runs) for i, part in enumerate(("forward", "backward"))}


def estimate_ns(part: str, peak: float, memory: float) -> tuple[float, float, float]:
    """(compute ns, memory ns, estimate ns) per pair on one core."""
    ordinary, special = FLOPS[part]
    compute = 1e9 * (ordinary + SPECIAL_FLOPS * special) / peak
    traffic = 1e9 * BYTES[part] / memory
    return compute, traffic, max(compute, traffic)


def markdown(rows: list[dict], context: dict) -> str:
    c = context["config"]
    lines = [
        "# The training kernel against the machine: a roofline (issue 12)",
        "",
        f"Measured {context['date']} by `bench/bench_roofline.py` on {context['cpu']} ({context['cores']} "
        f"cores, shared), torch {torch.__version__}, numba {context['numba']}; load average "
        f"{context['load_before']} before, {context['load_after']} after. Medians of {context['repeats']} "
        f"runs. Kernel as the optimizer runs it: B = {c['B']:,} pixels in random order on M = {c['M']} "
        f"thick slices, K = {c['K']}, N = {c['N']:,} Gaussians, mode exact, float64 arithmetic per pair.",
        "",
        f"Machine, measured on one thread: float64 peak {context['peak'] / 1e9:.1f} GFLOP/s (matrix "
        f"product), memory bandwidth {context['bandwidth'] / 1e9:.1f} GB/s (a sum over 512 MB). "
        f"Arithmetic per pair counted from the kernel's source (exp, sqrt and divides counted "
        f"{SPECIAL_FLOPS} flops each); memory per pair: the streamed index and pair weight.",
        "",
        "| part | flops/pair | bytes/pair | estimate ns (compute / memory) | measured ns, 1 thread "
        f"| x estimate | measured ns per core, {context['threads']} threads | scaling |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['part']} | {r['flops']} | {r['bytes']} | {r['estimate']:.1f} ({r['compute']:.1f} / "
            f"{r['memory']:.1f}) | {r['single']:.1f} | {r['single'] / r['estimate']:.1f}x | "
            f"{r['multi']:.1f} | {r['single'] / r['multi']:.2f} |"
        )
    total = {key: sum(r[key] for r in rows) for key in ("estimate", "single", "multi")}
    lines += [
        "",
        f"Forward + backward: estimate {total['estimate']:.1f} ns per pair per core, measured "
        f"{total['single']:.1f} ns on one thread ({total['single'] / total['estimate']:.1f}x the estimate) "
        f"and {total['multi']:.1f} ns per core on {context['threads']} threads. 'measured ns per core' "
        "is wall time x threads / pairs; 'scaling' is the one-thread time over it (1 = perfect).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small batch, 3 runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", type=Path, help="write the markdown section to this file")
    args = parser.parse_args()
    if not kernels.available():
        print("numba is not installed: there is no fused kernel to measure", file=sys.stderr)
        return 1
    import numba

    repeats = 3 if args.quick else args.repeats
    config = QUICK_CONFIG if args.quick else CONFIG
    threads = max(1, min(os.cpu_count() or 1, numba.config.NUMBA_NUM_THREADS))
    context = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "numba": numba.__version__,
        "repeats": repeats,
        "config": config,
        "threads": threads,
        "load_before": load_average(),
    }
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    context["peak"], context["bandwidth"] = float64_peak(), bandwidth()
    torch.set_num_threads(previous)
    rng = np.random.default_rng(0)
    gaussians = make_gaussians(config["N"], rng)
    slices = make_slices(config, gaussians, rng)
    pairs = config["B"] * config["K"]
    single = time_kernel(gaussians, slices, 1, repeats, 1)
    multi = time_kernel(gaussians, slices, threads, repeats, 2)
    rows = []
    for part in ("forward", "backward"):
        compute, memory, estimate = estimate_ns(part, context["peak"], context["bandwidth"])
        ordinary, special = FLOPS[part]
        rows.append(
            {
                "part": part,
                "flops": f"{ordinary} + {special} special",
                "bytes": BYTES[part],
                "compute": compute,
                "memory": memory,
                "estimate": estimate,
                "single": 1e9 * single[part] / pairs,
                "multi": 1e9 * multi[part] * threads / pairs,
            }
        )
    context["load_after"] = load_average()
    text = markdown(rows, context)
    print(text)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.write.with_name(f".{args.write.name}.tmp{os.getpid()}")
        temporary.write_text(text + "\n")
        os.replace(temporary, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
