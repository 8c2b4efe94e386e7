"""GaussianSVR engine: slice-to-volume reconstruction with 3D Gaussians and an analytic PSF.

Plain Python (torch, numpy, SimpleITK, vtk); no Slicer imports. Data flows one way:
read (stacks) -> initialize (init) -> optimize (optimize) -> export (export).
"""

__version__ = "0.1.0"
