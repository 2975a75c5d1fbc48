"""RegistrationMisalignmentLib: voxel-wise registration misalignment prediction for chest CT.

Pure Python (torch, SimpleITK, numpy). Never imports slicer, qt or vtk, so that the same code
serves the Slicer module, the ``regmis`` command line, the trainer and the benchmarks.
"""

from RegistrationMisalignmentLib.config import DEFAULT_CONFIG, MisalignmentConfig
from RegistrationMisalignmentLib.errors import InputError, PredictionCancelled

__all__ = ["DEFAULT_CONFIG", "MisalignmentConfig", "InputError", "PredictionCancelled"]
__version__ = "0.1.0"
