"""The module's parameters: engine settings (ranges, tooltips, command-line flags), presets, and the
layout of the parameter node.

This is the single source for the parameter-node class (built in GaussianSVR.py from
``parameter_namespace``), for the tooltips and ranges the widget shows, and for the worker's command
line; it imports nothing from Slicer so that the .ui test can check the bindings without Slicer.
"""

from __future__ import annotations

import enum
import pathlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated


class Preset(enum.Enum):
    """Named engine presets (the engine's ``--preset``)."""

    PREVIEW = "preview"
    STANDARD = "standard"
    HIGH = "high"

    def label(self) -> str:
        return {"preview": "Preview", "standard": "Standard", "high": "High quality"}[self.value]


class Device(enum.Enum):
    """Where the engine computes (the engine's ``--device``)."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self) -> str:
        return {"auto": "Automatic", "cpu": "CPU", "cuda": "CUDA GPU"}[self.value]


class BiasCorrection(enum.Enum):
    """Intensity non-uniformity correction of the stacks (the engine's ``--bias-correction``)."""

    N4 = "n4"
    NONE = "none"

    def label(self) -> str:
        return {"n4": "N4 (before fitting)", "none": "None"}[self.value]


@dataclass(frozen=True)
class Setting:
    """One scalar parameter of the parameter node.

    ``flag`` is the engine's command-line option (None: not passed to the engine); numeric settings
    carry their range (``minimum``/``maximum``, inclusive) and, for floats, the decimals the .ui shows.
    """

    name: str
    kind: type
    default: object
    tooltip: str
    flag: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    decimals: int | None = None


ENGINE_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "preset",
        Preset,
        Preset.STANDARD,
        "Preview: about a quarter of the time of Standard, to check the inputs. Standard: the default "
        "balance. High quality: about four times the time of Standard, finer detail. Choosing a preset "
        "fills in the Advanced settings.",
        "--preset",
    ),
    Setting(
        "outputResolution",
        float,
        0.8,
        "Voxel size of the output volume in mm. It only changes the final sampling of the Gaussians: "
        "halving it makes the output 8x larger and that last step up to 8x longer.",
        "--output-resolution",
        0.2,
        5.0,
        2,
    ),
    Setting(
        "nGaussians",
        int,
        0,
        "Number of 3-D Gaussians that represent the volume; 0 = automatic (35 per ml of brain, about "
        "6,000 at 28 weeks). More can resolve finer detail but makes slice motion harder to "
        "estimate; memory grows linearly, time a little (each pixel sees only its nearest Gaussians).",
        "--n-gaussians",
        0,
        500000,
    ),
    Setting(
        "kNeighbours",
        int,
        16,
        "Gaussians evaluated for each slice pixel. More is more exact near edges; time and memory "
        "grow linearly with it.",
        "--k-neighbours",
        4,
        64,
    ),
    Setting(
        "iterations",
        int,
        400,
        "Optimization steps. Time grows linearly; too few leave motion uncorrected and the volume blurred.",
        "--iterations",
        10,
        20000,
    ),
    Setting(
        "scaleRegularization",
        float,
        2.5e-3,
        "Weight of the penalty that keeps Gaussians from growing or shrinking without need. Higher is "
        "smoother, lower is sharper but noisier. No effect on time.",
        "--scale-regularization",
        0.0,
        1.0,
        5,
    ),
    Setting(
        "coarseToFine",
        bool,
        True,
        "Start with blurred, low-detail fitting and sharpen over the run: more robust to large motion, "
        "no extra time. Turn off only for nearly motion-free data.",
        "--no-coarse-to-fine",
    ),
    Setting(
        "poseSearch",
        bool,
        True,
        "Re-try the position of badly fitting slices from a grid of rotations a few times during the "
        "run: recovers slices that moved far (large fetal motion). A few seconds per search; turn "
        "off only for nearly motion-free data.",
        "--no-pose-search",
    ),
    Setting(
        "maskDilation",
        float,
        0.0,
        "Grow every mask by this margin in mm before reconstructing: use it when the masks cut off a "
        "little brain. No effect on time.",
        "--mask-dilation",
        0.0,
        20.0,
        1,
    ),
    Setting(
        "biasCorrection",
        BiasCorrection,
        BiasCorrection.N4,
        "Correct slow intensity variations (coil shading) of each stack inside its mask before "
        "fitting (N4, about 2 s per stack). Measured to help on shaded stacks and not to hurt on "
        "others.",
        "--bias-correction",
    ),
    Setting(
        "device",
        Device,
        Device.AUTO,
        "Where the engine computes. Automatic uses a CUDA GPU when PyTorch sees one (typically ten "
        "times faster), otherwise the CPU.",
        "--device",
    ),
    Setting(
        "previewInterval",
        float,
        15.0,
        "Seconds between live previews. Each preview samples the volume and the ellipsoids: about a "
        "second on a CPU, so short intervals slow a CPU run down.",
        "--checkpoint-interval",
        1.0,
        600.0,
        1,
    ),
    Setting(
        "seed",
        int,
        0,
        "Random seed: the same seed and settings give the same result. No effect on time.",
        "--seed",
        0,
        2**31 - 1,
    ),
)

DISPLAY_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "showGaussians",
        bool,
        True,
        "Show the Gaussians as ellipsoids in 3-D and as outlines in the slice views.",
    ),
    Setting(
        "glyphScale",
        float,
        1.0,
        "Size of each ellipsoid in standard deviations of its Gaussian; lower it to separate crowded "
        "ellipsoids.",
        None,
        0.1,
        3.0,
        2,
    ),
    Setting(
        "maxGlyphs",
        int,
        2000,
        "At most this many ellipsoids are drawn: those carrying the most signal "
        "(intensity times volume). More ellipsoids make the views slower.",
        None,
        50,
        20000,
    ),
    Setting(
        "saveToFolder",
        bool,
        False,
        "Also save the volume, the ellipsoids (.vtp and .npz) and the QC report (.json) in the folder.",
    ),
)

RUN_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "continueFromLast",
        bool,
        False,
        "Start from the last reconstruction's Gaussians and slice positions (finished or cancelled) "
        "instead of from scratch: change a setting and continue. The stacks should be the same; "
        "new stacks are registered in.",
    ),
)

#: Node references of the parameter node: name -> MRML class.
NODE_PARAMETERS: dict[str, str] = {
    "outputVolume": "vtkMRMLScalarVolumeNode",
    "gaussiansModel": "vtkMRMLModelNode",
}

#: The stack table, one list entry per row (wired by hand: the wrapper binds no widget to a list).
#: A mask is a label map or segmentation node, or None.
TABLE_PARAMETERS: tuple[str, ...] = ("stacks", "masks", "thicknesses", "includeStacks")

PATH_PARAMETERS: tuple[str, ...] = ("outputFolder",)

#: Values each preset writes into the Advanced settings (the engine's own preset values).
PRESETS: dict[Preset, dict[str, object]] = {
    Preset.PREVIEW: {"kNeighbours": 12, "iterations": 150},
    Preset.STANDARD: {"kNeighbours": 16, "iterations": 400},
    Preset.HIGH: {"kNeighbours": 24, "iterations": 800},
}


def all_settings() -> tuple[Setting, ...]:
    return ENGINE_SETTINGS + RUN_SETTINGS + DISPLAY_SETTINGS


def setting(name: str) -> Setting:
    for candidate in all_settings():
        if candidate.name == name:
            return candidate
    raise KeyError(name)


def relative_cost(values: Mapping[str, object]) -> float:
    """Optimization time relative to the Standard preset: it scales with neighbours x iterations."""
    standard = PRESETS[Preset.STANDARD]
    reference = int(standard["kNeighbours"]) * int(standard["iterations"])
    return int(values["kNeighbours"]) * int(values["iterations"]) / reference


def engine_arguments(values: Mapping[str, object]) -> list[str]:
    """Command-line options of the engine for the given setting values (by parameter name)."""
    arguments: list[str] = []
    for spec in ENGINE_SETTINGS:
        value = values[spec.name]
        if spec.kind is bool:
            # The engine's boolean flags switch a default-on feature off; there are no "on" flags.
            if not value:
                arguments.append(spec.flag)
        elif isinstance(value, enum.Enum):
            arguments += [spec.flag, value.value]
        else:
            arguments += [spec.flag, repr(spec.kind(value))]
    return arguments


def parameter_namespace(
    node_class: Callable[[str], type], within_range: Callable[[float, float], object]
) -> dict[str, object]:
    """Annotations and defaults of the parameter-node class, ready for ``type(name, (), namespace)``.

    Slicer's MRML classes and its ``WithinRange`` annotation are passed in so that this module needs
    no Slicer; GaussianSVR.py passes the real ones, the tests stand-ins. The decimals shown are set in
    the .ui (a ``Decimals`` annotation would make the wrapper log "Unused annotations").
    """
    annotations: dict[str, object] = {}
    namespace: dict[str, object] = {"__annotations__": annotations}
    for name, class_name in NODE_PARAMETERS.items():
        annotations[name] = node_class(class_name)
    annotations["stacks"] = list[node_class("vtkMRMLScalarVolumeNode")]
    annotations["masks"] = list[node_class("vtkMRMLNode")]
    annotations["thicknesses"] = list[float]
    annotations["includeStacks"] = list[bool]
    annotations["outputFolder"] = pathlib.Path
    for spec in all_settings():
        if spec.minimum is not None:
            annotations[spec.name] = Annotated[spec.kind, within_range(spec.minimum, spec.maximum)]
        else:
            annotations[spec.name] = spec.kind
        namespace[spec.name] = spec.default
    return namespace
