"""GaussianSVR: slice-to-volume reconstruction of fetal MRI with 3-D Gaussians, as a Slicer module.

Glue only: the testable parts live in GaussianSVRSlicer (runner, session, nodes, inputs, params,
deps, report). The engine (GaussianSVRLib) runs in a separate PythonSlicer process; this process
never imports torch or faiss for a reconstruction.
"""

import importlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import qt
import slicer
import vtk
from GaussianSVRSlicer import command
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import (
    SlicerParameterNamePropertyName,
    WithinRange,
    parameterNodeWrapper,
)
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

command.ensure_engine_importable()

from GaussianSVRSlicer import deps, params, phantom, report, runner, session  # noqa: E402
from GaussianSVRSlicer.inputs import InputProblem, StackInput  # noqa: E402
from GaussianSVRSlicer.run_state import Outcome  # noqa: E402
from GaussianSVRSlicer.stack_table import Row, StackTable, same_rows  # noqa: E402

#: Helper modules reloaded by the module's Reload button (leaves first: a module after those it imports).
HELPER_MODULES = (
    "GaussianSVRLib.io.progress",
    "GaussianSVRSlicer.params",
    "GaussianSVRSlicer.command",
    "GaussianSVRSlicer.runner",
    "GaussianSVRSlicer.run_state",
    "GaussianSVRSlicer.deps",
    "GaussianSVRSlicer.report",
    "GaussianSVRSlicer.phantom",
    "GaussianSVRSlicer.nodes",
    "GaussianSVRSlicer.inputs",
    "GaussianSVRSlicer.session",
    "GaussianSVRSlicer.stack_table",
)
TIMER_INTERVAL_MS = 200
PARAMETER_PROPERTY = SlicerParameterNamePropertyName


class GaussianSVR(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("GaussianSVR")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Reconstruction")]
        self.parent.dependencies = []
        self.parent.contributors = ["GaussianSVR developers"]
        self.parent.helpText = _(
            "Slice-to-volume reconstruction of motion-corrupted fetal MRI stacks with 3-D Gaussians and an "
            "analytic slice profile. Add the stacks (with optional brain masks), pick a preset and press "
            "Reconstruct; the volume is previewed while the engine runs in a separate process. "
            "See the README of the GaussianSVR extension."
        )
        self.parent.acknowledgementText = _(
            "Method after 'Gaussian Splatting for slice-to-volume reconstruction'; "
            "test data from CC0 fetal atlases."
        )


GaussianSVRParameterNode = parameterNodeWrapper(
    type(
        "GaussianSVRParameterNode",
        (),
        params.parameter_namespace(lambda name: getattr(slicer, name), WithinRange),
    )
)


class GaussianSVRWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._lastPreset = None
        self._lastStyle = None
        self._writingTable = False
        self._declinedPackages = set()  # optional packages offered once per session
        self._pipQueue = []
        self._pipWorker = None
        self._logShown = 0

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/GaussianSVR.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        bound = {
            w.property(PARAMETER_PROPERTY): w
            for w in uiWidget.findChildren(qt.QWidget)
            if w.property(PARAMETER_PROPERTY)
        }
        for spec in params.all_settings():
            bound[spec.name].toolTip = spec.tooltip

        self.logic = GaussianSVRLogic()
        self.stackTable = StackTable(self.ui.stacksTable, self.onStackTableChanged)
        self.timer = qt.QTimer()
        self.timer.setInterval(TIMER_INTERVAL_MS)
        self.timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.addStackButton.connect("clicked(bool)", lambda _checked: self.stackTable.add_row())
        self.ui.removeStackButton.connect(
            "clicked(bool)", lambda _checked: self.stackTable.remove_current_row()
        )
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Slicer is closing (or the module is unloaded): end a running worker cleanly."""
        self.timer.stop()
        self._stopPip()
        self.logic.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified
            )

    def onReload(self) -> None:
        for name in HELPER_MODULES:
            if name in sys.modules:
                importlib.reload(sys.modules[name])
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic.running:
            self.logic.stop()  # the nodes it would update are going away
            self.timer.stop()
            self._showRunState()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node --------------------------------------------------------------------------

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.stacks:
            self.stackTable.add_row()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified
            )
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._lastPreset = self._parameterNode.preset
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        if p.preset != self._lastPreset:
            self._lastPreset = p.preset
            with slicer.util.NodeModify(p.parameterNode):
                for name, value in params.PRESETS[p.preset].items():
                    setattr(p, name, value)
        if not self._writingTable:
            rows = self._rowsFromParameters()
            if not same_rows(rows, self.stackTable.rows()):
                self.stackTable.set_rows(rows)
        self.ui.costLabel.text = _("{cost:.1f} x Standard").format(
            cost=params.relative_cost(self._settings())
        )
        self.ui.outputFolderButton.enabled = p.saveToFolder
        style = self._glyphStyle()
        if self.logic.session is not None and style != self._lastStyle:
            self.logic.session.restyle_gaussians(style)
        self._lastStyle = style
        self._updateApplyButton()

    def _rowsFromParameters(self) -> list:
        p = self._parameterNode
        n = len(p.stacks)
        masks = list(p.masks) + [None] * (n - len(p.masks))
        thicknesses = list(p.thicknesses) + [1.0] * (n - len(p.thicknesses))
        include = list(p.includeStacks) + [True] * (n - len(p.includeStacks))
        return [Row(p.stacks[i], masks[i], thicknesses[i], include[i]) for i in range(n)]

    def onStackTableChanged(self) -> None:
        p = self._parameterNode
        if p is None:
            return
        rows = self.stackTable.rows()
        self._writingTable = True
        try:
            with slicer.util.NodeModify(p.parameterNode):
                p.stacks = [row.volume for row in rows]
                p.masks = [row.mask for row in rows]
                p.thicknesses = [row.thickness for row in rows]
                p.includeStacks = [row.include for row in rows]
        finally:
            self._writingTable = False

    def _settings(self) -> dict:
        return {spec.name: getattr(self._parameterNode, spec.name) for spec in params.ENGINE_SETTINGS}

    def _glyphStyle(self) -> session.GlyphStyle:
        p = self._parameterNode
        return session.GlyphStyle(p.glyphScale, p.maxGlyphs, p.showGaussians)

    def _updateApplyButton(self) -> None:
        busy = self.logic.running or self._pipWorker is not None
        rows = [row for row in self.stackTable.rows() if row.include and row.volume is not None]
        self.ui.applyButton.text = _("Cancel") if busy else _("Reconstruct")
        self.ui.applyButton.enabled = busy or bool(rows)
        self.ui.applyButton.toolTip = (
            _("Stop the reconstruction (the last preview is kept)")
            if busy
            else _("Run the reconstruction")
            if rows
            else _("Add at least one stack and tick Use")
        )
        for widget in (
            self.ui.inputsCollapsibleButton,
            self.ui.outputsCollapsibleButton,
            self.ui.parametersCollapsibleButton,
        ):
            widget.enabled = not busy

    # -- running ---------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self.logic.running or self._pipWorker is not None:
            self._stopPip()
            self.logic.cancel()
            self._showRunState()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the reconstruction."), waitCursor=True):
            installs = []
            for step in deps.plan(deps.probe(), declined=self._declinedPackages):
                if step.action is deps.Action.NEED_PYTORCH_EXTENSION:
                    raise RuntimeError(step.reason)
                if step.action is deps.Action.INSTALL_TORCH and not self.logic.installTorch():
                    self._log(_("PyTorch is needed; it was not installed."))
                    return
                if step.action is deps.Action.PIP_INSTALL:
                    if slicer.util.confirmYesNoDisplay(
                        _("{reason}.\n\nInstall it now? Its log appears under Log.").format(
                            reason=step.reason
                        )
                    ):
                        installs.append(step.package)
                    elif step.required:
                        self._log(
                            _("{name} is needed; it was not installed.").format(
                                name=step.package.distribution
                            )
                        )
                        return
                    else:
                        self._declinedPackages.add(step.package.distribution)
            if installs:
                self._pipQueue = installs
                self._startNextPip()
                return  # the reconstruction starts when pip has finished
            self._startReconstruction()

    def _startNextPip(self) -> None:
        self.ui.logCollapsibleButton.collapsed = False
        self._log(
            _("Installing {requirement} (Slicer's numpy, vtk and SimpleITK are pinned)...").format(
                requirement=self._pipQueue[0].requirement
            )
        )
        self._pipWorker = self.logic.startPipInstall(self._pipQueue[0].requirement)
        self.timer.start()
        self._updateApplyButton()

    def _stopPip(self) -> None:
        """Cancelled: the optional packages still queued count as offered (declined)."""
        if self._pipWorker is not None:
            self._pipWorker.stop(timeout=2.0)
            self._pipWorker = None
        self._declinedPackages.update(p.distribution for p in self._pipQueue if not p.required)
        self._pipQueue = []

    def _pollPip(self) -> None:
        for event in self._pipWorker.poll():
            if event.kind is runner.EventKind.EXITED:
                self._pipWorker = None
                self._onPipExited(self._pipQueue.pop(0), event.returncode == 0)
                return
            self._log(event.text)

    def _onPipExited(self, package, ok: bool) -> None:
        """Next install, or the reconstruction; a required package that failed stops here."""
        if ok:
            self._log(_("{name} installed.").format(name=package.distribution))
        elif package.required:
            self._pipQueue = []
            self.timer.stop()
            self._updateApplyButton()
            slicer.util.errorDisplay(
                _("{name} could not be installed; the reconstruction needs it. See the log.").format(
                    name=package.distribution
                )
            )
            return
        else:
            self._log(
                _("{name} could not be installed; going on without it.").format(name=package.distribution)
            )
            self._declinedPackages.add(package.distribution)
        if self._pipQueue:
            self._startNextPip()
            return
        self.timer.stop()
        with slicer.util.tryWithErrorDisplay(_("Failed to start the reconstruction."), waitCursor=True):
            self._startReconstruction()

    def _startReconstruction(self) -> None:
        self._log(_("--- reconstruction started {time} ---").format(time=time.strftime("%H:%M:%S")))
        self._logShown = 0
        self.ui.qcTextBrowser.setHtml(_("Reconstruction running..."))
        try:
            self.logic.startReconstruction(self._parameterNode)
        except InputProblem as problem:
            slicer.util.errorDisplay(str(problem))
            return
        self.timer.start()
        self._updateApplyButton()
        self._showRunState()

    def onTimer(self) -> None:
        if self._pipWorker is not None:
            self._pollPip()
            return
        run = self.logic.session
        if run is None:
            self.timer.stop()
            return
        run.poll()
        self._showRunState()
        if run.finished:
            self.timer.stop()
            self._onFinished(run)

    def _showRunState(self) -> None:
        run = self.logic.session
        if run is None:
            return
        state = run.state
        self.ui.progressBar.value = int(round(100 * state.fraction))
        self.ui.progressBar.format = state.progress_text()
        self.ui.statusLabel.text = state.status_text()
        fresh = min(state.log_total - self._logShown, len(state.log))
        for line in list(state.log)[len(state.log) - fresh :]:
            self.ui.logTextEdit.appendPlainText(line)
        self._logShown = state.log_total

    def _onFinished(self, run) -> None:
        p = self._parameterNode
        outcome = run.state.outcome
        if p is not None and outcome in (Outcome.DONE, Outcome.CANCELLED):
            p.outputVolume = run.output_volume
            p.gaussiansModel = run.gaussians_model
        kept = self.logic.keepResults()
        if run.report is not None:
            names = [stack.volume.GetName() for stack in run.request.stacks]
            self.ui.qcTextBrowser.setHtml(report.summary_html(run.report, names, qc_picture=kept.get("qc")))
            self.ui.qcCollapsibleButton.collapsed = False
        elif outcome is not Outcome.DONE:
            self.ui.qcTextBrowser.setHtml(_("No report: the reconstruction did not finish."))
        workDir = run.clean_up()
        if outcome in (Outcome.FAILED, Outcome.BAD_INPUT):
            self.ui.logCollapsibleButton.collapsed = False
            slicer.util.errorDisplay(
                _(
                    "The reconstruction failed; the scene is as it was before. Its files are in {folder}."
                ).format(folder=workDir),
                detailedText=run.state.failure_details(),
            )
        self._updateApplyButton()

    def _log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        logging.info(text)


class GaussianSVRLogic(ScriptedLoadableModuleLogic):
    """Starts and follows reconstructions; usable without the widget (see GaussianSVRTest)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.session = None

    def getParameterNode(self):
        return GaussianSVRParameterNode(super().getParameterNode())

    @property
    def running(self) -> bool:
        return self.session is not None and not self.session.finished

    def request(self, p) -> session.Request:
        """The run request described by a parameter node."""
        n = len(p.stacks)
        stacks = [
            StackInput(p.stacks[i], p.masks[i] if i < len(p.masks) else None, float(p.thicknesses[i]))
            for i in range(n)
            if p.stacks[i] is not None and (i >= len(p.includeStacks) or p.includeStacks[i])
        ]
        folder = session.output_folder(p.saveToFolder, p.outputFolder)
        initGaussians = None
        if p.continueFromLast:
            initGaussians = self.keptPath("gaussians")
            if not initGaussians.is_file():
                raise InputProblem(
                    _(
                        "There is no earlier result to continue from: untick Continue, or run a "
                        "reconstruction first."
                    )
                )
        return session.Request(
            stacks=stacks,
            settings={spec.name: getattr(p, spec.name) for spec in params.ENGINE_SETTINGS},
            output_volume=p.outputVolume,
            gaussians_model=p.gaussiansModel,
            output_folder=folder,
            glyphs=session.GlyphStyle(p.glyphScale, p.maxGlyphs, p.showGaussians),
            init_gaussians=initGaussians,
        )

    def startReconstruction(self, p, request=None):
        """Export the inputs and start the worker; returns the session (poll it, or ``wait()`` on it)."""
        if self.running:
            raise RuntimeError(_("A reconstruction is already running."))
        request = request if request is not None else self.request(p)
        workDir = Path(slicer.app.temporaryPath) / "GaussianSVR" / time.strftime("run-%Y%m%d-%H%M%S")
        firstStack = request.stacks[0].volume if request.stacks else None

        def showPreview(volumeNode):
            slicer.util.setSliceViewerLayers(
                background=firstStack, foreground=volumeNode, foregroundOpacity=0.5, fit=True
            )

        run = session.ReconstructionSession(
            slicer.mrmlScene,
            request,
            workDir,
            python=command.python_command(),
            env=os.environ,
            render_blocker=slicer.util.RenderBlocker,
            on_first_preview=showPreview,
        )
        try:
            run.start()
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        self.session = run  # the previous session is kept until here: its Gaussians can still be restyled
        return run

    def cancel(self) -> None:
        if self.session is not None:
            self.session.cancel()

    def stop(self) -> None:
        if self.session is not None:
            self.session.stop()
            self.removeWorkDir()

    @staticmethod
    def keptPath(kind: str) -> Path:
        """Where the last run's Gaussians ("gaussians") and QC picture ("qc") are kept between runs."""
        name = {"gaussians": "last_gaussians.npz", "qc": "last_qc.png"}[kind]
        return Path(slicer.app.temporaryPath) / "GaussianSVR" / name

    def keepResults(self) -> dict:
        """Keep what outlives the finished run's work folder: the Gaussians to continue from and the
        QC picture. Returns the kept paths by kind."""
        kept = {}
        run = self.session
        if run is None or self.running:
            return kept
        for kind, source in (("gaussians", run.continuable_gaussians), ("qc", run.qc_picture)):
            if source is not None:
                kept[kind] = session.copy_atomically(source, self.keptPath(kind))
        return kept

    def removeWorkDir(self) -> None:
        if self.session is not None and not self.running:
            shutil.rmtree(self.session.work_dir, ignore_errors=True)

    def installTorch(self) -> bool:
        """Install torch through the PyTorch extension (it asks the user and picks the CUDA build)."""
        import PyTorchUtils

        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=True, torchVersionRequirement=f">={deps.TORCH_MINIMUM}"
        )
        return torch is not None

    def startPipInstall(self, requirement: str) -> runner.WorkerProcess:
        """pip-install ``requirement`` in a separate process (Slicer's own packages pinned), started."""
        folder = Path(slicer.app.temporaryPath) / "GaussianSVR"
        folder.mkdir(parents=True, exist_ok=True)
        constraints = folder / "constraints.txt"
        constraints.write_text(deps.constraints_text(deps.probe().protected), encoding="utf-8")
        worker = runner.WorkerProcess(
            [*command.python_command(), *deps.pip_install_arguments(requirement, str(constraints))]
        )
        worker.start()
        return worker


class GaussianSVRTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: a tiny phantom, a few iterations on the CPU (see the README for the command)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_widget_table_and_presets()
        self.setUp()
        self.test_reconstruct_phantom()
        self.setUp()
        self.test_cancel()

    def _request(self, iterations):
        """Three orthogonal 16 x 16 x 10 stacks of the phantom, a mask on the first; tiny CPU settings."""
        stacks = []
        phantomStacks = phantom.orthogonal_stacks(fov_mm=40.0, in_plane_mm=2.5, slice_mm=4.0)
        for index, (voxels, ijkToRAS) in enumerate(phantomStacks):
            name = f"phantom stack {index + 1}"
            node = slicer.util.addVolumeFromArray(voxels, ijkToRAS=ijkToRAS, name=name)
            mask = None
            if index == 0:
                mask = slicer.util.addVolumeFromArray(
                    phantom.head_mask(voxels),
                    ijkToRAS=ijkToRAS,
                    name=f"{name} mask",
                    nodeClassName="vtkMRMLLabelMapVolumeNode",
                )
            stacks.append(StackInput(node, mask, float(node.GetSpacing()[2])))
        settings = {spec.name: spec.default for spec in params.ENGINE_SETTINGS}
        settings.update(
            preset=params.Preset.PREVIEW,
            nGaussians=500,
            kNeighbours=8,
            iterations=iterations,
            device=params.Device.CPU,
            outputResolution=2.5,
            previewInterval=1.0,
        )
        return session.Request(stacks=stacks, settings=settings, glyphs=session.GlyphStyle(1.0, 300, True))

    def test_widget_table_and_presets(self):
        self.delayDisplay("Stack table, parameter node and presets")
        widget = slicer.util.getModuleWidget("GaussianSVR")  # works without a main window (--testing)
        widget.enter()
        volumes = [stack.volume for stack in self._request(iterations=10).stacks]
        widget.stackTable.set_rows([])
        for volume in volumes:
            widget.stackTable.add_row(volume)
        p = widget.logic.getParameterNode()
        self.assertEqual([node.GetID() for node in p.stacks], [node.GetID() for node in volumes])
        self.assertEqual(list(p.thicknesses), [4.0, 4.0, 4.0])  # prefilled from the slice spacing
        p.includeStacks = [True, False, True]
        self.assertEqual([row.include for row in widget.stackTable.rows()], [True, False, True])
        self.assertEqual(len(widget.logic.request(p).stacks), 2)
        p.preset = params.Preset.HIGH
        self.assertEqual(p.nGaussians, params.PRESETS[params.Preset.HIGH]["nGaussians"])
        self.assertEqual(widget.ui.nGaussiansSpinBox.value, p.nGaussians)
        self.assertTrue(widget.ui.applyButton.enabled)
        self.delayDisplay("Widget test passed")

    def test_reconstruct_phantom(self):
        self.delayDisplay("Reconstructing a phantom from three orthogonal stacks")
        logic = GaussianSVRLogic()
        run = logic.startReconstruction(None, self._request(iterations=10))
        state = run.wait(timeout_s=600, process_events=slicer.app.processEvents)
        self.assertEqual(state.outcome, Outcome.DONE, state.failure_details())
        volume = run.output_volume
        self.assertIsNotNone(volume)
        voxels = slicer.util.arrayFromVolume(volume)
        self.assertGreater(float(voxels.max()), 0.0)
        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        for axis in range(3):  # the phantom is centred on the RAS origin
            self.assertLess(bounds[2 * axis], 0.0)
            self.assertGreater(bounds[2 * axis + 1], 0.0)
        self.assertGreater(run.gaussians_model.GetMesh().GetNumberOfPoints(), 0)
        self.assertIsNotNone(run.report)
        self.assertEqual(len(run.report["stacks"]), 3)
        logic.removeWorkDir()
        self.delayDisplay("Reconstruction test passed")

    def test_cancel(self):
        self.delayDisplay("Cancelling a run")
        logic = GaussianSVRLogic()
        run = logic.startReconstruction(None, self._request(iterations=5000))
        deadline = time.monotonic() + 300
        while run.state.iteration < 2 and not run.finished and time.monotonic() < deadline:
            run.poll()
            slicer.app.processEvents()
            time.sleep(0.1)
        logic.cancel()
        state = run.wait(timeout_s=120, process_events=slicer.app.processEvents)
        self.assertEqual(state.outcome, Outcome.CANCELLED, state.failure_details())
        self.assertFalse(run.worker.running)
        logic.removeWorkDir()
        self.delayDisplay("Cancel test passed")
