"""Re-registration residual ("elastix-t"): register the fixed and the registered moving image again, and
see how far the second registration still moves each voxel.

If the first registration were perfect, a second one between F and the deformed moving image D would find
nothing to do; the length of its displacement |u(x)| (mm) is the misalignment it can see, and classed at
3 / 6 mm it is the benchmark's "elastix-t" predictor (``benchmark.study``), which the evaluation protocol
of Sokooti et al. (IEEE Access 2021) also reports: the bar the learned map has to beat. It misses what
elastix cannot see either (uniform regions, motion its B-spline grid cannot follow) and takes minutes.

The registration is the benchmark's own: ``benchmarks/elastix/elastix_t.txt`` (Mattes mutual information,
adaptive stochastic gradient descent, 3 resolutions, B-spline with a final grid of 10 mm, 500 iterations
per resolution), read from the same file (``benchmark.elastix.ELASTIX_DIR``). It runs with itk-elastix, an
optional extra (``pip install itk-elastix``, or ``pip install -e '.[elastix]'``), in a child process
(``elastix_worker``): progress comes from its log, and cancel ends the process.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from RegistrationMisalignmentLib.checks.elastix_worker import MISSING_ELASTIX
from RegistrationMisalignmentLib.checks.fields import on_grid
from RegistrationMisalignmentLib.progress import Reporter
from RegistrationMisalignmentLib.config import DEFAULT_CONFIG, MisalignmentConfig
from RegistrationMisalignmentLib.errors import InputError

ELASTIX_REQUIREMENT = "itk-elastix>=0.20"
INSTALL_HINT = ("install it with `pip install itk-elastix` (or `pip install -e '.[elastix]'` in a checkout); in "
                "Slicer: slicer.util.pip_install('itk-elastix')")
POLL_SECONDS = 0.2
_ITERATION_LINE = re.compile(r"^(\d+)\t")
_RESOLUTION_LINE = re.compile(r"^Resolution: (\d+)")


@dataclass
class Reregistration:
    """The second registration's result on the fixed grid."""

    residual_mm: sitk.Image
    """float32 |u(x)| in mm."""
    classes: sitk.Image
    """uint8 labelmap of |u|: 1 correct [0, 3), 2 poor [3, 6), 3 wrong [6, inf) mm; 0 outside ``mask``."""
    displacement: sitk.Image
    """u(x) = T(x) - x, float32 vectors in LPS mm (T: fixed -> deformed-moving points)."""
    seconds: float


def elastix_installed() -> bool:
    """Whether the itk-elastix distribution is installed in this Python (found without importing it)."""
    try:
        importlib.metadata.version("itk-elastix")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def parameter_file() -> Path:
    """The benchmark's elastix-t parameter file; ``InputError`` when this installation lacks it."""
    from RegistrationMisalignmentLib.benchmark.elastix import ELASTIX_DIR, ELASTIX_T_FILE

    path = ELASTIX_DIR / ELASTIX_T_FILE
    if not path.is_file():
        raise InputError(f"the re-registration's elastix parameter file {path} is missing; run from a checkout of the "
                         "repository or a Slicer build of the extension (both ship benchmarks/elastix/).")
    return path


def _schedule(path: Path, iterations: int | None) -> tuple[int, int]:
    """(resolutions, iterations per resolution) of the parameter file, ``iterations`` overriding its own."""
    text = path.read_text(encoding="utf-8")
    resolutions = re.search(r"^\(NumberOfResolutions (\d+)\)", text, re.M)
    own = re.search(r"^\(MaximumNumberOfIterations (\d+)\)", text, re.M)
    return (int(resolutions.group(1)) if resolutions else 1,
            iterations or (int(own.group(1)) if own else 500))


class _LogProgress:
    """Reads elastix.log as it grows: (resolution, iteration) -> fraction of the whole run."""

    def __init__(self, path: Path, resolutions: int, iterations: int):
        self.path, self.resolutions, self.iterations = path, resolutions, iterations
        self.offset, self.resolution, self.iteration, self.rest = 0, 0, -1, ""

    def read(self) -> tuple[float, str]:
        if not self.path.is_file():
            return 0.0, "re-registration: loading itk-elastix"
        with self.path.open(encoding="utf-8", errors="replace") as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset = f.tell()
        lines = (self.rest + chunk).split("\n")
        self.rest = lines.pop()
        for line in lines:
            if (match := _RESOLUTION_LINE.match(line)) is not None:
                self.resolution, self.iteration = int(match.group(1)), -1
            elif (match := _ITERATION_LINE.match(line)) is not None:
                self.iteration = int(match.group(1))
        done = self.resolution + (self.iteration + 1) / self.iterations
        return (min(done / self.resolutions, 1.0),
                f"re-registration: resolution {self.resolution + 1}/{self.resolutions}, "
                f"iteration {self.iteration + 1}/{self.iterations}")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def reregistration_residual(fixed: sitk.Image, deformed: sitk.Image, *, mask: sitk.Image | None = None,
                            iterations: int | None = None, threads: int | None = None, python: str | None = None,
                            progress: Reporter | None = None, log=None,
                            config: MisalignmentConfig = DEFAULT_CONFIG) -> Reregistration:
    """Re-register ``deformed`` to ``fixed`` with elastix B-spline and return the residual on the fixed grid.

    ``fixed``, ``deformed``: the pair the learned map sees, float32 HU on the same grid (``io.prepare_pair``
    makes them). ``mask``: optional uint8 region on the fixed grid; ``classes`` is 0 outside it.
    ``iterations``: per resolution, instead of the file's 500 (fewer: faster and coarser). ``threads``: ITK
    threads (default all cores). ``python``: the interpreter of the child process (default this one;
    Slicer passes its PythonSlicer). ``progress``: a ``Reporter`` (its cancel ends the child process and
    raises ``PredictionCancelled``). ``log``: told the command and the time taken.
    Raises ``InputError`` when itk-elastix is missing (with how to install it) or the grids differ, and
    ``RuntimeError`` with elastix's last lines when the registration fails.
    """
    report = progress or Reporter()
    if not elastix_installed():  # the child runs this Python or Slicer's PythonSlicer: the same packages
        raise InputError(f"the re-registration check needs itk-elastix ({ELASTIX_REQUIREMENT}), which is not "
                         f"installed; {INSTALL_HINT}.")
    if fixed.GetSize() != deformed.GetSize() or not np.allclose(fixed.GetOrigin(), deformed.GetOrigin(), atol=1e-4):
        raise InputError("re-registration: the registered moving image must lie on the fixed image's grid "
                         "(io.prepare_pair resamples it).")
    if iterations is not None and iterations < 1:
        raise InputError(f"re-registration iterations {iterations}: give a positive number (the file's: 500).")
    path = parameter_file()
    resolutions, per_resolution = _schedule(path, iterations)
    start = time.perf_counter()
    report(0.0, "re-registration: starting elastix")
    with tempfile.TemporaryDirectory(prefix="regmis-reregistration-") as folder:
        work = Path(folder)
        sitk.WriteImage(sitk.Cast(fixed, sitk.sitkFloat32), str(work / "fixed.mha"))
        sitk.WriteImage(sitk.Cast(deformed, sitk.sitkFloat32), str(work / "deformed.mha"))
        command = [python or sys.executable, "-m", "RegistrationMisalignmentLib.checks.elastix_worker", str(work),
                   "--parameter-file", str(path)]
        command += ["--iterations", str(iterations)] if iterations else []
        command += ["--threads", str(threads)] if threads else []
        env = dict(os.environ)
        lib_parent = str(Path(__file__).resolve().parents[2])  # the folder that holds RegistrationMisalignmentLib
        env["PYTHONPATH"] = os.pathsep.join([lib_parent, *filter(None, [env.get("PYTHONPATH")])])
        if log is not None:
            log(f"re-registration: elastix B-spline ({path.name}, {resolutions} resolutions x {per_resolution} "
                "iterations) in a child process")
        reader = _LogProgress(work / "elastix" / "elastix.log", resolutions, per_resolution)
        with open(work / "worker.log", "w", encoding="utf-8") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=folder)
            try:
                while process.poll() is None:
                    time.sleep(POLL_SECONDS)
                    fraction, message = reader.read()
                    report(0.95 * fraction, message)  # raises PredictionCancelled when cancelled
            except BaseException:
                _stop(process)
                raise
        tail = (work / "worker.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        if process.returncode == MISSING_ELASTIX:
            raise InputError(f"the re-registration check needs itk-elastix in {command[0]}; {INSTALL_HINT}. "
                             f"({' '.join(tail)})")
        if process.returncode != 0 or not (work / "displacement.mha").is_file():
            raise RuntimeError(f"elastix re-registration failed (exit code {process.returncode}): {' | '.join(tail)}")
        displacement = sitk.ReadImage(str(work / "displacement.mha"))
    displacement.CopyInformation(fixed)  # the same grid; removes float rounding of the header round trip
    magnitude = np.linalg.norm(sitk.GetArrayViewFromImage(displacement).astype(np.float64), axis=-1)
    labels = np.asarray(config.label_values, dtype=np.uint8)[config.classify_mm(magnitude)]
    if mask is not None:
        labels[sitk.GetArrayViewFromImage(mask) == 0] = config.label_outside
    classes = sitk.GetImageFromArray(labels)
    classes.CopyInformation(fixed)
    seconds = time.perf_counter() - start
    if log is not None:
        log(f"re-registration: {seconds:.1f} s")
    report(1.0, "re-registration: done")
    return Reregistration(on_grid(magnitude, fixed), classes, sitk.Cast(displacement, sitk.sitkVectorFloat32),
                          seconds)


__all__ = ["ELASTIX_REQUIREMENT", "Reregistration", "elastix_installed", "parameter_file", "reregistration_residual"]
