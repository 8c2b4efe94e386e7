"""What the module does when the user presses Reconstruct (or Cancel) and while a run goes on, without
Qt: the view and the logic are injected (the Qt widget in Slicer, fakes in the tests).

Before a run it makes sure of the engine's packages (torch through the PyTorch extension, pip for the
others: a required one must be installed, an optional one may be declined, and the user can say
"don't ask again"); then it starts the run, follows it from the view's timer and shows the outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from . import deps, report
from .inputs import InputProblem
from .installer import Installer, Outcome
from .run_state import Outcome as RunOutcome
from .run_state import RunState

#: Where "don't ask again" for an optional package is remembered (Slicer's settings), by distribution.
DONT_ASK_KEY = "GaussianSVR/DontOffer/{distribution}"


class View(Protocol):
    """What the controller needs from the widgets."""

    def show_busy(self, busy: bool) -> None: ...

    def show_progress(self, state: RunState) -> None: ...

    def append_log(self, text: str) -> None: ...

    def show_report(self, html: str) -> None: ...

    def show_error(self, text: str, details: str = "") -> None: ...

    def confirm(self, text: str, dont_ask_again_key: str | None = None) -> bool: ...

    def start_timer(self) -> None: ...

    def stop_timer(self) -> None: ...


class Controller:
    """``press(p)`` on the Reconstruct/Cancel button, ``tick(p)`` on the view's timer; p: the parameters.

    install_torch() asks the PyTorch extension for torch (True when it is there afterwards); probe() says
    what is installed (deps.probe in Slicer); finished(run) is called when a run has ended.
    """

    def __init__(
        self,
        view: View,
        logic: Any,
        install_torch: Callable[[], bool],
        probe: Callable[[], deps.Environment] = deps.probe,
        finished: Callable[[Any], None] | None = None,
    ) -> None:
        self.view, self.logic = view, logic
        self.install_torch, self.probe = install_torch, probe
        self.finished = finished
        self.installer = Installer(logic.start_pip, view.append_log)
        self.declined: set[str] = set()
        self.log_shown = 0

    @property
    def busy(self) -> bool:
        return self.logic.running or self.installer.running

    def press(self, p: Any) -> None:
        if self.busy:
            self.declined |= {package.distribution for package in self.installer.stop().declined}
            self.logic.cancel()
            self.view.show_busy(self.busy)
            return
        installs = self.packages_to_install()
        if installs is None:
            return
        if installs:
            self.installer.begin(installs)
            self.view.start_timer()
            self.view.show_busy(True)
            return
        self.start(p)

    def packages_to_install(self) -> list[deps.Package] | None:
        """The pip installs the user agreed to; None when the run cannot start (a refusal, no torch)."""
        installs = []
        for step in deps.plan(self.probe(), declined=self.declined):
            if step.action is deps.Action.NEED_PYTORCH_EXTENSION:
                self.view.show_error(step.reason)
                return None
            if step.action is deps.Action.INSTALL_TORCH:
                if not self.install_torch():
                    self.view.append_log("PyTorch is needed; it was not installed.")
                    return None
                continue
            package = step.package
            key = None if step.required else DONT_ASK_KEY.format(distribution=package.distribution)
            if self.view.confirm(f"{step.reason}.\n\nInstall it now? Its log appears under Log.", key):
                installs.append(package)
            elif step.required:
                self.view.append_log(f"{package.distribution} is needed; it was not installed.")
                return None
            else:
                self.declined.add(package.distribution)
        return installs

    def start(self, p: Any) -> None:
        try:
            self.logic.start(self.logic.request(p))
        except InputProblem as problem:
            self.view.show_error(str(problem))
            self.view.show_busy(self.busy)
            return
        self.log_shown = 0
        self.view.show_report("Reconstruction running...")
        self.view.start_timer()
        self.view.show_busy(True)

    def tick(self, p: Any) -> None:
        if self.installer.running:
            outcome = self.installer.poll()
            if outcome is not None:
                self.installed(outcome, p)
            return
        run = self.logic.session
        if run is None:
            self.view.stop_timer()
            return
        run.poll()
        self.show_run(run.state)
        if run.finished:
            self.view.stop_timer()
            self.end(run)

    def installed(self, outcome: Outcome, p: Any) -> None:
        self.declined |= {package.distribution for package in outcome.declined}
        if outcome.can_run:
            self.start(p)
            return
        self.view.stop_timer()
        self.view.show_busy(False)
        name = outcome.missing_required.distribution
        self.view.show_error(f"{name} could not be installed; the reconstruction needs it. See the log.")

    def show_run(self, state: RunState) -> None:
        self.view.show_progress(state)
        fresh = min(state.log_total - self.log_shown, len(state.log))
        for line in list(state.log)[len(state.log) - fresh :]:
            self.view.append_log(line)
        self.log_shown = state.log_total

    def end(self, run: Any) -> None:
        """A run has ended: keep what outlives it, show its report or why it failed."""
        if self.finished is not None:
            self.finished(run)
        kept = self.logic.keep_results()
        outcome = run.state.outcome
        if run.report is not None:
            names = [stack.volume.GetName() for stack in run.request.stacks]
            self.view.show_report(report.summary_html(run.report, names, qc_picture=kept.get("qc")))
        elif outcome is not RunOutcome.DONE:
            self.view.show_report("No report: the reconstruction did not finish.")
        work_dir = run.clean_up()
        if outcome is RunOutcome.NOT_ALIGNED:
            self.view.show_error(
                f"The volume is loaded, but {run.state.done.get('verdict') or 'the stacks disagree'}.",
                run.state.failure_details(),
            )
        if outcome in (RunOutcome.FAILED, RunOutcome.BAD_INPUT):
            self.view.show_error(
                f"The reconstruction failed; the scene is as it was before. Its files are in {work_dir}.",
                run.state.failure_details(),
            )
        self.view.show_busy(False)
