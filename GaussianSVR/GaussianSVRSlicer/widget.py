"""The module's panel: the .ui's widgets bound to the parameter node, the stack table, and the Qt side
of the controller's View (buttons, progress, log, report, dialogs, the timer). Needs Slicer's Qt;
what it does lives in controller.py, logic.py and session.py.
"""

from __future__ import annotations

import logging

import qt
import slicer
import vtk

from . import nodes, params
from .controller import Controller
from .logic import engine_values, glyph_style
from .run_state import RunState
from .stack_table import StackTable
from .table_rows import rows_of, same_rows

TIMER_INTERVAL_MS = 200


class Widget:
    """The panel of ``ui`` (from slicer.util.childWidgetVariables) driving ``logic``.

    install_torch: asks the PyTorch extension for torch. Call ``set_parameter_node`` when the module is
    entered or the scene changes, ``close`` when Slicer or the module goes away.
    """

    def __init__(self, ui, logic, install_torch, bound_widgets) -> None:
        self.ui, self.logic = ui, logic
        self.parameters = None
        self.gui_tag = None
        self.observer = None
        self.last_preset = None
        self.last_style = None
        self.writing_table = False
        for spec in params.all_settings():
            bound_widgets[spec.name].toolTip = spec.tooltip
        self.controller = Controller(self, logic, install_torch)
        self.table = StackTable(self.ui.stacksTable, self.table_changed)
        self.timer = qt.QTimer()
        self.timer.setInterval(TIMER_INTERVAL_MS)
        self.timer.connect("timeout()", lambda: self.controller.tick(self.parameters))
        self.ui.applyButton.connect("clicked(bool)", lambda _checked: self.controller.press(self.parameters))
        self.ui.addStackButton.connect("clicked(bool)", lambda _checked: self.table.add_row())
        self.ui.addAllStacksButton.connect("clicked(bool)", lambda _checked: self.add_all_stacks())
        self.ui.removeStackButton.connect("clicked(bool)", lambda _checked: self.table.remove_current_row())

    def add_all_stacks(self) -> None:
        output = self.parameters.outputVolume if self.parameters is not None else None
        self.table.add_all_rows(excluded=[output] if output is not None else [])

    # -- the parameter node ------------------------------------------------------------------------

    def set_parameter_node(self, node) -> None:
        if self.parameters is not None:
            self.parameters.disconnectGui(self.gui_tag)
            self.parameters.parameterNode.RemoveObserver(self.observer)
        self.parameters = node
        if node is None:
            return
        self.last_preset = node.preset
        self.gui_tag = node.connectGui(self.ui)
        self.observer = node.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, self.parameters_changed)
        if not node.stacks:
            self.table.add_row()
        self.parameters_changed()

    def parameters_changed(self, *_args) -> None:
        p = self.parameters
        if p is None:
            return
        if p.preset != self.last_preset:
            self.last_preset = p.preset
            with slicer.util.NodeModify(p.parameterNode):
                for name, value in params.PRESETS[p.preset].items():
                    setattr(p, name, value)
        if not self.writing_table:
            rows = rows_of(p)
            if not same_rows(rows, self.table.rows()):
                self.table.set_rows(rows)
        self.ui.costLabel.text = f"{params.relative_cost(engine_values(p)):.1f} x Standard"
        self.ui.outputFolderButton.enabled = p.saveToFolder
        style = glyph_style(p)
        if self.logic.session is not None and style != self.last_style:
            self.logic.session.restyle_gaussians(style)
        self.last_style = style
        self.show_busy(self.controller.busy)

    def table_changed(self) -> None:
        p = self.parameters
        if p is None:
            return
        rows = self.table.rows()
        self.writing_table = True
        try:
            with slicer.util.NodeModify(p.parameterNode):
                p.stacks = [row.volume for row in rows]
                p.masks = [row.mask for row in rows]
                p.thicknesses = [row.thickness for row in rows]
                p.includeStacks = [row.include for row in rows]
        finally:
            self.writing_table = False

    def close(self) -> None:
        self.timer.stop()
        self.controller.installer.stop()
        self.logic.stop()
        self.set_parameter_node(None)

    # -- the controller's View -----------------------------------------------------------------------

    def show_busy(self, busy: bool) -> None:
        ready = any(row.include and row.volume is not None for row in self.table.rows())
        self.ui.applyButton.text = "Cancel" if busy else "Reconstruct"
        self.ui.applyButton.enabled = busy or ready
        self.ui.applyButton.toolTip = (
            "Stop the reconstruction (the last preview is kept)"
            if busy
            else "Run the reconstruction"
            if ready
            else "Add at least one stack and tick Use"
        )
        for section in (
            self.ui.inputsCollapsibleButton,
            self.ui.outputsCollapsibleButton,
            self.ui.parametersCollapsibleButton,
        ):
            section.enabled = not busy

    def show_progress(self, state: RunState) -> None:
        self.ui.progressBar.value = int(round(100 * state.fraction))
        self.ui.progressBar.format = state.progress_text()
        self.ui.statusLabel.text = state.status_text()

    def append_log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def show_report(self, html: str) -> None:
        self.ui.qcTextBrowser.setHtml(html)
        self.ui.qcCollapsibleButton.collapsed = False

    def show_error(self, text: str, details: str = "") -> None:
        self.ui.logCollapsibleButton.collapsed = False
        logging.error(text)
        slicer.util.errorDisplay(text, detailedText=details) if details else slicer.util.errorDisplay(text)

    def confirm(self, text: str, dont_ask_again_key: str | None = None) -> bool:
        options = {"dontShowAgainSettingsKey": dont_ask_again_key} if dont_ask_again_key else {}
        return slicer.util.confirmYesNoDisplay(text, **options)

    def start_timer(self) -> None:
        self.ui.logCollapsibleButton.collapsed = False
        self.timer.start()

    def stop_timer(self) -> None:
        self.timer.stop()


def show_result(volume, first_stack) -> None:
    """The first preview: the volume over the first stack, the slice views turned to its planes."""
    slicer.util.setSliceViewerLayers(
        background=first_stack, foreground=volume, foregroundOpacity=0.5, fit=True
    )
    nodes.rotate_slice_views(slicer.util.getNodesByClass("vtkMRMLSliceNode"), volume)
