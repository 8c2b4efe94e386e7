"""The command line: gaussiansvr reconstruct | simulate | evaluate | demo.

Flag names follow NeSVoR where it has one (--input-stacks, --stack-masks, --thicknesses,
--output-volume, --output-resolution); the reconstruction's own settings come from settings.py.
Expected problems (InputError) print one line and exit with code 2, no traceback; a cancelled run
(SIGINT, SIGTERM, a stop file, "cancel" or the end of a piped stdin, a closed stdout) exits with 130
and writes no final output; anything else is a bug: its traceback, exit code 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import stat
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, NoReturn, get_args

from .errors import (
    EXIT_CANCELLED,
    EXIT_CRASH,
    EXIT_INPUT_ERROR,
    EXIT_NOT_ALIGNED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    InputError,
)
from .io.progress import Emitter
from .settings import PRESETS, MotionModel, PresetName, Settings, choices, options, preset, setting_type

log = logging.getLogger("gaussiansvr")


def number(kind: type) -> Any:
    """An argparse type: the text as an int or a float (ranges are judged by settings.check)."""

    def parse(text: str) -> int | float:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not {'an integer' if kind is int else 'a number'}: {text!r}"
            ) from None

    parse.__name__ = kind.__name__
    return parse


def positive_float(text: str) -> float:
    value = number(float)(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def positive_int(text: str) -> int:
    value = number(int)(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_settings(parser: argparse.ArgumentParser) -> None:
    """One flag per setting that has one (settings.py): its type, choices and help come from there.

    Every default is None, so that only the flags given override the preset.
    """
    for name, spec in options().items():
        if spec.flag is None:
            continue
        kind = setting_type(name)
        unit = f" ({spec.unit})" if spec.unit else ""
        default = getattr(Settings(), name)
        shown = f"; default {default}" if default is not None and kind is not bool else ""
        if kind is bool:
            parser.add_argument(spec.flag, dest=name, action="store_false", default=None, help=spec.help)
        elif choices(name):
            parser.add_argument(
                spec.flag, dest=name, choices=choices(name), default=None, help=spec.help + shown
            )
        else:
            parser.add_argument(
                spec.flag,
                dest=name,
                type=str if kind is str else number(kind),
                default=None,
                metavar=spec.metavar,
                help=spec.help + unit + shown,
            )


def add_reconstruct(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reconstruct", help="reconstruct a volume from stacks of slices")
    p.add_argument("--input-stacks", nargs="+", required=True, metavar="S", help="stacks (NIfTI/NRRD)")
    p.add_argument(
        "--stack-masks",
        nargs="+",
        metavar="M",
        help="one brain mask per stack, 'none' for a stack without (the given masks are propagated to it)",
    )
    box = p.add_mutually_exclusive_group()
    box.add_argument(
        "--roi",
        nargs=6,
        type=number(float),
        metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
        help="a box around the brain by two opposite corners (LPS mm): the mask of every stack without one",
    )
    box.add_argument(
        "--roi-from", metavar="ROI", help="the same box from a 3D Slicer markups ROI file (.mrk.json)"
    )
    p.add_argument(
        "--thicknesses",
        nargs="+",
        type=positive_float,
        metavar="T",
        help="slice thickness (mm) per stack, or one for all; default: BIDS sidecar, else spacing",
    )
    p.add_argument("--output-volume", required=True, metavar="V", help="output volume (.nii.gz, .nrrd, ...)")
    p.add_argument("--output-gaussians", metavar="G", help="Gaussians: writes G.npz and G.vtp (ellipsoids)")
    p.add_argument("--output-json", metavar="J", help="JSON report: settings, timings, per-slice QC")
    p.add_argument(
        "--output-qc", metavar="PNG", help="quality-control image: slice weights and the rejected slices"
    )
    p.add_argument(
        "--output-transform",
        metavar="T",
        help="with --output-space atlas: the atlas-to-scanner transform (.tfm; in Slicer, stacks under it "
        "line up with the volume); default: beside the volume, V_standard_space.tfm",
    )
    p.add_argument(
        "--output-masks",
        metavar="DIR",
        help="write the brain mask each stack was reconstructed with (given, propagated or from the box) "
        "to DIR, on the stack's grid: DIR/<stack name>_mask.nii.gz",
    )
    p.add_argument("--preview-dir", metavar="D", help="folder for live previews (checkpoints)")
    p.add_argument("--preset", choices=get_args(PresetName), default="standard", help="settings preset")
    p.add_argument(
        "--settings",
        metavar="J",
        help="start from the settings in this JSON file (a run's report or cohort sidecar, or a plain "
        "object of settings) instead of a preset; the flags given override them",
    )
    add_settings(p)
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
    p.add_argument(
        "--surroundings",
        action="store_true",
        help="put a synthetic skull, fluid and uterus around a skull-stripped brain (outside its mask)",
    )
    p.add_argument(
        "--motion",
        choices=get_args(MotionModel),
        default="independent",
        help="slice motion: independent per slice, or a trajectory in acquisition time (smooth, with jumps)",
    )
    p.add_argument("--jumps", type=int, default=0, help="sudden jumps per stack of a --motion trajectory")
    p.add_argument("--slice-order", choices=choices("slice_order"), default="interleaved")
    p.add_argument("--interleave", type=positive_int, default=2)
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


def add_batch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="reconstruct every subject (and session) of a BIDS dataset, on Dask")
    p.add_argument("bids_dir", metavar="BIDS_DIR", type=Path, help="the BIDS dataset")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="the derivatives folder to write")
    p.add_argument("--participant-label", nargs="+", metavar="L", help="only these subjects (01 or sub-01)")
    p.add_argument("--session-label", nargs="+", metavar="S", help="only these sessions (01 or ses-01)")
    p.add_argument(
        "--masks-dir", type=Path, metavar="D",
        help="brain masks laid out like the dataset: sub-01/anat/sub-01_run-1_desc-brain_mask.nii.gz",
    )  # fmt: skip
    p.add_argument(
        "--scheduler", metavar="ADDRESS", help="a running Dask scheduler (default: a local cluster)"
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="workers of the local cluster (default: by CPUs and memory)",
    )
    p.add_argument("--sequential", action="store_true", help="no Dask: one subject after the other")
    p.add_argument("--preset", choices=get_args(PresetName), default="standard", help="settings preset")
    p.add_argument(
        "--settings", metavar="J", help="start from the settings in this JSON file (see reconstruct)"
    )
    add_settings(p)
    p.set_defaults(run=run_batch)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="simulate-and-reconstruct on the bundled atlas, and the real stacks")
    p.add_argument("--output-dir", default="demo_output")
    p.add_argument(
        "--data-dir", default=None, help="the demo data folder (default: the data bundled in the package)"
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="standard")
    p.add_argument("--device", choices=choices("device"), default="auto")
    p.add_argument(
        "--iterations", type=positive_int, default=None, help="override the preset's (a quick check)"
    )
    p.set_defaults(run=run_demo)


class OneLineErrors(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit code 2), like every other input error,
    plus a protocol "error" message on stdout when --progress json was asked for."""

    def error(self, message: str) -> NoReturn:
        if json_requested(sys.argv[1:]):
            Emitter()("error", message=message)
        self.exit(EXIT_INPUT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def json_requested(argv: list[str]) -> bool:
    pairs = zip(argv, argv[1:], strict=False)
    return "--progress=json" in argv or any(a == "--progress" and b == "json" for a, b in pairs)


def parser() -> argparse.ArgumentParser:
    top = OneLineErrors(prog="gaussiansvr", description=__doc__.splitlines()[0])
    top.add_argument("-v", "--verbose", action="store_true", help="log details on stderr")
    sub = top.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)
    for add in (add_reconstruct, add_batch, add_simulate, add_evaluate, add_demo):
        add(sub)
    return top


def settings_from(args: argparse.Namespace) -> Settings:
    """The preset (or the --settings file), overridden by every settings flag that was given."""
    base = preset(args.preset) if getattr(args, "settings", None) is None else settings_file(args.settings)
    changes = {name: getattr(args, name) for name in options() if getattr(args, name, None) is not None}
    return base.updated(**changes)


def settings_file(path: str) -> Settings:
    """Settings from a JSON file: a report's or a sidecar's "settings" object, or such an object itself."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(path, f"settings file cannot be read as JSON ({error})") from None
    values = data.get("settings", data) if isinstance(data, dict) else None
    unknown = sorted(set(values) - set(options())) if isinstance(values, dict) else None
    if values is None or unknown:
        raise InputError(path, f"holds no settings object{f' (unknown: {unknown})' if unknown else ''}")
    return Settings(**values)


class StopSignal:
    """Cancel requests: SIGINT/SIGTERM, a stop file, and in json mode a "cancel" line on stdin, the end
    of a piped stdin (the client is gone) or a closed stdout (``set``)."""

    def __init__(self, stop_file: str | None, watch_stdin: bool) -> None:
        self.event = threading.Event()
        self.stop_file = Path(stop_file) if stop_file else None
        self.watch_stdin = watch_stdin
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, lambda *_: self.event.set())
        if self.watch_stdin:
            threading.Thread(target=self.read_stdin, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def read_stdin(self) -> None:
        try:
            for line in sys.stdin:
                if line.strip() == "cancel":
                    self.event.set()
                    return
        except (OSError, ValueError):  # no readable stdin: nothing to watch
            return
        if stdin_is_a_pipe():
            self.event.set()

    def set(self) -> None:
        self.event.set()

    def __call__(self) -> bool:
        if self.stop_file is not None and self.stop_file.exists():
            self.event.set()
        return self.event.is_set()


def stdin_is_a_pipe() -> bool:
    """Whether stdin is a pipe or socket: its end then means the process that started us has gone (a
    terminal or /dev/null says nothing of the kind)."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def silence_stdout() -> None:
    """Point stdout at /dev/null once its reader has gone, so that nothing more can fail on it (not
    even the interpreter's last flush)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


class BarEvents:
    """Protocol events shown as a tqdm bar on stderr (silent when stderr is not a terminal)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, kind: str, **fields: Any) -> None:
        from tqdm import tqdm

        if kind == "started":
            counts = [fields[key] for key in ("n_stacks", "n_slices", "n_pixels", "n_gaussians")]
            log.info(
                "reconstructing on %s: %d stacks, %d slices, %d pixels, %d Gaussians",
                fields["device"],
                *counts,
            )
            self.bar = tqdm(total=fields["total"], unit="it", disable=None, file=sys.stderr)
        elif kind == "progress" and self.bar is not None:
            if fields["total"] != self.bar.total:  # a refit round lengthens the run
                self.bar.total = fields["total"]
            self.bar.set_postfix(loss=f"{fields['loss']:.4f}", stage=fields["stage"], refresh=False)
            self.bar.update(fields["iter"] - self.bar.n)
        elif kind == "checkpoint":
            log.info("preview written: %s", fields["volume"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_reconstruct(args: argparse.Namespace) -> int:
    from .export.paths import Outputs, beside
    from .io.roi import box_from_corners, read_slicer_roi
    from .io.stacks import read_stacks
    from .preflight import check_run

    settings = settings_from(args)
    transform = args.output_transform
    if transform is None and settings.output_space == "atlas":
        transform = str(beside(args.output_volume, "_standard_space.tfm"))
    outputs = Outputs(
        args.output_volume,
        args.output_gaussians,
        args.output_json,
        args.preview_dir,
        args.output_qc,
        transform,
        args.output_masks,
    )
    # Bad settings, outputs and input files are reported before the engine (and torch) is loaded.
    check_run(args.input_stacks, args.stack_masks, settings, outputs, args.roi_from)
    roi = (
        read_slicer_roi(args.roi_from) if args.roi_from else box_from_corners(args.roi) if args.roi else None
    )
    stacks = read_stacks(args.input_stacks, args.stack_masks, args.thicknesses)

    from .export.qc import summary_table
    from .pipeline import reconstruct

    stop = StopSignal(args.stop_file, watch_stdin=args.progress == "json")
    emitter = Emitter(on_closed=lambda: (silence_stdout(), stop.set())) if args.progress == "json" else None
    bar = BarEvents() if args.progress == "bar" else None
    try:
        with stop:
            result = reconstruct(
                args.input_stacks,
                args.stack_masks,
                args.thicknesses,
                settings,
                outputs,
                emitter or bar,
                stop,
                stacks,
                roi,
            )
    finally:
        if bar is not None:
            bar.close()
    if emitter is not None:
        verdict = result.report.get("verdict", {})
        emitter(
            "done",
            cancelled=result.cancelled,
            elapsed_s=result.report["timings"]["total_s"],
            aligned=verdict.get("status", "ok") == "ok",
            verdict=verdict.get("text"),
            **result.paths,
        )
    if result.cancelled:
        print("cancelled: no output written; the last preview is kept", file=sys.stderr)
        return EXIT_CANCELLED
    if args.progress != "json":
        lines = [
            summary_table(result.report),
            *(f"{key}: {path}" for key, path in result.paths.items() if path),
            *(
                [f"masks: {args.output_masks} ({len(masks)} files)"]
                if (masks := result.report["outputs"].get("masks"))
                else []
            ),
        ]
        try:
            print("\n".join(lines), flush=True)
        except BrokenPipeError:  # e.g. piped into head: the outputs are written, the summary is not needed
            silence_stdout()
    if result.report["verdict"]["status"] == "not_aligned":
        print(f"gaussiansvr: {result.report['verdict']['text']} (the outputs are written)", file=sys.stderr)
        return EXIT_NOT_ALIGNED
    return EXIT_OK


def run_simulate(args: argparse.Namespace) -> int:
    from .io.images import read_image
    from .sim.simulate import simulate_stacks
    from .sim.surroundings import surround

    volume, mask = read_image(args.volume, "volume"), read_image(args.mask, "mask")
    if args.surroundings:
        volume, mask = surround(volume, mask, seed=args.seed)
    result = simulate_stacks(
        volume,
        mask,
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
        motion=args.motion,
        jumps=args.jumps,
        slice_order=args.slice_order,
        interleave=args.interleave,
    )
    for path in result.stack_paths:
        print(f"stack: {path}")
    print(f"transforms: {result.transforms_path}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .io.images import read_image
    from .io.outputs import write_json
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


def run_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .cohort.batch import run_cohort
    from .cohort.bids import find_jobs
    from .cohort.qc import write_cohort_qc
    from .settings import check

    settings = settings_from(args)
    for warning in check(settings):
        log.warning("%s", warning)
    jobs = find_jobs(args.bids_dir, args.out_dir, args.masks_dir, args.participant_label, args.session_label)
    bar = tqdm(total=len(jobs), unit="subject", disable=None, file=sys.stderr)

    def advance(result) -> None:
        bar.update(1)
        if result.status == "failed":
            tqdm.write(f"{result.job.label}: failed: {result.message}", file=sys.stderr)

    try:
        results = run_cohort(jobs, args.bids_dir, args.out_dir, settings, args.scheduler, args.workers,
                             args.sequential, advance)  # fmt: skip
    finally:
        bar.close()
    table, web = write_cohort_qc(results, args.out_dir)
    failed = [r.job.label for r in results if r.status == "failed"]
    print(f"{len(results) - len(failed)} of {len(results)} subjects reconstructed; QC: {table}, {web}")
    if failed:
        print(
            f"gaussiansvr: {len(failed)} subjects failed: {', '.join(failed)} (see {table})", file=sys.stderr
        )
        return EXIT_SOME_FAILED
    return EXIT_OK


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(args.output_dir, args.data_dir, args.preset, args.device, args.iterations)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    json_mode = getattr(args, "progress", None) == "json"

    def report(message: str) -> None:
        if json_mode:
            Emitter(on_closed=silence_stdout)("error", message=message)
        print(f"gaussiansvr: error: {message}", file=sys.stderr)

    try:
        return args.run(args)
    except InputError as error:
        report(str(error))
        return EXIT_INPUT_ERROR
    except MemoryError:
        report(
            "out of memory: use fewer Gaussians, a smaller --batch-pixels or a coarser --output-resolution"
        )
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as error:  # a bug: say so on every channel, with what a bug report needs
        traceback.print_exc()
        report(f"internal error: {type(error).__name__}: {error}")
        return EXIT_CRASH
