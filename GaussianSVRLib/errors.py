"""The engine's errors for expected problems, and the signal of a cancelled run."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input that the user can fix: reported as one line naming the file (or flag), exit code 2."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class Cancelled(Exception):
    """The run was asked to stop (a signal, a stop file, a "cancel" line, its reader gone)."""
