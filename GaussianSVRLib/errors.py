"""The engine's error for expected mistakes in the user's input."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input that the user can fix: reported as one line naming the file, exit code 2."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
