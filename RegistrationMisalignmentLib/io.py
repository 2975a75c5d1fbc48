"""Read, check, align and write images, turning every problem the user can fix into ``InputError``.

Everything downstream (preprocess, inference, metrics) assumes a finite, scalar, 3-D float image and
a moving image on the fixed image's grid. Checking that here, once, means a bad input stops with a
sentence that names the input and the fix instead of a traceback from deep inside the network code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from RegistrationMisalignmentLib.errors import InputError

MIN_SPACING_MM = 0.05
"""Spacings at or below this are almost always metres or a broken header, not a real CT."""
MAX_SPACING_MM = 20.0
"""Coarser than this leaves nothing for a 1 mm network to look at."""
MIN_EXTENT_MM = 16.0
"""The finest network patch needs at least this much anatomy along every axis."""
MIN_OVERLAP_FRACTION = 0.10
"""Below this share of the fixed volume, the pair is almost certainly not the same anatomy."""

_COMPLEX_TYPES = (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)


def _sitk_reason(error: Exception) -> str:
    """The last line of a SimpleITK exception: the readable part, without the C++ file and line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _read_dicom_folder(folder: Path, name: str) -> sitk.Image:
    """Read the largest DICOM series in ``folder`` (scanners often add a scout or dose report)."""
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise InputError(
            f"{name}: the folder '{folder}' holds no DICOM series; give a folder of DICOM slices "
            "or an image file (.nii.gz, .nrrd, .mha)."
        )
    file_lists = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(max(file_lists, key=len))
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise InputError(
            f"{name}: the DICOM series in '{folder}' could not be read ({_sitk_reason(error)}); "
            "check that the slices are complete, or export the series to NIfTI/NRRD."
        ) from error


def read_image(path: str | os.PathLike, name: str = "image") -> sitk.Image:
    """Read any image file SimpleITK understands, or a folder holding a DICOM series."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{name}: '{path}' was not found; check the path and spelling.")
    if path.is_dir():
        return _read_dicom_folder(path, name)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(
            f"{name}: '{path}' could not be read as an image ({_sitk_reason(error)}); give a "
            "NIfTI, NRRD, MHA or other SimpleITK-readable file, or a DICOM folder."
        ) from error


def validate_image(image: sitk.Image, name: str) -> None:
    """Raise ``InputError`` unless ``image`` is a finite, non-constant, scalar 3-D CT of usable size."""
    dimension = image.GetDimension()
    if dimension != 3:
        raise InputError(f"{name} is {dimension}-D; a 3-D volume is required (not a single slice or time series).")
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1 or image.GetPixelID() in _COMPLEX_TYPES:
        kind = "complex" if components == 1 else f"{components}-component (vector/colour)"
        raise InputError(f"{name} has {kind} voxels; give a scalar grey-value (CT) image.")
    size = image.GetSize()
    if 0 in size:
        raise InputError(f"{name} is empty (size {size}); give an image that contains voxels.")
    spacing = image.GetSpacing()
    for axis, value in zip("xyz", spacing):
        if not MIN_SPACING_MM < value <= MAX_SPACING_MM:
            raise InputError(
                f"{name} has voxel spacing {value:g} mm along {axis} (spacing {_fmt(spacing)} mm), outside "
                f"({MIN_SPACING_MM:g}, {MAX_SPACING_MM:g}] mm; fix the spacing in the file header "
                "(is it in metres?)."
            )
    extent = np.asarray(size) * np.asarray(spacing)
    for axis, value in zip("xyz", extent):
        if value < MIN_EXTENT_MM:
            raise InputError(
                f"{name} is only {value:.3g} mm along {axis} (extent {_fmt(extent)} mm): too small for one "
                f"patch; give a volume at least {MIN_EXTENT_MM:g} mm in every direction."
            )
    values = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(values.dtype, np.floating):
        nan_count = int(np.isnan(values).sum())
        inf_count = int(np.isinf(values).sum())
        if nan_count or inf_count:
            raise InputError(
                f"{name} contains {nan_count} NaN and {inf_count} Inf voxels; replace them (e.g. with -1000 HU) "
                "before running."
            )
    if values.min() == values.max():
        raise InputError(
            f"{name} is constant (every voxel is {values.flat[0]}); it is blank, give an image with content."
        )


def _geometry_differences(a: sitk.Image, b: sitk.Image, tol: float) -> list[str]:
    """What differs between the two grids, as short phrases (empty when the grids are the same)."""
    if a.GetDimension() != b.GetDimension():
        return [f"dimension {a.GetDimension()} vs {b.GetDimension()}"]
    differences = []
    if a.GetSize() != b.GetSize():
        differences.append(f"size {a.GetSize()} vs {b.GetSize()}")
    for label, getter in (
        ("spacing", sitk.Image.GetSpacing),
        ("origin", sitk.Image.GetOrigin),
        ("direction", sitk.Image.GetDirection),
    ):
        va, vb = getter(a), getter(b)
        if not np.allclose(va, vb, rtol=tol, atol=tol):
            differences.append(f"{label} {_fmt(va)} vs {_fmt(vb)}")
    return differences


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """True when size, spacing, origin and direction agree (``tol`` absorbs float32 header round-off)."""
    return not _geometry_differences(a, b, tol)


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS box (min, max) around the outer voxel corners, in mm."""
    size = image.GetSize()
    corners = np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint(
                [n - 0.5 if (corner >> axis) & 1 else -0.5 for axis, n in enumerate(size)]
            )
            for corner in range(2 ** image.GetDimension())
        ]
    )
    return corners.min(axis=0), corners.max(axis=0)


def _check_overlap(fixed: sitk.Image, moving: sitk.Image) -> None:
    """Stop before resampling produces an image made of fill value only."""
    fixed_min, fixed_max = physical_bounds(fixed)
    moving_min, moving_max = physical_bounds(moving)
    boxes = (
        f"fixed image box {_fmt(fixed_min)}..{_fmt(fixed_max)} mm, "
        f"moving image box {_fmt(moving_min)}..{_fmt(moving_max)} mm (LPS)"
    )
    overlap_sides = np.minimum(fixed_max, moving_max) - np.maximum(fixed_min, moving_min)
    if np.any(overlap_sides <= 0):
        raise InputError(
            f"fixed image and moving image do not overlap in physical space ({boxes}); check that both are "
            "scans of the same patient and still carry their original origin and orientation."
        )
    fraction = float(np.prod(overlap_sides) / np.prod(fixed_max - fixed_min))
    if fraction < MIN_OVERLAP_FRACTION:
        raise InputError(
            f"fixed image and moving image overlap in only {100 * fraction:.1f}% of the fixed image volume "
            f"(minimum {100 * MIN_OVERLAP_FRACTION:.0f}%; {boxes}); give the registered moving image of the "
            "same anatomy."
        )


def prepare_pair(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    log: Callable[[str], None] | None = None,
    fill_hu: float = -1000.0,
) -> tuple[sitk.Image, sitk.Image]:
    """Validate both images and return them as float32 with the moving image on the fixed grid."""
    validate_image(fixed, "fixed image")
    validate_image(moving, "moving image")
    _check_overlap(fixed, moving)
    fixed_f32 = sitk.Cast(fixed, sitk.sitkFloat32)
    moving_f32 = sitk.Cast(moving, sitk.sitkFloat32)
    differences = _geometry_differences(moving, fixed, 1e-4)
    if not differences:
        return fixed_f32, moving_f32
    moving_f32 = sitk.Resample(moving_f32, fixed_f32, sitk.Transform(), sitk.sitkLinear, fill_hu, sitk.sitkFloat32)
    if log is not None:
        log(
            "moving image resampled onto the fixed image grid: "
            f"{'; '.join(differences)} (moving vs fixed); linear interpolation, {fill_hu:g} HU outside"
        )
    return fixed_f32, moving_f32


def prepare_mask(
    mask: sitk.Image,
    fixed: sitk.Image,
    *,
    name: str = "mask",
    log: Callable[[str], None] | None = None,
) -> sitk.Image:
    """Any label image -> uint8 0/1 on the fixed grid (every non-zero label counts as inside)."""
    if mask.GetDimension() != 3:
        raise InputError(f"{name} is {mask.GetDimension()}-D; a 3-D label image is required.")
    if mask.GetNumberOfComponentsPerPixel() != 1 or mask.GetPixelID() in _COMPLEX_TYPES:
        raise InputError(f"{name} has vector/complex voxels; give a scalar label image (0 = outside).")
    values = sitk.GetArrayViewFromImage(mask)
    inside = sitk.GetImageFromArray((np.isfinite(values) & (values != 0)).astype(np.uint8))
    inside.CopyInformation(mask)
    differences = _geometry_differences(mask, fixed, 1e-4)
    if differences:
        inside = sitk.Resample(inside, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        if log is not None:
            log(
                f"{name} resampled onto the fixed image grid: {'; '.join(differences)} (mask vs fixed); "
                "nearest neighbour"
            )
    if not np.any(sitk.GetArrayViewFromImage(inside)):
        where = " after resampling onto the fixed image grid" if differences else ""
        raise InputError(
            f"{name} has no voxel inside{where}; give a non-empty mask that covers part of the fixed image."
        )
    return inside


def write_image(image: sitk.Image, path: str | os.PathLike, name: str = "output") -> Path:
    """Write ``image`` so that ``path`` either holds the complete file or does not exist.

    The image is written under its final name into a temporary folder next to ``path`` and moved
    into place afterwards; formats with a separate data file (.mhd + .raw, .nhdr) move as a set,
    with the named header last.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{name}: '{path}' is a folder; give a file name such as '{path / 'result.nii.gz'}'.")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-write-", dir=folder))
    except OSError as error:
        raise InputError(
            f"{name}: cannot create or write the folder '{folder}' ({error.strerror or error}); choose a "
            "folder you can write to."
        ) from error
    try:
        try:
            sitk.WriteImage(image, str(staging / path.name), True)
        except RuntimeError as error:
            reason = _sitk_reason(error)
            if "Unable to determine ImageIO writer" in reason:
                raise InputError(
                    f"{name}: SimpleITK cannot write files named '{path.name}' (unknown extension); use "
                    ".nii.gz, .nrrd or .mha."
                ) from error
            raise InputError(
                f"{name}: '{path}' could not be written ({reason}); use .nii.gz, .nrrd or .mha, or "
                "another folder."
            ) from error
        written = sorted(staging.iterdir(), key=lambda item: item.name == path.name)
        for item in written:
            os.replace(item, folder / item.name)
    except OSError as error:
        raise InputError(
            f"{name}: '{path}' could not be written ({error.strerror or error}); check free space and "
            "permissions of the folder."
        ) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
