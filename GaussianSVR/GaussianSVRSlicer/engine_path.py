"""Where the engine package is, so that the module's helpers can import its light modules (the
settings, the progress protocol, the Gaussians file) in Slicer's process.

The package may sit in Slicer's qt-scripted-modules folder (installed extension) or beside this
module's folder (source tree loaded with --additional-module-paths). Imports nothing of the engine.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ENGINE_PACKAGE = "GaussianSVRLib"


def find_engine_dir(module_dir: Path | None = None) -> Path:
    """The folder that holds the GaussianSVRLib package (without importing it).

    Looks it up on sys.path first (installed extension, or tests), then in the source tree layout
    (``<repo>/GaussianSVR/GaussianSVRSlicer`` beside ``<repo>/GaussianSVRLib``).
    """
    spec = importlib.util.find_spec(ENGINE_PACKAGE)
    if spec is not None and spec.origin is not None:
        return Path(spec.origin).resolve().parent.parent
    here = Path(__file__).resolve().parent if module_dir is None else module_dir
    for candidate in (here.parent, here.parent.parent):
        if (candidate / ENGINE_PACKAGE / "__init__.py").is_file():
            return candidate
    raise FileNotFoundError(f"the {ENGINE_PACKAGE} package was not found: reinstall the GaussianSVR module")


def ensure_engine_importable() -> Path:
    """Put the engine's folder on sys.path if it is not there (source tree layout); returns the folder."""
    engine_dir = find_engine_dir()
    if importlib.util.find_spec(ENGINE_PACKAGE) is None:
        sys.path.append(str(engine_dir))
    return engine_dir
