"""The stack table of the module: one row per stack (include box, volume, mask, slice thickness).

The parameter-node wrapper binds no widget to a list of nodes, so the table is wired by hand: the
widget reads ``rows()`` into the parameter node's lists and writes them back with ``set_rows()``.
Needs Slicer's Qt (imported only by GaussianSVR.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import qt
import slicer

from .inputs import default_thickness
from .table_rows import Row

INCLUDE, STACK, MASK, THICKNESS = range(4)
HEADERS = ("Use", "Stack", "Mask", "Thickness")


class StackTable:
    """Wraps the .ui's QTableWidget; ``on_change()`` is called after any edit made in the table."""

    def __init__(self, table, on_change: Callable[[], None]) -> None:
        self.table = table
        self.on_change = on_change
        self._silent = False
        table.setColumnCount(len(HEADERS))
        table.setHorizontalHeaderLabels(list(HEADERS))
        table.horizontalHeader().setSectionResizeMode(STACK, qt.QHeaderView.Stretch)
        table.horizontalHeader().setSectionResizeMode(MASK, qt.QHeaderView.Stretch)
        table.verticalHeader().setVisible(False)

    def rows(self) -> list[Row]:
        return [
            Row(
                self.table.cellWidget(r, STACK).currentNode(),
                self.table.cellWidget(r, MASK).currentNode(),
                float(self.table.cellWidget(r, THICKNESS).value),
                bool(self.table.cellWidget(r, INCLUDE).checked),
            )
            for r in range(self.table.rowCount)
        ]

    def set_rows(self, rows: Sequence[Row]) -> None:
        """Show ``rows`` (from the parameter node) without calling ``on_change``."""
        self._silent = True
        try:
            self.table.setRowCount(0)
            for row in rows:
                self._append(row)
        finally:
            self._silent = False

    def unused_volumes(self, excluded=()) -> list:
        """The scene's scalar volumes (not label maps) that no row holds, nor ``excluded``, in scene order."""
        used = {row.volume for row in self.rows()} | set(excluded)
        candidates = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
        return [n for n in candidates if n not in used and not n.IsA("vtkMRMLLabelMapVolumeNode")]

    def add_row(self, volume=None) -> None:
        """Append a row for ``volume`` (default: the first volume not yet in the table)."""
        if volume is None:
            volume = next(iter(self.unused_volumes()), None)
        thickness = default_thickness(volume) if volume is not None else 1.0
        self._append(Row(volume, None, thickness, True))
        self._changed()

    def add_all_rows(self, excluded=()) -> None:
        """Append a row for every volume not yet in the table nor ``excluded`` (the output volume)."""
        volumes = self.unused_volumes(excluded)
        for volume in volumes:
            self._append(Row(volume, None, default_thickness(volume), True))
        if volumes:
            self._changed()

    def remove_current_row(self) -> None:
        row = self.table.currentRow()
        if row < 0:
            row = self.table.rowCount - 1
        if row >= 0:
            self.table.removeRow(row)
            self._changed()

    def _append(self, row: Row) -> None:
        index = self.table.rowCount
        self.table.insertRow(index)

        include = qt.QCheckBox()
        include.checked = row.include
        include.toolTip = "Use this stack in the reconstruction"
        include.connect("toggled(bool)", lambda _checked: self._changed())

        stack = self._node_selector(["vtkMRMLScalarVolumeNode"], none_enabled=False)
        stack.showChildNodeTypes = False  # label maps are volumes too, but not stacks
        stack.setCurrentNode(row.volume)
        stack.toolTip = "A stack of thick slices; the third axis is the slice axis"

        mask = self._node_selector(
            ["vtkMRMLLabelMapVolumeNode", "vtkMRMLSegmentationNode"], none_enabled=True
        )
        mask.noneDisplay = "No mask"
        mask.setCurrentNode(row.mask)
        mask.toolTip = "Optional brain mask: a label map or a segmentation (its visible segments)"

        thickness = qt.QDoubleSpinBox()
        thickness.decimals = 2
        thickness.minimum = 0.1
        thickness.maximum = 20.0
        thickness.singleStep = 0.5
        thickness.suffix = " mm"
        thickness.value = row.thickness
        thickness.toolTip = (
            "Slice thickness; prefilled from the slice spacing (they differ for gapped or overlapping slices)"
        )
        thickness.connect("valueChanged(double)", lambda _value: self._changed())

        stack.connect(
            "currentNodeChanged(vtkMRMLNode*)", lambda node, box=thickness: self._stack_changed(node, box)
        )
        mask.connect("currentNodeChanged(vtkMRMLNode*)", lambda _node: self._changed())

        self.table.setCellWidget(index, INCLUDE, include)
        self.table.setCellWidget(index, STACK, stack)
        self.table.setCellWidget(index, MASK, mask)
        self.table.setCellWidget(index, THICKNESS, thickness)

    def _node_selector(self, node_types: list[str], none_enabled: bool):
        selector = slicer.qMRMLNodeComboBox()
        selector.nodeTypes = node_types
        selector.noneEnabled = none_enabled
        selector.addEnabled = False
        selector.removeEnabled = False
        selector.renameEnabled = False
        selector.setMRMLScene(slicer.mrmlScene)
        return selector

    def _stack_changed(self, node, thickness_box) -> None:
        if node is not None and not self._silent:
            thickness_box.value = default_thickness(node)
        self._changed()

    def _changed(self) -> None:
        if not self._silent:
            self.on_change()
