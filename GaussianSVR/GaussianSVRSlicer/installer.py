"""The pip installs before a run: one package after the other, each in its own process, followed from
the widget's timer. Plain Python: the worker is injected (runner.WorkerProcess in Slicer, a fake in
the tests).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .deps import Package
from .runner import EventKind, WorkerEvent


class Worker(Protocol):
    def poll(self) -> list[WorkerEvent]: ...

    def stop(self, timeout: float | None = None) -> int | None: ...


@dataclass
class Outcome:
    """How a queue of installs ended: what was installed, and what could not be (``missing_required``
    stops the run; ``declined`` are optional packages the run goes on without)."""

    installed: list[Package] = field(default_factory=list)
    declined: list[Package] = field(default_factory=list)
    missing_required: Package | None = None

    @property
    def can_run(self) -> bool:
        return self.missing_required is None


class Installer:
    """Installs a queue of packages. ``start(requirement)`` starts a pip worker; ``log(text)`` receives
    pip's output and the installer's own lines. Call ``poll()`` until it returns the Outcome."""

    def __init__(self, start: Callable[[str], Worker], log: Callable[[str], None]) -> None:
        self.start = start
        self.log = log
        self.queue: list[Package] = []
        self.worker: Worker | None = None
        self.outcome = Outcome()

    @property
    def running(self) -> bool:
        return self.worker is not None

    def begin(self, packages: Sequence[Package]) -> None:
        self.queue, self.outcome = list(packages), Outcome()
        self._next()

    def _next(self) -> None:
        package = self.queue[0]
        self.log(f"Installing {package.requirement} (Slicer's numpy, vtk and SimpleITK are pinned)...")
        self.worker = self.start(package.requirement)

    def poll(self) -> Outcome | None:
        """Pass on the worker's lines; returns the Outcome once the queue is done (or a required package
        failed), else None."""
        if self.worker is None:
            return None
        for event in self.worker.poll():
            if event.kind is EventKind.EXITED:
                return self._exited(event.returncode == 0)
            if event.text:
                self.log(event.text)
        return None

    def _exited(self, ok: bool) -> Outcome | None:
        package = self.queue.pop(0)
        self.worker = None
        if ok:
            self.log(f"{package.distribution} installed.")
            self.outcome.installed.append(package)
        elif package.required:
            self.log(f"{package.distribution} could not be installed; the reconstruction needs it.")
            self.outcome.missing_required = package
            self.outcome.declined += [p for p in self.queue if not p.required]
            self.queue = []
            return self.outcome
        else:
            self.log(f"{package.distribution} could not be installed; going on without it.")
            self.outcome.declined.append(package)
        if self.queue:
            self._next()
            return None
        return self.outcome

    def stop(self) -> Outcome:
        """Cancel: the running install is stopped; what is still queued counts as declined (or missing)."""
        if self.worker is not None:
            self.worker.stop(timeout=2.0)
            self.worker = None
        for package in self.queue:
            if package.required and self.outcome.missing_required is None:
                self.outcome.missing_required = package
            elif not package.required:
                self.outcome.declined.append(package)
        self.queue = []
        return self.outcome
