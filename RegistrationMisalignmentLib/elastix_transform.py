"""elastix's own transform files (``TransformParameters.N.txt``, written by elastix, itk-elastix and SlicerElastix)
read as an ITK transform, so that a registration made with elastix can be checked against landmarks.

SimpleITK cannot read these files. Transformix (itk-elastix, imported lazily: an optional dependency) samples the
transform, initial transforms included, as a displacement field on the fixed grid the file names, coarsened to at
most ``MAX_FIELD_VOXELS`` samples; the field is interpolated linearly between them. elastix's convention is
ITK's: the transform maps fixed physical points to moving ones (LPS mm). Chains written by elastix 4 and 5, on
any system, are followed.
"""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path, PureWindowsPath

import numpy as np
import SimpleITK as sitk

from RegistrationMisalignmentLib.errors import InputError

MAX_FIELD_VOXELS = 8_000_000
"""Samples of the field at most (192 MB as float64 vectors): a 512 x 512 x 300 CT at 0.7 mm is sampled every
1.5 mm. elastix's B-spline grids are 5-20 mm apart, so linear interpolation between samples moves a point by
hundredths of a mm (``Testing/test_elastix_transform.py``)."""
_INITIAL = re.compile(rb'\(InitialTransformParameters?FileName\s+"([^"]*)"\)')
"""elastix 5 writes InitialTransformParameterFileName, elastix 4 (SimpleElastix, older SlicerElastix) ...Parameters..."""
_DIMENSION = re.compile(rb"\((Fixed|Moving)ImageDimension\s+(\d+)\)")
_MAX_CHAIN = 32


def is_elastix_transform(path: Path) -> bool:
    """Whether ``path`` is an elastix transform parameter file (its ``(Transform "...")`` and
    ``(TransformParameters ...)`` entries), not an ITK transform file."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return b"(TransformParameters" in head and re.search(rb'\(Transform\s+"', head) is not None


def _chain(path: Path) -> list[tuple[Path, bytes]]:
    """The file and its initial transforms' files, last applied first. A name that does not exist as written (the
    folder moved since elastix wrote it) is looked for beside the file that names it."""
    chain, current = [], path
    while True:
        data = current.read_bytes()
        chain.append((current, data))
        named = _INITIAL.search(data)
        if named is None or named.group(1) in (b"", b"NoInitialTransform"):
            return chain
        if len(chain) >= _MAX_CHAIN:
            raise InputError(f"{path}: its initial transforms form a chain of more than {_MAX_CHAIN} files "
                             "(a file that names itself?); fix InitialTransformParameterFileName.")
        text = named.group(1).decode(errors="replace")
        written = Path(text)
        beside = current.parent / PureWindowsPath(text).name  # a Windows path's name too (SlicerElastix there)
        found = written if written.is_absolute() and written.is_file() else beside
        if not found.is_file():
            raise InputError(f"{current}: its initial transform {written} is missing (looked beside it too, as "
                             f"{beside}); put the elastix output folder's TransformParameters files together.")
        current = found


def _coarsened(data: bytes, max_voxels: int) -> bytes:
    """The file's output grid (Size, Spacing) coarsened to at most ``max_voxels`` samples covering the same
    extent (from the same origin)."""
    size = re.search(rb"\(Size\s+([\d\s]+)\)", data)
    spacing = re.search(rb"\(Spacing\s+([-\d.eE+\s]+)\)", data)
    if size is None or spacing is None:
        return data
    n = [int(v) for v in size.group(1).split()]
    s = [float(v) for v in spacing.group(1).split()]
    if math.prod(n) <= max_voxels:
        return data
    factor = (math.prod(n) / max_voxels) ** (1 / len(n))
    while math.prod(math.ceil((k - 1) / factor) + 1 for k in n) > max_voxels:
        factor *= 1.01
    new_size = " ".join(str(math.ceil((k - 1) / factor) + 1) for k in n).encode()
    new_spacing = " ".join(repr(v * factor) for v in s).encode()
    data = data[: size.start()] + b"(Size " + new_size + b")" + data[size.end():]
    spacing = re.search(rb"\(Spacing\s+([-\d.eE+\s]+)\)", data)
    return data[: spacing.start()] + b"(Spacing " + new_spacing + b")" + data[spacing.end():]


def _write_chain(chain: list[tuple[Path, bytes]], folder: Path, max_voxels: int) -> Path:
    """Copies of ``chain``'s files in ``folder``, each naming its copied predecessor (first applied first), the
    last one's grid coarsened (``_coarsened``); returns the last."""
    copies = [folder / f"TransformParameters.{i}.txt" for i in range(len(chain))]
    for i, (_, data) in enumerate(reversed(chain)):
        initial = str(copies[i - 1]).encode() if i else b"NoInitialTransform"
        data = _INITIAL.sub(lambda _: b'(InitialTransformParameterFileName "' + initial + b'")', data)
        copies[i].write_bytes(_coarsened(data, max_voxels) if i == len(chain) - 1 else data)
    return copies[-1]


def read_elastix_transform(path: str | Path, max_voxels: int = MAX_FIELD_VOXELS) -> sitk.Transform:
    """The transform of an elastix ``TransformParameters`` file (initial transforms included) as a
    ``sitk.DisplacementFieldTransform`` mapping fixed to moving physical points (LPS mm).

    The field is sampled by transformix on the file's fixed grid, coarsened to at most ``max_voxels`` samples;
    beyond that grid ITK applies no displacement. Raises ``InputError`` (naming the file and the fix) without
    itk-elastix, for a missing initial transform file, a chain that is not 3-D, or when transformix cannot apply
    the file.
    """
    path = Path(path)
    try:
        import itk
    except ImportError:
        raise InputError(f"{path} is an elastix transform parameter file; reading it needs itk-elastix (pip install "
                         "itk-elastix), or convert it first with transformix (transformix -def all -tp "
                         f"{path.name} -out FOLDER) and give FOLDER/deformationField.nii as --transform.") from None
    chain = _chain(path)
    for file, data in chain:
        dimensions = {int(d) for _, d in _DIMENSION.findall(data)}
        if dimensions != {3}:
            raise InputError(f"{file}: an elastix transform of a {'/'.join(map(str, sorted(dimensions))) or '?'}-D "
                             "registration; a 3-D registration's transform is needed.")
    with tempfile.TemporaryDirectory(prefix="regmis-elastix-") as folder:
        last = _write_chain(chain, Path(folder), max_voxels)
        try:
            parameters = itk.ParameterObject.New()
            parameters.AddParameterFile(str(last))
            field = itk.transformix_deformation_field(itk.image_from_array(np.zeros((2, 2, 2), np.float32)),
                                                      parameters, output_directory=folder, log_to_console=False)
        except (RuntimeError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{path}: transformix could not apply this elastix transform file ({reason}); check "
                             "that it is the TransformParameters file elastix wrote, unedited.") from exc
    return sitk.DisplacementFieldTransform(_to_sitk_field(field))


def _to_sitk_field(field) -> sitk.Image:
    """An ITK vector image (transformix's deformation field) as a SimpleITK float64 vector image, its grid kept."""
    import itk

    vectors = sitk.GetImageFromArray(np.asarray(itk.array_from_image(field), dtype=np.float64), isVector=True)
    vectors.SetSpacing(tuple(float(v) for v in itk.spacing(field)))
    vectors.SetOrigin(tuple(float(v) for v in itk.origin(field)))
    vectors.SetDirection(tuple(float(v) for v in itk.array_from_matrix(field.GetDirection()).ravel()))
    return vectors


__all__ = ["MAX_FIELD_VOXELS", "is_elastix_transform", "read_elastix_transform"]
