"""Slicer-side helpers of the GaussianSVR module.

Everything here imports without a running Slicer application: ``runner``, ``run_state``,
``command``, ``params``, ``deps`` and ``report`` are plain Python; ``nodes``, ``inputs`` and
``session`` use only MRML, vtk, numpy and SimpleITK (they run with the ``slicer-core`` wheel).
Only ``stack_table`` needs Slicer's Qt and is imported by the module's widget alone.
"""

from .engine_path import ensure_engine_importable

# Before any helper imports the engine's light modules (settings, protocol, Gaussians file).
ensure_engine_importable()
