"""The re-registration's elastix run, as its own process: ``python -m RegistrationMisalignmentLib.checks.elastix_worker``.

itk-elastix holds Python's global interpreter lock for the whole registration and cannot be stopped
once started, so ``reregistration`` runs it here, in a child process: the caller's GUI stays live, its
progress comes from this run's elastix.log, and cancel ends this process. Reads ``fixed.mha`` and
``deformed.mha`` from the work folder, registers them with the parameter file, and writes
``displacement.mha`` (T(x) - x on the fixed grid, LPS mm, float32 vectors: transformix's deformation
field) and elastix.log under ``elastix/``. Exit code 3: itk-elastix is not installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MISSING_ELASTIX = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="work folder with fixed.mha and deformed.mha")
    parser.add_argument("--parameter-file", type=Path, required=True)
    parser.add_argument("--iterations", type=int, help="MaximumNumberOfIterations per resolution (default: the file's)")
    parser.add_argument("--threads", type=int, help="ITK threads (default: all cores)")
    args = parser.parse_args(argv)
    try:
        import itk

        itk.ElastixRegistrationMethod  # noqa: B018 (loads the elastix module, or fails here)
    except (ImportError, AttributeError) as error:
        print(f"itk-elastix is not importable: {error}", file=sys.stderr)
        return MISSING_ELASTIX
    if args.threads:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(args.threads))
    fixed = itk.imread(str(args.folder / "fixed.mha"), itk.F)
    deformed = itk.imread(str(args.folder / "deformed.mha"), itk.F)
    parameters = itk.ParameterObject.New()
    parameters.AddParameterFile(str(args.parameter_file))
    parameter_map = parameters.GetParameterMap(0)
    if args.iterations:
        parameter_map["MaximumNumberOfIterations"] = [str(args.iterations)]
    parameter_map["WriteResultImage"] = ["false"]  # only the transform is used; the registration is unchanged
    parameters.SetParameterMap(0, parameter_map)
    log_folder = args.folder / "elastix"
    log_folder.mkdir(exist_ok=True)
    method = itk.ElastixRegistrationMethod.New(fixed, deformed)
    method.SetParameterObject(parameters)
    method.SetOutputDirectory(str(log_folder))
    method.SetLogToFile(True)
    method.SetLogToConsole(False)
    method.Update()
    field = itk.transformix_deformation_field(deformed, method.GetTransformParameterObject())
    itk.imwrite(field, str(args.folder / "displacement.mha"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
