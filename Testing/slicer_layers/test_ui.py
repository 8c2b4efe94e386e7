"""The module's .ui file, loaded with PySide6's QUiLoader offscreen (small stand-ins for the ctk and
qMRML widgets): every widget the module touches exists, every SlicerParameterName binds to a
parameter of the parameter-node class with a widget Slicer can connect to it, and the parameter
definitions (ranges, presets, command line) agree with the .ui and the engine."""

from __future__ import annotations

import ast
import enum
import os
import pathlib
import subprocess
import sys
import typing
import xml.etree.ElementTree as ET

import pytest
from slicer_helpers import MODULE_DIR, REPO

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from GaussianSVRSlicer import params  # noqa: E402
from PySide6.QtCore import QFile  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402
from PySide6.QtWidgets import QApplication, QWidget  # noqa: E402

UI_FILE = MODULE_DIR / "Resources" / "UI" / "GaussianSVR.ui"
MODULE_FILE = MODULE_DIR / "GaussianSVR.py"
PARAMETER_PROPERTY = "SlicerParameterName"

#: Q_PROPERTYs of the Slicer/CTK widgets the .ui uses, from their headers (qMRMLNodeComboBox.h in
#: Slicer; ctkCollapsibleButton.h, ctkSliderWidget.h, ctkDirectoryButton.h in CTK), plus the
#: QAbstractButton properties ctkCollapsibleButton inherits. The stand-ins registered with QUiLoader
#: are bare QWidgets: their signals and slots are checked in the XML, so QUiLoader's warning about
#: the mrmlSceneChanged connection is expected.
CUSTOM_PROPERTIES = {
    "qMRMLWidget": set(),
    "qMRMLNodeComboBox": {
        "currentNodeID", "nodeTypes", "showHidden", "showChildNodeTypes", "hideChildNodeTypes",
        "baseName", "noneEnabled", "addEnabled", "removeEnabled", "editEnabled", "renameEnabled",
        "selectNodeUponCreation", "noneDisplay", "sizeAdjustPolicy", "interactionNodeSingletonTag",
    },
    "ctkCollapsibleButton": {
        "collapsed", "collapsedHeight", "flat", "contentsFrameShape", "contentsFrameShadow",
        "contentsLineWidth", "contentsMidLineWidth", "buttonTextAlignment", "indicatorAlignment", "text",
        "icon", "checkable", "checked",
    },
    "ctkSliderWidget": {
        "decimals", "singleStep", "pageStep", "minimum", "maximum", "value", "prefix", "suffix",
        "tickInterval", "tickPosition", "synchronizeSiblings", "spinBoxAlignment", "tracking",
        "spinBoxVisible", "popupSlider", "invertedAppearance", "invertedControls",
    },
    "ctkDirectoryButton": {"acceptMode", "directory", "caption", "text", "icon", "elideMode", "options"},
}  # fmt: skip

#: Which widget classes Slicer 5.10's parameterNodeWrapper connects to which value types
#: (the canRepresent methods of Base/Python/slicer/parameterNodeWrapper/guiConnectors.py).
CONNECTABLE = {
    bool: {"QCheckBox", "ctkCheckBox", "QPushButton", "ctkCheckablePushButton"},
    int: {"QSpinBox", "QSlider", "QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox", "ctkDoubleSlider"},
    float: {"QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox", "ctkDoubleSlider", "qMRMLSliderWidget"},
    enum.Enum: {"QComboBox", "ctkComboBox"},
    pathlib.Path: {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox"},
}
UNBOUNDED_REFUSED = {"ctkSliderWidget", "QSlider", "qMRMLSliderWidget"}
#: Attributes parameterNodeWrapper adds to the class (wrapper.py _processClass): not parameter names.
RESERVED = {
    "allParameters", "default", "isCached", "dataType", "getValue", "setValue", "connectGui",
    "connectParametersToGui", "disconnectGui", "StartModify", "EndModify", "AddObserver", "RemoveObserver",
    "Modified", "parameterNode",
}  # fmt: skip


class StandInNode:
    """Stands in for a vtkMRML node class when building the parameter annotations."""


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


def node_class(name: str) -> type:
    return type(name, (StandInNode,), {})


NAMESPACE = params.parameter_namespace(node_class, WithinRange)
ANNOTATIONS = NAMESPACE["__annotations__"]


def split(annotation) -> tuple[object, list]:
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        return base, extras
    return annotation, []


def value_kind(base) -> object:
    if isinstance(base, type) and issubclass(base, StandInNode):
        return "node"
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return enum.Enum
    return base


@pytest.fixture(scope="module")
def loaded() -> QWidget:
    app = QApplication.instance() or QApplication([])
    loader = QUiLoader()
    for class_name in CUSTOM_PROPERTIES:
        loader.registerCustomWidget(type(class_name, (QWidget,), {}))
    ui_file = QFile(str(UI_FILE))
    assert ui_file.open(QFile.ReadOnly)
    widget = loader.load(ui_file)
    ui_file.close()
    assert widget is not None, loader.errorString()
    yield widget
    widget.deleteLater()
    app.processEvents()


@pytest.fixture(scope="module")
def tree() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def bound_widgets(tree: ET.Element) -> dict[str, ET.Element]:
    bound: dict[str, ET.Element] = {}
    for element in tree.iter("widget"):
        for prop in element.findall("property"):
            if prop.get("name") == PARAMETER_PROPERTY:
                name = prop.find("string").text
                assert name not in bound, f"{name} is bound twice"
                bound[name] = element
    return bound


def ui_attributes(path: pathlib.Path) -> set[str]:
    """Names X of every ``<name>.ui.X`` (self.ui.X, widget.ui.X) in a Python file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            inner = node.value
            if inner.attr == "ui" and isinstance(inner.value, ast.Name):
                names.add(node.attr)
    return names


def test_every_widget_the_module_uses_exists(loaded):
    used = set().union(
        *(ui_attributes(path) for path in [MODULE_FILE, *(MODULE_DIR / "GaussianSVRSlicer").glob("*.py")])
    )
    assert {
        "applyButton",
        "stacksTable",
        "progressBar",
        "statusLabel",
        "logTextEdit",
        "qcTextBrowser",
    } <= used
    missing = sorted(name for name in used if loaded.findChild(QWidget, name) is None)
    assert missing == []


def test_every_binding_names_a_parameter_with_a_connectable_widget(tree):
    bound = bound_widgets(tree)
    assert bound
    for name, element in bound.items():
        assert name in ANNOTATIONS, f"{name} is not a parameter"
        base, extras = split(ANNOTATIONS[name])
        kind = value_kind(base)
        widget_class = element.get("class")
        assert widget_class in CONNECTABLE[kind], f"{name}: Slicer cannot connect {widget_class} to {kind}"
        if widget_class in UNBOUNDED_REFUSED:
            assert any(isinstance(extra, WithinRange) for extra in extras), f"{name}: needs a range"


def test_every_scalar_parameter_has_a_widget_and_lists_are_wired_by_hand(tree):
    bound = set(bound_widgets(tree))
    scalar = {spec.name for spec in params.all_settings()} | {"outputVolume", "outputFolder"}
    assert scalar <= bound
    assert not bound & set(params.TABLE_PARAMETERS)  # the wrapper has no widget for lists of nodes
    assert not set(ANNOTATIONS) & RESERVED


def test_ui_ranges_match_the_parameter_ranges(tree):
    bound = bound_widgets(tree)
    for spec in params.all_settings():
        element = bound[spec.name]
        values = {p.get("name"): p[0].text for p in element.findall("property")}
        if spec.minimum is not None:
            assert float(values["minimum"]) == spec.minimum and float(values["maximum"]) == spec.maximum, (
                spec.name
            )
        if spec.decimals is not None:
            assert int(values["decimals"]) == spec.decimals, spec.name


def test_properties_set_in_the_ui_exist_on_the_widgets(loaded, tree):
    for element in tree.iter("widget"):
        widget_class, name = element.get("class"), element.get("name")
        widget = loaded if name == loaded.objectName() else loaded.findChild(QWidget, name)
        assert widget is not None, name
        for prop in element.findall("property"):
            if prop.get("stdset") == "0" or prop.get("name") == "geometry":
                continue
            if widget_class in CUSTOM_PROPERTIES:
                known = CUSTOM_PROPERTIES[widget_class] | {
                    bytes(widget.metaObject().property(i).name()).decode()
                    if not isinstance(widget.metaObject().property(i).name(), str)
                    else widget.metaObject().property(i).name()
                    for i in range(widget.metaObject().propertyCount())
                }
                assert prop.get("name") in known, f"{widget_class} {name} has no property {prop.get('name')}"
            else:
                assert widget.metaObject().indexOfProperty(prop.get("name")) >= 0, (
                    f"{name}.{prop.get('name')}"
                )


def test_every_node_selector_receives_the_scene(tree):
    receivers = {
        c.findtext("receiver")
        for c in tree.iter("connection")
        if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    selectors = {w.get("name") for w in tree.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors and selectors <= receivers


def test_module_file_defines_the_four_classes():
    classes = {
        node.name
        for node in ast.parse(MODULE_FILE.read_text(encoding="utf-8")).body
        if isinstance(node, ast.ClassDef)
    }
    assert {"GaussianSVR", "GaussianSVRWidget", "GaussianSVRLogic", "GaussianSVRTest"} <= classes


# -- parameter definitions ---------------------------------------------------------------------------------


def test_settings_have_tooltips_and_defaults_within_range():
    for spec in params.all_settings():
        assert len(spec.tooltip) > 40, spec.name
        if spec.minimum is not None:
            assert spec.minimum <= spec.default <= spec.maximum, spec.name
        assert isinstance(spec.default, spec.kind), spec.name


def test_presets_match_the_engine_presets():
    from GaussianSVRLib import settings as engine

    names = {"nGaussians": "n_gaussians", "kNeighbours": "k_neighbours", "iterations": "iterations"}
    for preset, values in params.PRESETS.items():
        expected = engine.preset(preset.value)
        assert {k: getattr(expected, names[k]) for k in values} == values, preset
        for key, value in values.items():
            spec = params.setting(key)
            assert spec.minimum <= value <= spec.maximum
    defaults = engine.Settings()
    assert params.setting("scaleRegularization").default == defaults.scale_regularization
    assert params.setting("outputResolution").default == defaults.output_resolution
    assert params.setting("seed").default == defaults.seed
    assert params.setting("coarseToFine").default == defaults.coarse_to_fine


def test_engine_arguments():
    values = {spec.name: spec.default for spec in params.ENGINE_SETTINGS}
    values.update(preset=params.Preset.HIGH, device=params.Device.CUDA, nGaussians=1234, coarseToFine=False)
    arguments = params.engine_arguments(values)
    pairs = {
        flag: value
        for flag, value in zip(arguments, arguments[1:] + [""], strict=True)
        if flag.startswith("--") and not value.startswith("--")
    }
    assert pairs["--preset"] == "high" and pairs["--device"] == "cuda" and pairs["--n-gaussians"] == "1234"
    assert "--no-coarse-to-fine" in arguments
    assert float(pairs["--scale-regularization"]) == params.setting("scaleRegularization").default
    values["coarseToFine"] = True
    assert "--no-coarse-to-fine" not in params.engine_arguments(values)


def test_relative_cost_and_labels():
    assert params.relative_cost(params.PRESETS[params.Preset.STANDARD]) == 1.0
    assert params.relative_cost(params.PRESETS[params.Preset.PREVIEW]) < 0.5
    assert params.relative_cost(params.PRESETS[params.Preset.HIGH]) > 2.0
    assert [p.label() for p in params.Preset] == ["Preview", "Standard", "High quality"]
    assert params.Device.CUDA.label() == "CUDA GPU"


#: The engine modules Slicer's own process may import: the protocol, the settings and the Gaussians file.
SLICER_SIDE_ENGINE_MODULES = {
    "GaussianSVRLib.io.progress",
    "GaussianSVRLib.io.gaussians_file",
    "GaussianSVRLib.settings",
    "GaussianSVRLib.errors",
}


def engine_modules_imported_by_the_module() -> set[str]:
    """Every GaussianSVRLib module that GaussianSVR.py or GaussianSVRSlicer/*.py imports."""
    found = set()
    for path in [MODULE_FILE, *(MODULE_DIR / "GaussianSVRSlicer").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("GaussianSVRLib"):
                for alias in node.names:  # "from GaussianSVRLib.io import progress" imports a module
                    submodule = REPO.joinpath(*node.module.split("."), f"{alias.name}.py").is_file()
                    found.add(f"{node.module}.{alias.name}" if submodule else node.module)
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] not in {"torch", "faiss"}, path
                    if alias.name.startswith("GaussianSVRLib"):
                        found.add(alias.name)
    return found


def test_the_module_imports_no_heavy_engine_module():
    """Slicer's process imports only the light engine modules, and they pull in neither torch nor faiss."""
    imported = engine_modules_imported_by_the_module()
    assert imported and imported <= SLICER_SIDE_ENGINE_MODULES, imported
    probe = "import sys\n" + "".join(f"import {name}\n" for name in sorted(imported))
    probe += "print(sorted(m for m in ('torch', 'faiss', 'numba', 'scipy') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_the_qc_summary_shows_the_qc_picture_in_a_text_browser(tmp_path):
    from GaussianSVRSlicer import report
    from PySide6.QtCore import QUrl
    from PySide6.QtGui import QColor, QImage, QTextDocument
    from PySide6.QtWidgets import QTextBrowser

    _app = QApplication.instance() or QApplication([])
    picture = QImage(60, 30, QImage.Format.Format_RGB32)
    picture.fill(QColor("red"))
    path = tmp_path / "qc picture.png"  # a space: the source must be a proper file URL
    assert picture.save(str(path))
    browser = QTextBrowser()
    browser.setHtml(report.summary_html({"stacks": [], "slices": []}, qc_picture=path))
    browser.resize(600, 400)
    browser.document().setTextWidth(580)
    browser.document().size()  # lays the document out, which loads its images
    source = QUrl(path.resolve().as_uri())
    loaded = browser.document().resource(QTextDocument.ResourceType.ImageResource, source)
    assert loaded is not None and not loaded.isNull()
    assert (loaded.width(), loaded.height()) == (60, 30)
    without = report.summary_html({"stacks": [], "slices": []})
    assert "<img" not in without
