"""What the module knows about a running reconstruction, built from the worker's events.

Pure Python: the session feeds it events and the widget reads progress, status and outcome from it.
``Throttle`` spaces the expensive scene updates (at most one per interval).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .runner import EventKind, WorkerEvent

#: Exit code of the engine for bad input (one-line message on stderr and an "error" message).
EXIT_BAD_INPUT = 2
#: Exit code of the engine when it wrote its outputs but could not bring the stacks together.
EXIT_NOT_ALIGNED = 3


class Outcome(enum.Enum):
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    BAD_INPUT = "bad input"
    FAILED = "failed"
    #: Finished with its outputs, but the stacks could not be brought together (the volume is suspect).
    NOT_ALIGNED = "not aligned"


#: The outcomes that leave a result to show.
WITH_RESULT = (Outcome.DONE, Outcome.NOT_ALIGNED)


def format_duration(seconds: float | None) -> str:
    """'1 h 02 min', '3 min 05 s', '42 s' or '?' for an unknown duration."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


@dataclass
class RunState:
    """Progress and outcome of one run. ``checkpoint`` holds the latest checkpoint not yet shown."""

    log_lines: int = 200
    device: str | None = None
    iteration: int = 0
    total: int = 0
    loss: float | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None
    stage: str | None = None
    checkpoint: dict[str, Any] | None = None
    done: dict[str, Any] | None = None
    error: str | None = None
    protocol_error: str | None = None
    returncode: int | None = None
    cancel_requested: bool = False
    log: deque[str] = field(default_factory=deque)
    log_total: int = 0  # lines ever added (``log`` keeps the last ``log_lines``)

    def __post_init__(self) -> None:
        self.log = deque(self.log, maxlen=self.log_lines)

    def add_log(self, text: str) -> None:
        self.log.append(text)
        self.log_total += 1

    def handle(self, event: WorkerEvent) -> None:
        if event.kind is EventKind.LOG:
            self.add_log(event.text)
        elif event.kind is EventKind.PROTOCOL_ERROR:
            self.add_log(event.text)
            if self.protocol_error is None:
                self.protocol_error = event.text
        elif event.kind is EventKind.EXITED:
            self.returncode = event.returncode
        else:
            self._handle_message(event.message)

    def _handle_message(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "started":
            self.device = message.get("device")
            self.total = int(message.get("total") or 0)
        elif kind == "progress":
            self.iteration = int(message.get("iter", self.iteration))
            self.total = int(message.get("total") or self.total)
            self.loss = message.get("loss")
            self.eta_s = message.get("eta_s")
            self.elapsed_s = message.get("elapsed_s", self.elapsed_s)
            self.stage = message.get("stage", self.stage)
        elif kind == "checkpoint":
            self.checkpoint = message
        elif kind == "done":
            self.done = message
            self.elapsed_s = message.get("elapsed_s", self.elapsed_s)
            self.eta_s = 0.0
        elif kind == "error":
            self.error = str(message.get("message", "unknown error"))
            self.add_log(f"error: {self.error}")

    @property
    def finished(self) -> bool:
        return self.returncode is not None

    @property
    def outcome(self) -> Outcome:
        if self.returncode is None:
            return Outcome.RUNNING
        if self.protocol_error is not None:
            return Outcome.FAILED
        if self.cancel_requested or (self.done is not None and self.done.get("cancelled")):
            return Outcome.CANCELLED
        if self.returncode == 0 and self.done is not None and self.error is None:
            return Outcome.DONE
        if self.returncode == EXIT_NOT_ALIGNED and self.done is not None and self.error is None:
            return Outcome.NOT_ALIGNED
        if self.returncode == EXIT_BAD_INPUT:
            return Outcome.BAD_INPUT
        return Outcome.FAILED

    @property
    def fraction(self) -> float:
        """Share of the iterations done, in [0, 1]."""
        if self.done is not None:
            return 1.0
        return min(1.0, self.iteration / self.total) if self.total > 0 else 0.0

    def progress_text(self) -> str:
        """'iteration 120 / 400, about 2 min 10 s left'."""
        if self.total <= 0:
            return "starting"
        text = f"iteration {self.iteration} / {self.total}"
        if self.done is None and self.eta_s is not None:
            text += f", about {format_duration(self.eta_s)} left"
        return text

    def status_text(self) -> str:
        """'Running on cpu, 1 min 05 s elapsed' (or the outcome once finished)."""
        device = self.device or "?"
        elapsed = format_duration(self.elapsed_s)
        outcome = self.outcome
        if outcome is Outcome.RUNNING:
            if self.cancel_requested:
                return f"Cancelling (device {device}, {elapsed} elapsed)"
            stage = f", {self.stage}" if self.stage else ""
            return f"Running on {device}{stage}, {elapsed} elapsed"
        if outcome is Outcome.DONE:
            return f"Done on {device} in {elapsed}"
        if outcome is Outcome.CANCELLED:
            return f"Cancelled after {elapsed}"
        if outcome is Outcome.NOT_ALIGNED:
            verdict = self.done.get("verdict") or "the stacks disagree"
            return f"Finished on {device} in {elapsed}, but {verdict}"
        return f"{outcome.value.capitalize()}: {self.failure_summary()}"

    def failure_summary(self) -> str:
        """One line on why the run failed."""
        if self.protocol_error is not None:
            return (
                f"{self.protocol_error}. The module and the engine are from different versions: "
                "reinstall the GaussianSVR extension."
            )
        if self.error is not None:
            return self.error
        return f"the engine stopped with exit code {self.returncode}"

    def failure_details(self, lines: int = 20) -> str:
        """The summary followed by the last log lines, for an error dialog."""
        tail = list(self.log)[-lines:]
        return self.failure_summary() + ("\n\nLast log lines:\n" + "\n".join(tail) if tail else "")


@dataclass
class Throttle:
    """Allows an action at most once per ``interval_s`` (the first call is always allowed)."""

    interval_s: float = 2.0
    clock: Callable[[], float] = time.monotonic
    _last: float | None = None

    def ready(self) -> bool:
        return self._last is None or self.clock() - self._last >= self.interval_s

    def mark(self) -> None:
        self._last = self.clock()
