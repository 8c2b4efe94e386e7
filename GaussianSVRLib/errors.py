"""The engine's errors for expected problems, the signal of a cancelled run, and the exit codes that
tell a caller what happened (the README states them)."""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_INPUT_ERROR = 2
#: The outputs are written, but the stacks could not be brought together (export/report.run_verdict).
EXIT_NOT_ALIGNED = 3
#: gaussiansvr batch: some subjects failed.
EXIT_SOME_FAILED = 4
EXIT_CANCELLED = 130


class InputError(Exception):
    """Bad input that the user can fix: reported as one line naming the file (or flag), exit code 2."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class Cancelled(Exception):
    """The run was asked to stop (a signal, a stop file, a "cancel" line, its reader gone)."""
