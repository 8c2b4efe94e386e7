"""GaussianSVR: slice-to-volume reconstruction of fetal MRI with 3-D Gaussians, as a Slicer module.

Slicer-facing glue only: the panel, the controller, the logic, the run and the self-test live in
GaussianSVRSlicer. The engine (GaussianSVRLib) runs in a separate PythonSlicer process; this process
never imports torch for a reconstruction.
"""

import importlib
import logging
import sys

import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: The oldest Slicer this module runs in (it ships Python 3.12; Slicer 5.8 ships 3.9, too old).
SUPPORTED_SLICER = (5, 10)
TOO_OLD = (slicer.app.majorVersion, slicer.app.minorVersion) < SUPPORTED_SLICER
OLD_SLICER_MESSAGE = (
    "GaussianSVR needs 3D Slicer {}.{} or newer; this is {}.{}: please update Slicer.".format(
        *SUPPORTED_SLICER, slicer.app.majorVersion, slicer.app.minorVersion
    )
)

LogicBase = object
if not TOO_OLD:  # the helpers need Python 3.10 or newer
    from GaussianSVRSlicer import deps, params, self_test
    from GaussianSVRSlicer.logic import Logic as LogicBase
    from GaussianSVRSlicer.widget import Widget, show_result
    from slicer.parameterNodeWrapper import SlicerParameterNamePropertyName, WithinRange, parameterNodeWrapper

    namespace = params.parameter_namespace(lambda name: getattr(slicer, name), WithinRange)
    GaussianSVRParameterNode = parameterNodeWrapper(type("GaussianSVRParameterNode", (), namespace))


class GaussianSVR(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("GaussianSVR")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Reconstruction")]
        self.parent.dependencies = []
        self.parent.contributors = ["GaussianSVR developers (GaussianSVR project)"]
        self.parent.helpText = _(
            "Slice-to-volume reconstruction of motion-corrupted fetal MRI stacks with 3-D Gaussians and an "
            "analytic slice profile. Add the stacks (with optional brain masks), pick a preset and press "
            "Reconstruct; the volume is previewed while the engine runs in a separate process. See the "
            "README of the GaussianSVR extension."
        )
        if TOO_OLD:
            self.parent.helpText = OLD_SLICER_MESSAGE
        self.parent.acknowledgementText = _(
            "Method after 'Gaussian Splatting for slice-to-volume reconstruction'; test data from CC0 fetal "
            "atlases."
        )


class GaussianSVRWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.panel = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        if TOO_OLD:
            self.layout.addWidget(qt.QLabel(OLD_SLICER_MESSAGE))
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/GaussianSVR.ui"))
        self.layout.addWidget(uiWidget)
        ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        bound = {
            w.property(SlicerParameterNamePropertyName): w
            for w in uiWidget.findChildren(qt.QWidget)
            if w.property(SlicerParameterNamePropertyName)
        }
        self.logic = GaussianSVRLogic()
        self.panel = Widget(ui, self.logic, self.logic.installTorch, bound)
        self.ui = ui
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.panel.set_parameter_node(self.logic.getParameterNode())

    def cleanup(self) -> None:
        """Slicer is closing (or the module is unloaded): end a running worker cleanly."""
        if self.panel is not None:
            self.panel.close()
        self.removeObservers()

    def enter(self) -> None:
        if self.panel is not None and self.panel.parameters is None:
            self.panel.set_parameter_node(self.logic.getParameterNode())

    def onReload(self) -> None:
        helpers = [name for name in sys.modules if name.startswith(("GaussianSVRSlicer.", "GaussianSVRLib."))]
        for name in helpers:  # in import order: a module after those it imports
            importlib.reload(sys.modules[name])
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event) -> None:
        self.panel.close()  # the nodes a running reconstruction would update are going away

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.panel.set_parameter_node(self.logic.getParameterNode())


class GaussianSVRLogic(ScriptedLoadableModuleLogic, LogicBase):
    """Starts and follows reconstructions (GaussianSVRSlicer.logic); usable without the widget."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        LogicBase.__init__(
            self,
            slicer.mrmlScene,
            slicer.app.temporaryPath,
            render_blocker=slicer.util.RenderBlocker,
            show_result=show_result,
        )

    def getParameterNode(self):
        return GaussianSVRParameterNode(super().getParameterNode())

    def installTorch(self) -> bool:
        """Install torch through the PyTorch extension (it asks the user and picks the CUDA build)."""
        import PyTorchUtils

        logic = PyTorchUtils.PyTorchUtilsLogic()
        return (
            logic.installTorch(askConfirmation=True, torchVersionRequirement=f">={deps.TORCH_MINIMUM}")
            is not None
        )


class GaussianSVRTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: a tiny phantom, a few iterations on the CPU (see the README for the command)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        if TOO_OLD:
            self.skipTest(OLD_SLICER_MESSAGE)
        missing = self_test.missing_engine()
        if missing is not None:
            logging.warning(missing)
            self.skipTest(missing)
        self.setUp()
        widget = slicer.util.getModuleWidget("GaussianSVR")  # works without a main window (--testing)
        widget.enter()
        self_test.check_panel(self, widget.panel)
        for check in (self_test.check_reconstruction, self_test.check_cancel):
            self.setUp()
            self.delayDisplay(check.__doc__)
            check(self, GaussianSVRLogic())
        self.delayDisplay("GaussianSVR self-test passed")
