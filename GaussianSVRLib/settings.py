"""Reconstruction settings: each one declared once, with its default, range, help and command-line flag.

The command line (cli.py) and the Slicer module's parameters (GaussianSVRSlicer/params.py) are built
from these declarations, and ``check`` is the one place where a Settings is judged before a run, for
the command line and the Python API alike. Plain Python: the Slicer process imports this module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, get_args

from .errors import InputError

PsfMode = Literal["exact", "normalized", "none"]
DeviceName = Literal["auto", "cpu", "cuda"]
BiasCorrection = Literal["n4", "none"]
NeighbourBackend = Literal["auto", "faiss", "kdtree", "grid", "torch"]
PresetName = Literal["preview", "standard", "high"]
OutputSpace = Literal["scanner", "atlas"]
SliceOrder = Literal["interleaved", "ascending", "descending"]
#: How the simulator moves the slices (sim/simulate.py); here so that the command line needs no torch.
MotionModel = Literal["independent", "trajectory"]


@dataclass(frozen=True)
class Range:
    """An interval of numbers; an open end excludes its bound, None leaves that side unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def __str__(self) -> str:
        low, high = shown(self.low), shown(self.high)
        if self.low is None and self.high is None:
            return "finite"
        if self.high is None:
            return f"{'above' if self.low_open else 'at least'} {low}"
        if self.low is None:
            return f"{'below' if self.high_open else 'at most'} {high}"
        if self.low_open or self.high_open:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        return f"between {low} and {high}"


def shown(value: float | None) -> str:
    """A number as a person would write it: integers whole, others in 4 significant digits."""
    if value is None:
        return ""
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}".replace(",", " ") if abs(value) >= 1e5 else str(int(value))
    return f"{value:.4g}"


#: Every number in this range is finite.
FINITE = Range()
POSITIVE = Range(0.0, None, low_open=True)
NON_NEGATIVE = Range(0.0)
FRACTION = Range(0.0, 1.0)


@dataclass(frozen=True)
class Option:
    """What a setting means and which values it takes.

    limits: values outside cannot work (an error before any work); plausible: values outside are
    allowed but unusual (a warning). flag: the command-line option, None for settings of the Python
    API only; a boolean's flag switches a default-on feature off ("--no-...").
    """

    help: str
    flag: str | None = None
    limits: Range = FINITE
    plausible: Range = FINITE
    unit: str = ""
    metavar: str | None = None


def option(default: Any, help: str, **details: Any) -> Any:
    return field(default=default, metadata={"option": Option(help, **details)})


#: Bounds of the automatic Gaussian count (see gaussians_per_ml).
MIN_GAUSSIANS = 500
MAX_GAUSSIANS = 200_000


@dataclass(frozen=True)
class Settings:
    """Everything that steers a reconstruction. Defaults are the "standard" preset, sized for a CPU."""

    n_gaussians: int = option(
        0,
        "number of Gaussians; 0 = automatic (gaussians_per_ml per ml of brain in the reference stack's "
        "mask, about 6,000 at 28 weeks). More can resolve finer detail but makes slice motion harder to "
        "estimate; memory grows linearly",
        flag="--n-gaussians",
        limits=Range(0, 5_000_000),
        plausible=Range(0, 500_000),
        metavar="N",
    )
    gaussians_per_ml: float = option(
        35.0, "Gaussians per ml of brain when n_gaussians is 0", limits=POSITIVE, plausible=Range(5, 200)
    )
    k_neighbours: int = option(
        24,
        "Gaussians evaluated for each slice pixel; more is more exact near edges, time and memory grow "
        "linearly with it",
        flag="--k-neighbours",
        limits=Range(1, 256),
        plausible=Range(4, 64),
        metavar="K",
    )
    iterations: int = option(
        400,
        "optimization steps; time grows linearly, too few leave motion uncorrected and the volume blurred",
        flag="--iterations",
        limits=Range(1, 10_000_000),
        plausible=Range(None, 100_000),
        metavar="N",
    )
    batch_pixels: int = option(
        32768,
        "slice pixels per optimization step; memory grows linearly with it",
        flag="--batch-pixels",
        limits=Range(1, 1 << 24),
        plausible=Range(1024, 1 << 20),
        metavar="B",
    )
    output_resolution: float = option(
        0.8,
        "voxel size of the output volume; it only changes the final sampling of the Gaussians: halving "
        "it makes the output 8x larger and that last step up to 8x longer",
        flag="--output-resolution",
        limits=Range(0.05, 20.0),
        plausible=Range(0.2, 5.0),
        unit="mm",
        metavar="R",
    )
    psf_mode: PsfMode = option(
        "exact",
        "slice profile: the exact closed-form convolution, the published normalized variant, or none "
        "(an ablation)",
        flag="--psf",
    )
    in_plane_fwhm: float = option(
        1.2,
        "in-plane FWHM of the slice profile as a multiple of the pixel size",
        limits=POSITIVE,
        plausible=Range(0.5, 3.0),
    )
    coarse_to_fine: bool = option(
        True,
        "start on the slices at half resolution in-plane, then go to full resolution: more robust to "
        "large motion, no extra time",
        flag="--no-coarse-to-fine",
    )
    coarse_fraction: float = option(
        0.4, "share of the iterations spent on the coarse stage", limits=Range(0.0, 1.0, high_open=True)
    )
    edge_fraction: float = option(
        0.7, "share of the initial Gaussians placed by image gradient (the rest uniformly)", limits=FRACTION
    )
    scale_target: float = option(
        1.6, "the scale (mm) that the regularization pulls every Gaussian towards", limits=POSITIVE, unit="mm"
    )
    scale_regularization: float = option(
        2.5e-3,
        "weight of the penalty that keeps Gaussians from growing or shrinking without need; higher is "
        "smoother, lower sharper but noisier",
        flag="--scale-regularization",
        limits=NON_NEGATIVE,
        plausible=Range(0.0, 1.0),
        metavar="W",
    )
    lr_means: float = option(2.5e-2, "learning rate of the Gaussian centres", limits=NON_NEGATIVE)
    lr_scales: float = option(2.5e-2, "learning rate of the Gaussian log-scales", limits=NON_NEGATIVE)
    lr_quaternions: float = option(1e-2, "learning rate of the Gaussian orientations", limits=NON_NEGATIVE)
    lr_intensities: float = option(1e-2, "learning rate of the Gaussian intensities", limits=NON_NEGATIVE)
    lr_rotation: float = option(5e-3, "learning rate of the slice rotations (rad)", limits=NON_NEGATIVE)
    lr_translation: float = option(1e-1, "learning rate of the slice translations (mm)", limits=NON_NEGATIVE)
    lr_slice_scale: float = option(5e-3, "learning rate of the slice intensity scales", limits=NON_NEGATIVE)
    motion_start: float = option(
        0.1, "share of the iterations before slice motion is fitted", limits=FRACTION
    )
    refresh_every: int = option(20, "steps between neighbour-list updates", limits=Range(1, 100_000))
    outlier_z: float = option(
        3.5,
        "robust z-score at which a slice is excluded (weights fall from 1 at z = 2)",
        limits=Range(2.0, None, low_open=True),
        plausible=Range(2.5, 10.0),
    )
    seed: int = option(
        0,
        "random seed: the same seed and settings give the same result",
        flag="--seed",
        limits=Range(0, 2**31 - 1),
    )
    device: DeviceName = option(
        "auto", "compute device; auto takes a CUDA GPU when torch sees one, else the CPU", flag="--device"
    )
    neighbour_backend: NeighbourBackend = option(
        "auto",
        "k-nearest-neighbour search; auto picks the fastest for the device",
        flag="--neighbour-backend",
    )
    checkpoint_interval_s: float = option(
        15.0,
        "seconds between live previews (with --preview-dir); each costs about a second on a CPU",
        flag="--checkpoint-interval",
        limits=POSITIVE,
        unit="s",
        metavar="S",
    )
    reference_stack: int | None = option(
        None,
        "index (0-based) of the stack that fixes the output frame (default: the largest given mask)",
        flag="--reference-stack",
        limits=NON_NEGATIVE,
        metavar="I",
    )
    prealign: bool = option(
        True, "register every stack rigidly to the reference stack before fitting", flag="--no-prealign"
    )
    atlas_prealign: bool = option(
        True,
        "let the stacks vote on where the bundled atlas lies: a stack the vote puts far from the others "
        "is registered again (stacks turned far apart), and a first fit that leaves a stack agreeing "
        "poorly starts once more from slice poses searched against the atlas (large motion in stacks)",
        flag="--no-atlas-prealign",
    )
    mask_dilation_mm: float = option(
        0.0,
        "grow every mask by this margin, for masks that cut a little brain",
        flag="--mask-dilation",
        limits=Range(0.0, 50.0),
        plausible=Range(0.0, 10.0),
        unit="mm",
        metavar="MM",
    )
    cut_to_brain: bool = option(
        True,
        "write the volume as zero outside the brain most stacks' masks agree on (each slice carried by "
        "its fitted motion; see export/support.py): the Gaussians are not fitted there",
        flag="--no-cut-to-brain",
    )
    bias_correction: BiasCorrection = option(
        "n4",
        "n4: SimpleITK N4 bias-field correction of each stack inside its mask before fitting (measured to "
        "help on shaded stacks and not to hurt on others); none: off",
        flag="--bias-correction",
    )
    init_gaussians: str | None = option(
        None,
        "continue from an earlier run's Gaussians and slice transforms: its --output-gaussians G.npz or a "
        "preview_gaussians.npz (the file's Gaussian count replaces --n-gaussians)",
        flag="--init-gaussians",
        metavar="G",
    )
    output_space: OutputSpace = option(
        "scanner",
        "frame of the output volume: scanner (the reference stack's, as acquired) or atlas (the standard "
        "anatomical orientation of the bundled fetal atlas of the brain's age, found by a rigid "
        "registration from any starting orientation; the patient's size is kept)",
        flag="--output-space",
    )
    gestational_age: float | None = option(
        None,
        "gestational age, which picks the atlas of --output-space atlas; default: estimated from the "
        "brain volume (and reported)",
        flag="--gestational-age",
        limits=Range(15.0, 45.0),
        plausible=Range(21.0, 34.0),
        unit="weeks",
        metavar="W",
    )
    slice_order: SliceOrder = option(
        "interleaved",
        "order in which each stack's slices were acquired, where its JSON sidecar gives no SliceTiming: "
        "interleaved (see --interleave), ascending or descending along the image's third axis",
        flag="--slice-order",
    )
    interleave: int = option(
        2,
        "step of the interleaved order: 2 acquires slices 1, 3, 5, ... then 2, 4, 6, ...",
        flag="--interleave",
        limits=Range(1, 64),
        plausible=Range(1, 8),
        metavar="N",
    )
    motion_smoothness: float = option(
        1e-3,
        "weight of the prior that slices acquired one after the other moved alike (a robust penalty, so "
        "that a sudden kick stays possible); 0: every slice moves on its own. Measured (medians of 3): "
        "slice rotation errors about halved, +0.4 dB on a simulated trajectory, -0.1 dB on independent "
        "motion; from 0.003 on it costs PSNR",
        flag="--motion-smoothness",
        limits=NON_NEGATIVE,
        plausible=Range(0.0, 1.0),
        metavar="W",
    )
    pose_search: bool = option(
        True,
        "re-try the pose of badly fitting slices from a grid of rotations a few times during the run "
        "(large fetal motion)",
        flag="--no-pose-search",
    )
    refit_rounds: int = option(
        2,
        "after a fit that leaves a stack agreeing poorly with the volume (large motion), at most this "
        "many extra rounds of fitting (as many iterations again, at full resolution, slice motion and "
        "pose searches from the first step), for as long as each clearly raises the worst stack "
        "agreement; 0: none",
        flag="--refit-rounds",
        limits=Range(0, 20),
        plausible=Range(0, 4),
        metavar="N",
    )

    def updated(self, **changes: object) -> Settings:
        """A copy with the given fields changed; unknown names raise TypeError."""
        return replace(self, **changes)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


PRESETS: dict[PresetName, dict[str, object]] = {
    "preview": {"k_neighbours": 12, "iterations": 150},
    "standard": {},
    "high": {"k_neighbours": 32, "iterations": 800, "gaussians_per_ml": 50.0},
}


def preset(name: PresetName) -> Settings:
    """The named preset ("preview", "standard", "high")."""
    return Settings().updated(**PRESETS[name])


def options() -> dict[str, Option]:
    """Every setting's Option, by field name, in declaration order."""
    return {f.name: f.metadata["option"] for f in fields(Settings)}


def setting_type(name: str) -> Any:
    """The declared type of a setting (a class, a Literal, or ``int | None``)."""
    hints = {
        "int": int,
        "float": float,
        "bool": bool,
        "str | None": str,
        "int | None": int,
        "float | None": float,
    }
    annotation = next(f.type for f in fields(Settings) if f.name == name)
    return hints.get(annotation) or globals()[annotation]


def choices(name: str) -> tuple[str, ...]:
    """The values of a Literal-typed setting, () for other settings."""
    return get_args(setting_type(name)) if not isinstance(setting_type(name), type) else ()


def describe(name: str) -> str:
    """How a setting is named in messages: its flag when it has one (the user typed it), else its field."""
    return options()[name].flag or name


def check(settings: Settings) -> list[str]:
    """Judge every setting; returns warnings for unusual values, raises InputError for values that cannot
    work (a wrong type, a value outside its limits, settings that contradict each other)."""
    warnings, defaults = [], Settings()
    for name, spec in options().items():
        value = getattr(settings, name)
        if value is None and getattr(defaults, name) is None:
            continue
        expected = setting_type(name)
        if choices(name):
            if value not in choices(name):
                raise InputError(describe(name), f"must be one of {', '.join(choices(name))}, got {value!r}")
            continue
        if expected is bool or expected is str:
            if not isinstance(value, expected):
                raise InputError(describe(name), f"must be a {expected.__name__}, got {value!r}")
            continue
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or (expected is int and not float(value).is_integer()):
            raise InputError(
                describe(name), f"must be {'an integer' if expected is int else 'a number'}, got {value!r}"
            )
        unit = f" {spec.unit}" if spec.unit else ""
        if value not in spec.limits:
            raise InputError(describe(name), f"must be {spec.limits}{unit}, got {shown(value)}")
        if value not in spec.plausible:
            warnings.append(
                f"{describe(name)} {shown(value)}{unit} is unusual (usually {spec.plausible}{unit})"
            )
    n, k = settings.n_gaussians, settings.k_neighbours
    if 0 < n < k:
        raise InputError(
            describe("n_gaussians"), f"{n} Gaussians are fewer than the {k} each pixel sees (--k-neighbours)"
        )
    return warnings
