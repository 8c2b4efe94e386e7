"""The panel without Slicer's GUI: the controller (what Reconstruct and Cancel do, the installs before a
run, the end of a run) with a fake view and logic, the pip installer with fake workers, the stack table
with stand-ins for Qt's and Slicer's widgets, the run request built from a parameter node, and the
slice views turned to the result (real MRML)."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from GaussianSVRSlicer import deps, logic, nodes, params
from GaussianSVRSlicer.controller import DONT_ASK_KEY, Controller
from GaussianSVRSlicer.inputs import InputProblem
from GaussianSVRSlicer.installer import Installer
from GaussianSVRSlicer.run_state import Outcome, RunState
from GaussianSVRSlicer.runner import EventKind, WorkerEvent
from GaussianSVRSlicer.table_rows import Row, rows_of, same_rows

SCIPY, NUMBA = (next(p for p in deps.PACKAGES if p.distribution == name) for name in ("scipy", "numba"))


class FakeWorker:
    """A pip worker that prints a line and exits with ``code`` on its second poll."""

    def __init__(self, requirement: str, code: int) -> None:
        self.requirement, self.code, self.polls, self.stopped = requirement, code, 0, False

    def poll(self) -> list[WorkerEvent]:
        self.polls += 1
        if self.polls == 1:
            return [WorkerEvent(EventKind.LOG, text=f"Collecting {self.requirement}")]
        return [WorkerEvent(EventKind.EXITED, returncode=self.code)]

    def stop(self, timeout=None):
        self.stopped = True


class FakeView:
    def __init__(self, answers: dict[str, bool] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[tuple] = []
        self.log: list[str] = []
        self.timer = False

    def show_busy(self, busy):
        self.calls.append(("busy", busy))

    def show_progress(self, state):
        self.calls.append(("progress", state.iteration))

    def append_log(self, text):
        self.log.append(text)

    def show_report(self, html):
        self.calls.append(("report", html))

    def show_error(self, text, details=""):
        self.calls.append(("error", text))

    def confirm(self, text, dont_ask_again_key=None):
        self.calls.append(("confirm", text.split(" ")[0], dont_ask_again_key))
        return self.answers.get(text.split(" ")[0], False)

    def start_timer(self):
        self.timer = True

    def stop_timer(self):
        self.timer = False

    def kinds(self) -> list[str]:
        return [call[0] for call in self.calls]


class FakeRun:
    """A session that finishes after ``steps`` polls with the given outcome."""

    def __init__(self, outcome: Outcome, steps: int = 2) -> None:
        self.state = RunState()
        self.state.total = steps
        self.outcome, self.steps = outcome, steps
        self.report = (
            {"stacks": [], "slices": [], "device": "cpu", "timings": {}} if outcome is Outcome.DONE else None
        )
        self.request = SimpleNamespace(stacks=[])
        self.finished = False
        self.cleaned = None

    def poll(self):
        self.state.iteration += 1
        self.state.add_log(f"iteration {self.state.iteration}")
        if self.state.iteration >= self.steps:
            self.finished = True
            self.state.returncode = 0 if self.outcome is Outcome.DONE else 2
            if self.outcome is Outcome.DONE:
                self.state.done = {"cancelled": False}
            else:
                self.state.error = "bad stack"
        return self.state

    def clean_up(self):
        self.cleaned = Path("/work/run-1") if self.outcome is not Outcome.DONE else None
        return self.cleaned


class FakeLogic:
    def __init__(
        self, run: FakeRun | None = None, pip_codes: dict[str, int] | None = None, problem: str = ""
    ) -> None:
        self.run, self.pip_codes, self.problem = run, pip_codes or {}, problem
        self.session = None
        self.started: list = []
        self.cancelled = False
        self.workers: list[FakeWorker] = []

    @property
    def running(self):
        return self.session is not None and not self.session.finished

    def request(self, p):
        if self.problem:
            raise InputProblem(self.problem)
        return ("request", p)

    def start(self, request):
        self.started.append(request)
        self.session = self.run

    def cancel(self):
        self.cancelled = True

    def keep_results(self):
        return {}

    def start_pip(self, requirement):
        worker = FakeWorker(requirement, self.pip_codes.get(requirement.split(">")[0], 0))
        self.workers.append(worker)
        return worker


def environment(torch="2.13.0", extension=True, **packages) -> deps.Environment:
    found = {p.distribution: packages.get(p.distribution, "99") for p in deps.PACKAGES}
    return deps.Environment(torch=torch, pytorch_extension=extension, packages=found, protected={})


def tick_until_done(controller, view, p, limit=20):
    for _ in range(limit):
        if not view.timer:
            return
        controller.tick(p)
    raise AssertionError("the controller never stopped its timer")


# -- the controller -------------------------------------------------------------------------------


def test_reconstruct_runs_follows_and_reports_when_everything_is_there():
    view, fake = FakeView(), FakeLogic(FakeRun(Outcome.DONE, steps=3))
    controller = Controller(view, fake, install_torch=lambda: True, probe=environment)
    controller.press("p")
    assert fake.started == [("request", "p")] and view.timer and ("busy", True) in view.calls
    tick_until_done(controller, view, "p")
    assert view.log == ["iteration 1", "iteration 2", "iteration 3"]
    assert [c for c in view.calls if c[0] == "progress"] == [
        ("progress", 1),
        ("progress", 2),
        ("progress", 3),
    ]
    assert view.kinds()[-2:] == ["report", "busy"] and view.calls[-1] == ("busy", False)
    assert "error" not in view.kinds()


def test_cancel_while_running_asks_the_logic_to_stop():
    view, fake = FakeView(), FakeLogic(FakeRun(Outcome.DONE, steps=100))
    controller = Controller(view, fake, install_torch=lambda: True, probe=environment)
    controller.press("p")
    controller.tick("p")
    controller.press("p")  # the button now says Cancel
    assert fake.cancelled and len(fake.started) == 1


def test_a_failed_run_says_where_its_files_were_kept():
    view, fake = FakeView(), FakeLogic(FakeRun(Outcome.BAD_INPUT))
    controller = Controller(view, fake, install_torch=lambda: True, probe=environment)
    controller.press("p")
    tick_until_done(controller, view, "p")
    errors = [c[1] for c in view.calls if c[0] == "error"]
    assert len(errors) == 1 and "/work/run-1" in errors[0] and fake.run.cleaned is not None


def test_a_problem_with_the_inputs_is_shown_and_nothing_starts():
    view, fake = FakeView(), FakeLogic(problem="Also save to folder is ticked, but no folder is chosen")
    Controller(view, fake, install_torch=lambda: True, probe=environment).press("p")
    assert ("error", "Also save to folder is ticked, but no folder is chosen") in view.calls
    assert not view.timer and fake.started == []


def test_no_torch_and_no_extension_explains_what_to_do():
    view, fake = FakeView(), FakeLogic()
    Controller(
        view, fake, install_torch=lambda: True, probe=lambda: environment(torch=None, extension=False)
    ).press(1)
    assert view.kinds() == ["error"] and "PyTorch" in view.calls[0][1] and fake.started == []
    view, asked = FakeView(), []
    controller = Controller(
        view, fake, install_torch=lambda: asked.append(1) is not None, probe=lambda: environment(torch=None)
    )
    controller.press(1)
    assert asked == [1] and "PyTorch is needed; it was not installed." in view.log and fake.started == []


def test_missing_packages_are_installed_first_and_the_run_starts_after():
    view = FakeView(answers={"scipy": True, "numba": True})
    fake = FakeLogic(FakeRun(Outcome.DONE))
    controller = Controller(
        view, fake, install_torch=lambda: True, probe=lambda: environment(scipy=None, numba=None)
    )
    controller.press("p")
    confirms = [c for c in view.calls if c[0] == "confirm"]
    # the required package is asked without "don't ask again", the optional one with it
    assert confirms == [
        ("confirm", "scipy", None),
        ("confirm", "numba", DONT_ASK_KEY.format(distribution="numba")),
    ]
    assert fake.started == [] and view.timer
    tick_until_done(controller, view, "p")
    assert [w.requirement for w in fake.workers] == [SCIPY.requirement, NUMBA.requirement]
    assert fake.started == [("request", "p")]
    assert f"Collecting {SCIPY.requirement}" in view.log and "numba installed." in view.log


def test_a_declined_optional_package_is_not_offered_again_and_a_declined_required_one_stops():
    view, fake = FakeView(answers={}), FakeLogic(FakeRun(Outcome.DONE))
    controller = Controller(view, fake, install_torch=lambda: True, probe=lambda: environment(numba=None))
    controller.press("p")
    assert fake.started == [("request", "p")] and "numba" in controller.declined
    tick_until_done(controller, view, "p")
    view.calls.clear()
    controller.press("p")
    assert "confirm" not in view.kinds()
    view, fake = FakeView(answers={}), FakeLogic()
    Controller(view, fake, install_torch=lambda: True, probe=lambda: environment(scipy=None)).press("p")
    assert fake.started == [] and "scipy is needed; it was not installed." in view.log


def test_a_required_install_that_fails_stops_with_a_message():
    view = FakeView(answers={"scipy": True})
    fake = FakeLogic(FakeRun(Outcome.DONE), pip_codes={"scipy": 1})
    controller = Controller(view, fake, install_torch=lambda: True, probe=lambda: environment(scipy=None))
    controller.press("p")
    tick_until_done(controller, view, "p")
    assert fake.started == [] and any(
        c[0] == "error" and "scipy could not be installed" in c[1] for c in view.calls
    )


# -- the installer ---------------------------------------------------------------------------------


def test_installer_goes_on_without_a_failed_optional_package_and_stop_declines_the_rest():
    workers, log = [], []

    def start(requirement):
        workers.append(FakeWorker(requirement, 1 if requirement.startswith("numba") else 0))
        return workers[-1]

    installer = Installer(start, log.append)
    installer.begin([NUMBA, SCIPY])
    outcome = None
    while outcome is None:
        outcome = installer.poll()
    assert outcome.can_run and outcome.installed == [SCIPY] and outcome.declined == [NUMBA]
    assert "numba could not be installed; going on without it." in log
    installer.begin([SCIPY, NUMBA])
    stopped = installer.stop()
    assert workers[-1].stopped and stopped.missing_required == SCIPY and stopped.declined == [NUMBA]
    assert not installer.running


# -- the request, from a parameter node ----------------------------------------------------------


def parameters(scene, **changes):
    import slicer

    volumes = [slicer.util.addVolumeFromArray(np.ones((4, 5, 6), np.float32), name=f"s{i}") for i in range(3)]
    values = {spec.name: spec.default for spec in params.all_settings()}
    values.update(stacks=volumes, masks=[None, volumes[0]], thicknesses=[3.0, 2.5, 4.0])
    values.update(
        includeStacks=[True, False], outputVolume=None, gaussiansModel=None, outputFolder="", roi=None
    )
    values.update(changes)
    return SimpleNamespace(**values), volumes


def test_the_request_is_what_the_parameters_say(scene, tmp_path):
    p, volumes = parameters(scene, saveToFolder=True, outputFolder=str(tmp_path), kNeighbours=12)
    request = logic.Logic(scene, tmp_path).request(p)
    assert [s.volume for s in request.stacks] == [volumes[0], volumes[2]]  # the second is not used
    assert [s.mask for s in request.stacks] == [None, None] and [s.thickness for s in request.stacks] == [
        3.0,
        4.0,
    ]
    assert request.settings["kNeighbours"] == 12 and request.output_folder == tmp_path
    assert request.init_gaussians is None and request.roi is None
    assert rows_of(p)[1] == Row(volumes[1], volumes[0], 2.5, False) and same_rows(rows_of(p), rows_of(p))


def test_continuing_needs_a_kept_result(scene, tmp_path):
    p, _ = parameters(scene, continueFromLast=True)
    engine = logic.Logic(scene, tmp_path)
    with pytest.raises(InputProblem, match="no earlier result"):
        engine.request(p)
    engine.kept_path("gaussians").parent.mkdir(parents=True)
    engine.kept_path("gaussians").write_bytes(b"kept")
    assert engine.request(p).init_gaussians == engine.kept_path("gaussians")


# -- the stack table, with stand-ins for Qt and Slicer's widgets ---------------------------------------


class Signal:
    def __init__(self):
        self.slots = []

    def emit(self, *args):
        for slot in self.slots:
            slot(*args)


class FakeWidget:
    """PythonQt style: properties as attributes, ``connect("signal(args)", slot)``."""

    def __init__(self):
        self.signals: dict[str, Signal] = {}

    def connect(self, signal, slot):
        self.signals.setdefault(signal.split("(")[0], Signal()).slots.append(slot)

    def fire(self, signal, *args):
        self.signals.get(signal, Signal()).emit(*args)


class FakeCheckBox(FakeWidget):
    checked = True


class FakeSpinBox(FakeWidget):
    value = 0.0


class FakeCombo(FakeWidget):
    def __init__(self):
        super().__init__()
        self.node = None

    def setMRMLScene(self, scene):
        self.scene = scene

    def currentNode(self):
        return self.node

    def setCurrentNode(self, node):
        self.node = node


class FakeTable:
    def __init__(self):
        self.cells: list[dict[int, object]] = []
        self.rowCount = 0
        self.current = -1

    def setColumnCount(self, n): ...
    def setHorizontalHeaderLabels(self, labels): ...

    def horizontalHeader(self):
        return SimpleNamespace(setSectionResizeMode=lambda *a: None)

    def verticalHeader(self):
        return SimpleNamespace(setVisible=lambda *a: None)

    def insertRow(self, index):
        self.cells.insert(index, {})
        self.rowCount += 1

    def removeRow(self, index):
        del self.cells[index]
        self.rowCount -= 1

    def setRowCount(self, n):
        self.cells, self.rowCount = self.cells[:n], n

    def setCellWidget(self, row, column, widget):
        self.cells[row][column] = widget

    def cellWidget(self, row, column):
        return self.cells[row][column]

    def currentRow(self):
        return self.current


@pytest.fixture
def stack_table(scene, monkeypatch):
    import slicer

    fake_qt = types.SimpleNamespace(QCheckBox=FakeCheckBox, QDoubleSpinBox=FakeSpinBox,
                                    QHeaderView=SimpleNamespace(Stretch=1))  # fmt: skip
    monkeypatch.setitem(sys.modules, "qt", fake_qt)
    monkeypatch.setattr(slicer, "qMRMLNodeComboBox", FakeCombo, raising=False)
    module = importlib.import_module("GaussianSVRSlicer.stack_table")
    yield importlib.reload(module)
    sys.modules.pop("GaussianSVRSlicer.stack_table", None)


def test_the_stack_table_adds_prefills_and_removes_rows(scene, stack_table):
    import slicer

    first = slicer.util.addVolumeFromArray(np.ones((5, 6, 7), np.float32), name="axial")
    first.SetSpacing(0.8, 0.8, 3.3)
    second = slicer.util.addVolumeFromArray(np.ones((5, 6, 7), np.float32), name="coronal")
    second.SetSpacing(0.8, 0.8, 2.5)
    changes = []
    table = stack_table.StackTable(FakeTable(), lambda: changes.append(1))
    table.add_row()
    table.add_row()
    table.add_row()  # no volume is left: an empty row
    rows = table.rows()
    assert [r.volume for r in rows] == [first, second, None] and [r.thickness for r in rows][:2] == [3.3, 2.5]
    assert len(changes) == 3
    table.table.cellWidget(0, stack_table.STACK).setCurrentNode(second)
    table.table.cellWidget(0, stack_table.STACK).fire("currentNodeChanged", second)
    assert table.rows()[0].thickness == 2.5  # the thickness follows the chosen stack's spacing
    table.table.cellWidget(1, stack_table.INCLUDE).checked = False
    table.table.current = 2
    table.remove_current_row()
    assert [(r.volume, r.include) for r in table.rows()] == [(second, True), (second, False)]
    before = len(changes)
    table.set_rows([Row(first, None, 4.0, True)])
    assert len(changes) == before and table.rows() == [Row(first, None, 4.0, True)]  # silent


def test_add_all_stacks_adds_every_volume_not_yet_in_the_table(scene, stack_table):
    import slicer

    volumes = [slicer.util.addVolumeFromArray(np.ones((5, 6, 7), np.float32), name=f"s{i}") for i in range(4)]
    slicer.util.addVolumeFromArray(np.ones((5, 6, 7), np.uint8), nodeClassName="vtkMRMLLabelMapVolumeNode")
    changes = []
    table = stack_table.StackTable(FakeTable(), lambda: changes.append(1))
    table.add_row()
    table.add_all_rows(excluded=[volumes[2]])  # the output volume
    assert [r.volume for r in table.rows()] == [volumes[0], volumes[1], volumes[3]]
    assert len(changes) == 2
    table.add_all_rows()
    table.add_all_rows()  # nothing left: no row, no change
    assert [r.volume for r in table.rows()] == [volumes[0], volumes[1], volumes[3], volumes[2]]
    assert len(changes) == 3


# -- the views turned to the result (real MRML) ----------------------------------------------------


def test_slice_views_turn_to_the_volume_planes(scene):
    import slicer
    from scipy.spatial.transform import Rotation

    volume = slicer.util.addVolumeFromArray(np.ones((4, 5, 6), np.float32), name="result")
    directions = Rotation.from_rotvec([0.3, -0.2, 0.5]).as_matrix()
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = directions * 0.8
    volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    views = [scene.AddNewNodeByClass("vtkMRMLSliceNode") for _ in range(3)]
    for view, orientation in zip(views, ("Axial", "Sagittal", "Coronal"), strict=True):
        view.SetOrientation(orientation)
    nodes.rotate_slice_views(views, volume)
    for view in views:
        slice_to_ras = slicer.util.arrayFromVTKMatrix(view.GetSliceToRAS())[:3, :3]
        # every axis of the view is one of the volume's axes (up to sign)
        cosines = np.abs(slice_to_ras.T @ directions)
        np.testing.assert_allclose(np.sort(cosines, axis=1)[:, -1], 1.0, atol=1e-6)
