"""The evaluation protocol's registrations, run with itk-elastix (imported lazily: it is a dev extra).

Settings, poor to good (Sokooti et al. 2021): ``affine``, then B-spline with 20, 100, 500 and 2000
iterations per resolution, all with mutual information, adaptive stochastic gradient descent and 3
resolutions. The parameter files live in ``benchmarks/elastix/`` so that anyone can rerun a
setting with the elastix command line (``elastix -p affine.txt -p bspline500.txt``). The affine
stage runs once per case and is the initial transform of every B-spline setting.

A ``Registration`` holds the deformed moving image D(x) = M(T(x)) on the fixed grid and T itself,
which maps fixed physical points (LPS mm) to moving physical points, elastix's convention. Its transform
parameters can be kept (``save_parameters``) and applied again by transformix (``ElastixRunner.apply``): the
same registration in seconds instead of minutes, on any machine.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from RegistrationMisalignmentLib.errors import InputError

ELASTIX_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "elastix"
SETTINGS: tuple[str, ...] = ("affine", "bspline20", "bspline100", "bspline500", "bspline2000")
ELASTIX_T_FILE = "elastix_t.txt"
TINY_ITERATION_DIVISOR = 10
TINY_SPATIAL_SAMPLES = 512
TINY_EXACT_GRADIENT_SAMPLES = 2048
"""ASGD's automatic step-size estimation otherwise reads up to 100 000 voxels: most of a tiny run's time."""
TINY_CHANGES = (f"elastix MaximumNumberOfIterations divided by {TINY_ITERATION_DIVISOR} (at least 1), "
                f"NumberOfSpatialSamples at most {TINY_SPATIAL_SAMPLES} and NumberOfSamplesForExactGradient "
                f"{TINY_EXACT_GRADIENT_SAMPLES}, in every stage and in elastix-t")


def parse_settings(text: str) -> tuple[str, ...]:
    """'affine,bspline500' -> ('affine', 'bspline500'), in the protocol's order; refuses unknown names."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown or not names:
        raise InputError(f"--settings {text!r}: unknown setting(s) {unknown or '(none given)'}; choose a "
                         f"comma-separated subset of {','.join(SETTINGS)}")
    return tuple(s for s in SETTINGS if s in names)


def setting_files(setting: str) -> list[str]:
    """Parameter files of a setting, in the order elastix applies them."""
    return ["affine.txt"] if setting == "affine" else ["affine.txt", f"{setting}.txt"]


@dataclass
class Registration:
    """One elastix result: the deformed moving image on the fixed grid and T (fixed -> moving points)."""

    deformed: sitk.Image
    transform: Any
    """An ITK transform (elastix's combination transform, initial transforms included); None for one applied from
    kept parameters (``ElastixRunner.apply``)."""
    parameters: Any
    """The elastix transform parameter object, to start a later stage from this one."""
    seconds: float

    def displacement(self, moving: sitk.Image) -> np.ndarray:
        """t(x) = T(x) - x on the fixed grid (transformix's deformation field, initial transforms included):
        (3, D, H, W) float32 mm, LPS components (x, y, z), for a fixed image with the identity direction.

        ``moving`` is the registered moving image (transformix reads its type). Transformix writes the field
        to a file too: into a temporary folder here, not the working directory.
        """
        import itk

        with tempfile.TemporaryDirectory(prefix="regmis_transformix_") as folder:
            field = itk.transformix_deformation_field(_to_itk(moving), self.parameters,
                                                      output_directory=folder, log_to_console=False)
            return np.ascontiguousarray(np.moveaxis(itk.array_from_image(field), -1, 0), dtype=np.float32)

    def map_points(self, points_lps: np.ndarray) -> np.ndarray:
        """T(x) for (N, 3) fixed points in LPS mm. Raises ``ValueError`` for a registration without its ITK transform
        (one applied from kept parameters)."""
        if self.transform is None:
            raise ValueError("this registration was applied from kept transform parameters and holds no ITK "
                             "transform to map points with: run ElastixRunner.register for one")
        return np.array([tuple(self.transform.TransformPoint([float(v) for v in p]))
                         for p in np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)]).reshape(-1, 3)


def save_parameters(parameters: Any, path: Path, dtype: type = np.float32) -> None:
    """Keeps an elastix transform parameter object (initial transforms included) in ``path`` (.npz): each map's
    entries as JSON, its TransformParameters as ``dtype``: float32 (a B-spline's coefficients in mm, 0.2-0.5 MB
    for a chest CT's lungs at the protocol's 10 mm grid; it moves a point by less than 1e-4 mm) or float64 (twice
    that; transformix then gives elastix's own result, voxel for voxel)."""
    maps = [{key: list(values) for key, values in dict(parameters.GetParameterMap(i)).items()}
            for i in range(parameters.GetNumberOfParameterMaps())]
    values = {f"map{i}": np.array([float(v) for v in m.pop("TransformParameters", [])], dtype=dtype)
              for i, m in enumerate(maps)}
    with open(path, "wb") as file:  # np.savez would append ".npz" to another suffix
        np.savez_compressed(file, maps=np.array(json.dumps(maps)), **values)


def load_parameters(path: Path) -> Any:
    """The elastix transform parameter object kept by ``save_parameters``. Raises ``InputError`` without
    itk-elastix."""
    try:
        import itk
    except ImportError:
        raise InputError("applying kept elastix transforms needs itk-elastix: pip install itk-elastix") from None
    parameters = itk.ParameterObject.New()
    with np.load(path) as kept:
        for i, entries in enumerate(json.loads(str(kept["maps"]))):
            entries["TransformParameters"] = [repr(float(v)) for v in kept[f"map{i}"]]
            parameters.AddParameterMap(entries)
    return parameters


def _to_itk(image: sitk.Image):
    import itk

    out = itk.image_from_array(np.ascontiguousarray(sitk.GetArrayFromImage(image), dtype=np.float32))
    out.SetSpacing([float(v) for v in image.GetSpacing()])
    out.SetOrigin([float(v) for v in image.GetOrigin()])
    out.SetDirection(itk.matrix_from_array(np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)))
    return out


class ElastixRunner:
    """Reads the parameter files once (with the --tiny changes) and runs the settings of a case."""

    def __init__(self, tiny: bool = False, threads: int | None = None, directory: Path = ELASTIX_DIR):
        try:
            import itk
        except ImportError:
            raise InputError("the benchmark needs itk-elastix: pip install itk-elastix (it is in the dev extra, "
                             "pip install -e '.[dev]')") from None
        if threads:
            itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))
        self.directory = Path(directory)
        self.tiny = tiny
        self._maps: dict[str, Any] = {}

    def parameter_map(self, filename: str):
        """The elastix parameter map of one file of ``directory`` (cached), --tiny changes applied."""
        if filename not in self._maps:
            import itk

            path = self.directory / filename
            if not path.is_file():
                raise InputError(f"elastix parameter file {path} is missing; run the benchmark from a checkout "
                                 "of the repository (benchmarks/elastix/ holds the protocol's files)")
            holder = itk.ParameterObject.New()
            holder.AddParameterFile(str(path))
            parameters = holder.GetParameterMap(0)
            if self.tiny:
                iterations = int(parameters["MaximumNumberOfIterations"][0])
                samples = int(parameters["NumberOfSpatialSamples"][0])
                parameters["MaximumNumberOfIterations"] = [str(max(1, iterations // TINY_ITERATION_DIVISOR))]
                parameters["NumberOfSpatialSamples"] = [str(min(samples, TINY_SPATIAL_SAMPLES))]
                parameters["NumberOfSamplesForExactGradient"] = [str(TINY_EXACT_GRADIENT_SAMPLES)]
            self._maps[filename] = parameters
        return self._maps[filename]

    def register(self, fixed: sitk.Image, moving: sitk.Image, filename: str,
                 initial: Registration | None = None) -> Registration:
        """Register ``moving`` to ``fixed`` with one parameter file, starting from ``initial``."""
        import itk

        start = time.perf_counter()
        parameters = itk.ParameterObject.New()
        parameters.AddParameterMap(self.parameter_map(filename))
        method = itk.ElastixRegistrationMethod.New(_to_itk(fixed), _to_itk(moving))
        method.SetParameterObject(parameters)
        if initial is not None:
            method.SetInitialTransformParameterObject(initial.parameters)
        method.SetLogToConsole(False)
        method.Update()
        deformed = sitk.GetImageFromArray(itk.array_from_image(method.GetOutput()).astype(np.float32))
        deformed.CopyInformation(fixed)
        return Registration(deformed, method.GetCombinationTransform(), method.GetTransformParameterObject(),
                            time.perf_counter() - start)

    def apply(self, fixed: sitk.Image, moving: sitk.Image, parameters: Any) -> Registration:
        """The registration that left transform ``parameters`` (``load_parameters``), applied again by transformix:
        its deformed image on ``fixed``'s grid as ``register`` gave it, without an ITK transform."""
        import itk

        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="regmis_transformix_") as folder:
            output = itk.transformix_filter(_to_itk(moving), parameters, output_directory=folder, log_to_console=False)
        deformed = sitk.GetImageFromArray(itk.array_from_image(output).astype(np.float32))
        deformed.CopyInformation(fixed)
        return Registration(deformed, None, parameters, time.perf_counter() - start)

    def run_settings(self, fixed: sitk.Image, moving: sitk.Image, settings: Iterable[str]) -> dict[str, Registration]:
        """Every requested setting, plus "affine" always: computed once, it starts every B-spline setting.

        A B-spline setting's ``seconds`` are those of its own stage, without the shared affine one.
        """
        results = {"affine": self.register(fixed, moving, "affine.txt")}
        for setting in settings:
            if setting != "affine":
                results[setting] = self.register(fixed, moving, f"{setting}.txt", results["affine"])
        return results


__all__ = ["SETTINGS", "ELASTIX_DIR", "ELASTIX_T_FILE", "TINY_CHANGES", "Registration", "ElastixRunner",
           "load_parameters", "parse_settings", "save_parameters", "setting_files"]
