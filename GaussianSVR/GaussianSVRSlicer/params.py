"""The module's parameters: the engine settings it exposes, presets, and the layout of the parameter node.

Every engine setting here is one of the engine's (GaussianSVRLib/settings.py, where its flag, range,
help and choices are declared): this module only names it for the parameter node, picks the range a
widget offers (the engine's usual range, within its limits) and how many decimals it shows. The
presets are the engine's. It imports nothing from Slicer, and from the engine only its plain-Python
settings module, so that the .ui test can check the bindings without Slicer.
"""

from __future__ import annotations

import enum
import pathlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, get_args

from GaussianSVRLib import settings as engine

#: Words the widgets show for the engine's choices.
LABELS = {
    "preview": "Preview",
    "standard": "Standard",
    "high": "High quality",
    "auto": "Automatic",
    "cpu": "CPU",
    "cuda": "CUDA GPU",
    "n4": "N4 (before fitting)",
    "none": "None",
    "scanner": "Scanner (as acquired)",
    "atlas": "Standard planes (atlas)",
}


class Choice(enum.Enum):
    """An engine setting's choices as an enum (the parameter node stores enums, combo boxes show them)."""

    def label(self) -> str:
        return LABELS[self.value]


def choices_enum(name: str, values: tuple[str, ...]) -> type[Choice]:
    return Choice(name, {value.upper(): value for value in values})  # type: ignore[return-value]


Preset = choices_enum("Preset", get_args(engine.PresetName))
Device = choices_enum("Device", engine.choices("device"))
BiasCorrection = choices_enum("BiasCorrection", engine.choices("bias_correction"))
OutputSpace = choices_enum("OutputSpace", engine.choices("output_space"))
ENUMS = {"preset": Preset, "device": Device, "bias_correction": BiasCorrection, "output_space": OutputSpace}


@dataclass(frozen=True)
class Setting:
    """One scalar parameter of the parameter node.

    ``engine``: the engine setting it stands for (None: the module's own); ``flag`` is its command-line
    option; numeric settings carry the range (``minimum``/``maximum``, inclusive) a widget offers and,
    for floats, the decimals the .ui shows.
    """

    name: str
    kind: type
    default: object
    tooltip: str
    flag: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    decimals: int | None = None
    engine: str | None = None


def sentence(text: str) -> str:
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


def engine_setting(
    name: str, field: str, decimals: int | None = None, ui_range: tuple[float, float] | None = None
) -> Setting:
    """The parameter ``name`` for the engine setting ``field``: its default, flag, help and range.

    The widget offers the engine's usual range where it is bounded, else its limits, else ``ui_range``.
    """
    option = engine.options()[field]
    default = getattr(engine.Settings(), field)
    kind = engine.setting_type(field)
    if field in ENUMS:
        kind, default = ENUMS[field], ENUMS[field](default)
    low, high = ui_range or (None, None)
    if kind in (int, float):
        for bounds in (option.plausible, option.limits):
            if low is None and bounds.low is not None and bounds.high is not None:
                low, high = bounds.low, bounds.high
    return Setting(name, kind, default, sentence(option.help), option.flag, low, high, decimals, field)


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
    engine_setting("outputResolution", "output_resolution", decimals=2),
    engine_setting("outputSpace", "output_space"),
    engine_setting("nGaussians", "n_gaussians"),
    engine_setting("kNeighbours", "k_neighbours"),
    engine_setting("iterations", "iterations", ui_range=(1, 100_000)),
    engine_setting("scaleRegularization", "scale_regularization", decimals=5),
    engine_setting("coarseToFine", "coarse_to_fine"),
    engine_setting("poseSearch", "pose_search"),
    engine_setting("maskDilation", "mask_dilation_mm", decimals=1),
    engine_setting("cutToBrain", "cut_to_brain"),
    engine_setting("biasCorrection", "bias_correction"),
    engine_setting("device", "device"),
    engine_setting("previewInterval", "checkpoint_interval_s", decimals=1, ui_range=(1.0, 600.0)),
    engine_setting("seed", "seed"),
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
    "roi": "vtkMRMLMarkupsROINode",
    "gaussiansModel": "vtkMRMLModelNode",
}

#: The stack table, one list entry per row (wired by hand: the wrapper binds no widget to a list).
#: A mask is a label map or segmentation node, or None.
TABLE_PARAMETERS: tuple[str, ...] = ("stacks", "masks", "thicknesses", "includeStacks")

PATH_PARAMETERS: tuple[str, ...] = ("outputFolder",)

#: Values each preset writes into the Advanced settings: the engine preset's value of every setting that
#: some preset changes and the module shows.
PRESETS: dict[Preset, dict[str, object]] = {
    Preset(name): {
        spec.name: getattr(engine.preset(name), spec.engine)
        for spec in ENGINE_SETTINGS
        if spec.engine is not None and any(spec.engine in values for values in engine.PRESETS.values())
    }
    for name in engine.PRESETS
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
