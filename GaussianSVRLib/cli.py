"""The command line: gaussiansvr reconstruct | simulate | evaluate | demo.

Flag names follow NeSVoR where it has one (--input-stacks, --stack-masks, --thicknesses,
--output-volume, --output-resolution, --n-iter is spelled --iterations here as the issue asks).
Expected mistakes (InputError) print one line and exit with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

from .errors import InputError
from .io.progress import Emitter
from .settings import PRESETS, Settings, preset

EXIT_INPUT_ERROR = 2
EXIT_CANCELLED = 130

log = logging.getLogger("gaussiansvr")


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {text}")
    return value


def add_reconstruct(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reconstruct", help="reconstruct a volume from stacks of slices")
    p.add_argument("--input-stacks", nargs="+", required=True, metavar="S", help="stacks (NIfTI/NRRD)")
    p.add_argument(
        "--stack-masks",
        nargs="+",
        metavar="M",
        help="one brain mask per stack, 'none' for a stack without (the given masks are propagated to it)",
    )
    p.add_argument(
        "--thicknesses",
        nargs="+",
        type=positive_float,
        metavar="T",
        help="slice thickness (mm) per stack, or one for all; default: BIDS sidecar, else spacing",
    )
    p.add_argument("--output-volume", required=True, metavar="V", help="output volume (.nii.gz, .nrrd, ...)")
    p.add_argument(
        "--output-resolution",
        type=positive_float,
        default=None,
        metavar="R",
        help="isotropic output voxel size in mm (default 0.8)",
    )
    p.add_argument("--output-gaussians", metavar="G", help="Gaussians: writes G.npz and G.vtp (ellipsoids)")
    p.add_argument("--output-json", metavar="J", help="JSON report: settings, timings, per-slice QC")
    p.add_argument(
        "--output-qc", metavar="PNG", help="quality-control image: slice weights and the rejected slices"
    )
    p.add_argument("--preview-dir", metavar="D", help="folder for live previews (checkpoints)")
    p.add_argument(
        "--init-gaussians",
        metavar="G",
        default=None,
        help="continue from an earlier run's Gaussians and slice transforms: its --output-gaussians "
        "G.npz or a preview_gaussians.npz (the file's Gaussian count replaces --n-gaussians)",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="standard", help="settings preset")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--n-gaussians",
        type=non_negative_int,
        default=None,
        help="number of Gaussians; 0 (default) = automatic, 35 per ml of brain",
    )
    p.add_argument("--k-neighbours", type=positive_int, default=None)
    p.add_argument("--iterations", type=positive_int, default=None)
    p.add_argument("--batch-pixels", type=positive_int, default=None)
    p.add_argument("--scale-regularization", type=float, default=None)
    p.add_argument("--psf", dest="psf_mode", choices=("exact", "normalized", "none"), default=None)
    p.add_argument("--no-coarse-to-fine", dest="coarse_to_fine", action="store_false", default=None)
    p.add_argument("--no-prealign", dest="prealign", action="store_false", default=None)
    p.add_argument(
        "--no-pose-search",
        dest="pose_search",
        action="store_false",
        default=None,
        help="do not re-try the pose of badly fitting slices from a grid of rotations",
    )
    p.add_argument(
        "--bias-correction",
        choices=("none", "n4"),
        default=None,
        help="n4 (default): SimpleITK N4 bias field correction of each stack inside its mask; none: off",
    )
    p.add_argument("--reference-stack", type=int, default=None, help="index of the reference stack (0-based)")
    p.add_argument(
        "--mask-dilation",
        dest="mask_dilation_mm",
        type=non_negative_float,
        default=None,
        metavar="MM",
        help="grow every mask by this margin (mm), for masks that cut a little brain (default 0)",
    )
    p.add_argument(
        "--checkpoint-interval",
        dest="checkpoint_interval_s",
        type=positive_float,
        default=None,
        help="seconds between previews",
    )
    p.add_argument(
        "--progress",
        choices=("bar", "json", "none"),
        default="bar",
        help="bar: tqdm on a terminal; json: one protocol message per line on stdout",
    )
    p.add_argument("--stop-file", metavar="F", help="stop (cancel) when this file appears")
    p.set_defaults(run=run_reconstruct)


def add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="simulate motion-corrupted stacks from a high-resolution volume")
    p.add_argument("--volume", required=True, help="ground-truth volume")
    p.add_argument("--mask", required=True, help="its brain mask")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--n-stacks", type=positive_int, default=4)
    p.add_argument("--in-plane", type=positive_float, default=0.8)
    p.add_argument("--thickness", type=positive_float, default=3.0)
    p.add_argument("--spacing", type=positive_float, default=None)
    p.add_argument("--max-rotation", type=float, default=5.0, help="degrees")
    p.add_argument("--max-translation", type=float, default=3.0, help="mm")
    p.add_argument("--noise", type=float, default=0.02)
    p.add_argument("--dropout", type=float, default=0.0, help="fraction of slices with signal drop-out")
    p.add_argument("--oblique", action="store_true")
    p.add_argument("--stack-misalignment-deg", type=float, default=0.0, help="rotation of each stack")
    p.add_argument("--stack-misalignment-mm", type=float, default=0.0, help="translation of each stack")
    p.add_argument("--replaced", type=float, default=0.0, help="fraction of slices showing other anatomy")
    p.add_argument("--blurred", type=float, default=0.0, help="fraction of slices with in-plane motion blur")
    p.add_argument(
        "--stack-intensity-scale", type=float, default=1.0, help="intensity factor of the last stack"
    )
    p.add_argument("--bias-field", type=float, default=0.0, help="amplitude of a bias field per stack")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_simulate)


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="PSNR/SSIM/NCC/NRMSE of a reconstruction against a reference")
    p.add_argument("--volume", required=True, help="reconstruction")
    p.add_argument("--reference", required=True)
    p.add_argument("--mask", required=True)
    p.add_argument("--no-align", dest="align", action="store_false")
    p.add_argument("--output-json")
    p.set_defaults(run=run_evaluate)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="simulate-and-reconstruct on the bundled atlas, and the real stacks")
    p.add_argument("--output-dir", default="demo_output")
    p.add_argument(
        "--data-dir", default=None, help="the bundled data folder (default: the repository's data/)"
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="standard")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(run=run_demo)


class OneLineErrors(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit code 2), like every other input error,
    plus a protocol "error" message on stdout when --progress json was asked for."""

    def error(self, message: str) -> NoReturn:
        argv = sys.argv[1:]
        if "--progress=json" in argv or any(
            a == "--progress" and b == "json" for a, b in zip(argv, argv[1:], strict=False)
        ):
            Emitter()("error", message=message)
        self.exit(EXIT_INPUT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    top = OneLineErrors(prog="gaussiansvr", description=__doc__.splitlines()[0])
    top.add_argument("-v", "--verbose", action="store_true", help="log details on stderr")
    sub = top.add_subparsers(dest="command", required=True)
    for add in (add_reconstruct, add_simulate, add_evaluate, add_demo):
        add(sub)
    return top


def settings_from(args: argparse.Namespace) -> Settings:
    """The preset, overridden by every flag that was given."""
    changes = {
        name: getattr(args, name)
        for name in (
            "device",
            "seed",
            "n_gaussians",
            "k_neighbours",
            "iterations",
            "batch_pixels",
            "scale_regularization",
            "psf_mode",
            "coarse_to_fine",
            "prealign",
            "pose_search",
            "reference_stack",
            "checkpoint_interval_s",
            "output_resolution",
            "init_gaussians",
            "bias_correction",
            "mask_dilation_mm",
        )
        if getattr(args, name, None) is not None
    }
    return preset(args.preset).updated(**changes)


class StopSignal:
    """Cancel requests: SIGINT/SIGTERM, a "cancel" line on stdin (json mode), or a stop file."""

    def __init__(self, stop_file: str | None, watch_stdin: bool) -> None:
        self.event = threading.Event()
        self.stop_file = Path(stop_file) if stop_file else None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: self.event.set())
        if watch_stdin:
            threading.Thread(target=self.read_stdin, daemon=True).start()

    def read_stdin(self) -> None:
        for line in sys.stdin:
            if line.strip() == "cancel":
                self.event.set()
                return

    def __call__(self) -> bool:
        if self.stop_file is not None and self.stop_file.exists():
            self.event.set()
        return self.event.is_set()


class BarEvents:
    """Protocol events shown as a tqdm bar on stderr (silent when stderr is not a terminal)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, kind: str, **fields: Any) -> None:
        from tqdm import tqdm

        if kind == "started":
            log.info(
                "%s on %s: %d stacks, %d slices, %d pixels, %d Gaussians",
                "reconstructing",
                fields["device"],
                fields["n_stacks"],
                fields["n_slices"],
                fields["n_pixels"],
                fields["n_gaussians"],
            )
            self.bar = tqdm(total=fields["total"], unit="it", disable=None, file=sys.stderr)
        elif kind == "progress" and self.bar is not None:
            self.bar.set_postfix(loss=f"{fields['loss']:.4f}", stage=fields["stage"], refresh=False)
            self.bar.update(fields["iter"] - self.bar.n)
        elif kind == "checkpoint":
            log.info("preview written: %s", fields["volume"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_reconstruct(args: argparse.Namespace) -> int:
    from .pipeline import Outputs, reconstruct

    settings = settings_from(args)
    emitter = Emitter() if args.progress == "json" else None
    bar = BarEvents() if args.progress == "bar" else None
    events = emitter or bar
    stop = StopSignal(args.stop_file, watch_stdin=args.progress == "json")
    outputs = Outputs(
        args.output_volume, args.output_gaussians, args.output_json, args.preview_dir, qc=args.output_qc
    )
    try:
        result = reconstruct(
            args.input_stacks, args.stack_masks, args.thicknesses, settings, outputs, events, stop
        )
    finally:
        if bar is not None:
            bar.close()
    if emitter is not None:
        emitter(
            "done", cancelled=result.cancelled, elapsed_s=result.report["timings"]["total_s"], **result.paths
        )
    if result.cancelled:
        print("cancelled: no output written; the last preview is kept", file=sys.stderr)
        return EXIT_CANCELLED
    if args.progress != "json":
        from .export.qc import summary_table

        print(summary_table(result.report))
        for key, path in result.paths.items():
            if path:
                print(f"{key}: {path}")
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    from .io.stacks import read_image
    from .sim.simulate import simulate_stacks

    result = simulate_stacks(
        read_image(args.volume, "volume"),
        read_image(args.mask, "mask"),
        args.output_dir,
        n_stacks=args.n_stacks,
        in_plane=args.in_plane,
        thickness=args.thickness,
        spacing=args.spacing,
        max_rotation_deg=args.max_rotation,
        max_translation_mm=args.max_translation,
        noise=args.noise,
        dropout=args.dropout,
        oblique=args.oblique,
        stack_misalignment_deg=args.stack_misalignment_deg,
        stack_misalignment_mm=args.stack_misalignment_mm,
        replaced=args.replaced,
        blurred=args.blurred,
        stack_intensity_scale=args.stack_intensity_scale,
        bias_field=args.bias_field,
        seed=args.seed,
    )
    for path in result.stack_paths:
        print(f"stack: {path}")
    print(f"transforms: {result.transforms_path}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .io.outputs import write_json
    from .io.stacks import read_image
    from .qa.metrics import evaluate

    metrics = evaluate(
        read_image(args.volume, "volume"),
        read_image(args.reference, "reference"),
        read_image(args.mask, "mask"),
        align=args.align,
    )
    scalar = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
    print(json.dumps(scalar, indent=2))
    if args.output_json:
        write_json(metrics, args.output_json)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(args.output_dir, args.data_dir, args.preset, args.device)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    json_mode = getattr(args, "progress", None) == "json"
    try:
        return args.run(args)
    except InputError as error:
        if json_mode:
            Emitter()("error", message=str(error))
        print(f"gaussiansvr: error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except MemoryError:
        message = (
            "out of memory: use fewer Gaussians, a smaller --batch-pixels or a coarser --output-resolution"
        )
        if json_mode:
            Emitter()("error", message=message)
        print(f"gaussiansvr: error: {message}", file=sys.stderr)
        return EXIT_INPUT_ERROR
