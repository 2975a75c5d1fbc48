"""Python packages the Lib needs inside Slicer, found without importing them and installed on request.

Slicer ships numpy and SimpleITK; the Lib needs torch on top. Installing is never done at import:
the panel asks first (``RegistrationMisalignmentWidget.ensureDependencies``), then calls
``install_packages``. torch goes through the PyTorch Utils extension when it is installed, because
it picks the wheel that matches the computer's CUDA driver; plain pip is the fallback.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Callable

import slicer

REQUIREMENTS: dict[str, str] = {"torch": "torch>=2.1"}
"""Importable module name -> pip requirement, for what Slicer does not ship."""
OPTIONAL: dict[str, str] = {"itk": "itk-elastix>=0.20"}
"""Needed by one feature only (the re-registration check), asked for when that feature is chosen."""


def missing_packages() -> list[str]:
    """Module names from ``REQUIREMENTS`` that cannot be imported here."""
    return [name for name in REQUIREMENTS if importlib.util.find_spec(name) is None]


def missing_elastix() -> bool:
    """Whether itk-elastix (the re-registration check) is missing."""
    from RegistrationMisalignmentLib.checks.reregistration import elastix_installed

    return not elastix_installed()


def python_executable() -> str:
    """The Python for child processes: Slicer's PythonSlicer inside the application, else this interpreter
    (inside Slicer ``sys.executable`` is the application itself)."""
    if getattr(slicer, "app", None) is not None:
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def install_packages(names: list[str], log: Callable[[str], None] = print) -> None:
    """Install the given modules (names from ``REQUIREMENTS`` or ``OPTIONAL``); raises if one stays missing."""
    for name in names:
        requirement = {**REQUIREMENTS, **OPTIONAL}[name]
        log(f"Installing {requirement} (this may take several minutes)...")
        if name == "torch" and importlib.util.find_spec("PyTorchUtils") is not None:
            import PyTorchUtils

            version = requirement.removeprefix("torch")
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                             torchVersionRequirement=version) is None:
                raise RuntimeError("PyTorch Utils could not install torch; install it from the PyTorch Utils module.")
        else:
            slicer.util.pip_install(requirement)
    importlib.invalidate_caches()
    still_missing = [name for name in names if importlib.util.find_spec(name) is None]
    if still_missing:
        raise RuntimeError(f"{', '.join(still_missing)} still cannot be imported after installation; "
                           "restart Slicer and try again.")
