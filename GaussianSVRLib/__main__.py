"""python -m GaussianSVRLib: the command line (how the Slicer module starts the worker)."""

import sys

from .cli import main

sys.exit(main())
