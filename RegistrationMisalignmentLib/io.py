"""Read, check, align and write images, turning every problem the user can fix into ``InputError``.

Everything downstream (preprocess, inference, metrics) assumes a finite, scalar, 3-D float image in
Hounsfield units and a moving image on the fixed image's grid. Checking that here, once, means a bad
input stops with a sentence that names the input and the fix instead of a traceback from deep inside
the network code, or a wrong answer: a DICOM folder must hold one CT series (or the one chosen) whose
slices lie on a regular grid, and every image that enters the network must look like HU (``check_hu``).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.nifti_header import (nifti_stem, nifti_twins, nonfinite_voxels,
                                                       orientation_disagreement)

MIN_SPACING_MM = 0.05
"""Spacings at or below this are almost always metres or a broken header, not a real CT."""
MAX_SPACING_MM = 20.0
"""Coarser than this leaves nothing for a 1 mm network to look at."""
MIN_EXTENT_MM = 16.0
"""The finest network patch needs at least this much anatomy along every axis."""
MIN_OVERLAP_FRACTION = 0.10
"""Below this share of the fixed volume, the pair is almost certainly not the same anatomy."""

_COMPLEX_TYPES = (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)

def _read_file(path: Path) -> sitk.Image:
    """``sitk.ReadImage`` of exactly ``path``: beside a NIfTI twin (``nifti_header.nifti_twins``) through a link of
    its own name in a temporary folder (a copy where links are not allowed), since ITK would read the twin."""
    if not nifti_twins(path):
        return sitk.ReadImage(str(path))
    with tempfile.TemporaryDirectory(prefix="regmis_read_") as folder:
        alone = Path(folder) / ("image" + path.name[len(nifti_stem(path).name):])
        try:
            alone.symlink_to(path.resolve())
        except OSError:
            shutil.copyfile(path, alone)
        return sitk.ReadImage(str(alone))


def _sitk_reason(error: Exception) -> str:
    """The last line of a SimpleITK exception: the readable part, without the C++ file and line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


MIN_VOLUME_SLICES = 4
"""A DICOM series with fewer files is not a CT volume (a scout, a dose report, a key image)."""
MAX_SLICE_OFFSET_MM = 0.1
"""Largest distance (mm, also at most a tenth of the slice spacing) between a slice's position in its
DICOM header and where the regular grid read from the series puts it; beyond it the grid is wrong."""


@dataclass(frozen=True)
class DicomSeries:
    """One series of a DICOM folder: its UID, description, size (columns, rows, files) and files."""

    uid: str
    description: str
    size: tuple[int, int, int]
    files: tuple[str, ...]

    def describe(self) -> str:
        description = f" '{self.description}'" if self.description else ""
        return f"{self.uid}{description} ({' x '.join(str(n) for n in self.size)})"


def dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """Every series in a DICOM folder (not its sub-folders), largest first; empty when there is none."""
    found = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        if not files:
            continue
        header = sitk.ImageFileReader()
        header.SetFileName(files[0])
        description, columns, rows = "", 0, 0
        try:
            header.ReadImageInformation()
            columns, rows = header.GetSize()[:2]
            if header.HasMetaDataKey("0008|103e"):
                description = header.GetMetaData("0008|103e").strip()
        except RuntimeError:
            pass  # an unreadable header still counts as a series; reading it later says what is wrong
        found.append(DicomSeries(uid, description, (int(columns), int(rows), len(files)), files))
    return sorted(found, key=lambda s: len(s.files), reverse=True)


MAX_DICOM_DEPTH = 4
"""How deep below a folder without a series to look for one (exports nest patient / study / series)."""


def _folders_with_dicom(folder: Path, depth: int = MAX_DICOM_DEPTH, most: int = 4) -> list[Path]:
    """Up to ``most`` sub-folders of ``folder`` (down to ``depth`` levels) that hold DICOM files themselves (one of
    their first files starts as a DICOM file does): where an export's series lie, found without reading them."""
    found: list[Path] = []
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return found
    for child in children:
        if len(found) >= most:
            break
        try:
            files = [f for _, f in zip(range(8), (f for f in child.iterdir() if f.is_file()))]
        except OSError:
            continue
        if any(_is_dicom_file(f) for f in files):
            found.append(child)
        elif depth > 1:
            found.extend(_folders_with_dicom(child, depth - 1, most - len(found)))
    return found


def _is_dicom_file(path: Path) -> bool:
    """Whether ``path`` starts as a DICOM Part 10 file does ('DICM' after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _choose_series(folder: Path, name: str, series: str | None,
                   log: Callable[[str], None] | None) -> DicomSeries:
    """The series to read: the one asked for, the only one, or the only volume beside scouts and reports."""
    found = dicom_series(folder)
    if not found:
        nested = _folders_with_dicom(folder)
        where = (f"; it holds DICOM files deeper down, in {', '.join(repr(str(f)) for f in nested[:3])}"
                 f"{' and more' if len(nested) > 3 else ''}: give one of those folders"
                 if nested else "; give a folder of DICOM slices or an image file (.nii.gz, .nrrd, .mha)")
        raise InputError(f"{name}: the folder '{folder}' holds no DICOM series itself{where}.")
    listing = "; ".join(s.describe() for s in found)
    if series is not None:
        chosen = [s for s in found if s.uid == series.strip()]
        if not chosen:
            raise InputError(f"{name}: the folder '{folder}' holds no DICOM series {series!r}; it holds {listing}.")
        return chosen[0]
    volumes = [s for s in found if len(s.files) >= MIN_VOLUME_SLICES]
    if len(volumes) > 1:
        raise InputError(
            f"{name}: the folder '{folder}' holds {len(volumes)} DICOM series that could be the CT: "
            f"{'; '.join(s.describe() for s in volumes)}. Choose one by its UID "
            "(--fixed-series / --moving-series UID; read_image(..., series=UID))."
        )
    chosen = volumes[0] if volumes else found[0]
    others = [s for s in found if s is not chosen]
    if others and log is not None:
        log(f"{name}: read DICOM series {chosen.describe()}; ignored {len(others)} series of fewer than "
            f"{MIN_VOLUME_SLICES} slices: {'; '.join(s.describe() for s in others)}")
    return chosen


def _header_vector(reader: sitk.ImageSeriesReader, index: int, tag: str) -> np.ndarray | None:
    if not reader.HasMetaDataKey(index, tag):
        return None
    try:
        return np.array([float(v) for v in reader.GetMetaData(index, tag).strip().split("\\")])
    except ValueError:
        return None


def _check_slice_geometry(reader: sitk.ImageSeriesReader, image: sitk.Image, folder: Path, name: str) -> None:
    """Refuse a series whose slices do not lie on the regular grid it was read as.

    Every slice's Image Position (Patient) is compared with the grid position of its first voxel; a
    gantry tilt (slices stepping sideways along the slice normal), missing slices or uneven spacing,
    and slices of different orientation all show up as an offset.
    """
    n = image.GetDepth()
    if n < 2 or len(reader.GetFileNames()) != n:
        return  # one slice per file is what can be compared (not a multi-frame file): the reader's geometry stands
    positions = [_header_vector(reader, k, "0020|0032") for k in range(n)]
    orientations = [_header_vector(reader, k, "0020|0037") for k in range(n)]
    if any(p is None or p.size != 3 for p in positions):
        return  # no positions to compare with: the reader's geometry stands
    if any(o is None or o.size != 6 or not np.allclose(o, orientations[0], atol=1e-4) for o in orientations):
        raise InputError(
            f"{name}: the slices of the DICOM series in '{folder}' have different orientations; it is not one "
            "volume. Export each orientation as its own series, or resample it in a DICOM tool first."
        )
    positions = np.array(positions)
    grid = np.array([image.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(n)])
    offset = float(np.linalg.norm(positions - grid, axis=1).max())
    spacing = image.GetSpacing()[2]
    if offset <= min(MAX_SLICE_OFFSET_MM, 0.1 * spacing):
        return
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    sideways = np.linalg.norm(steps - np.outer(along, normal), axis=1)
    tilt = float(np.degrees(np.arctan2(sideways.max(), np.abs(along).min())))
    if np.abs(along).min() < 1e-3:
        cause = "two slices lie at the same position (a duplicate or a second series with the same UID)"
    elif tilt > 0.05:
        cause = f"the slices are tilted by {tilt:.1f} deg against the slice normal (gantry tilt)"
    else:
        cause = (f"the slice spacing varies from {np.abs(along).min():.3g} to {np.abs(along).max():.3g} mm "
                 "(missing or uneven slices)")
        unread = _unread_dicom_files(folder)
        if unread:
            cause += (f"; {len(unread)} DICOM file(s) of the folder belong to no series GDCM could read (damaged or "
                      f"cut short?): {', '.join(f.name for f in unread[:3])}{' and more' if len(unread) > 3 else ''}")
    raise InputError(
        f"{name}: in the DICOM series in '{folder}' {cause}; read as a regular grid, voxels would lie up to "
        f"{offset:.1f} mm from where the headers put them. Resample the series onto a regular grid in a DICOM "
        "tool first (e.g. 3D Slicer's DICOM import with acquisition geometry regularization, hardened and saved "
        "as NRRD)."
    )


def _unread_dicom_files(folder: Path) -> list[Path]:
    """Files of ``folder`` that start as DICOM but belong to no series GDCM lists: it drops unreadable slices
    without a word, leaving a gap in the series."""
    listed = {Path(f).resolve() for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
              for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)}
    return sorted(f for f in folder.iterdir() if f.is_file() and f.resolve() not in listed and _is_dicom_file(f))


def _read_dicom_folder(folder: Path, name: str, series: str | None = None,
                       log: Callable[[str], None] | None = None) -> sitk.Image:
    """Read one DICOM series of ``folder`` and check that its slices form a regular, orthogonal grid."""
    chosen = _choose_series(folder, name, series, log)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(chosen.files))
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(
            f"{name}: the DICOM series in '{folder}' could not be read ({_sitk_reason(error)}); "
            "check that the slices are complete, or export the series to NIfTI/NRRD."
        ) from error
    if image.GetDimension() == 3:
        _check_slice_geometry(reader, image, folder, name)
    return image


def read_image(path: str | os.PathLike, name: str = "image", *, series: str | None = None,
               log: Callable[[str], None] | None = None, finite: bool = True) -> sitk.Image:
    """Read any image file SimpleITK understands, or a folder holding a DICOM series.

    A DICOM folder must hold one CT series (series beside it with fewer than ``MIN_VOLUME_SLICES``
    files, such as scouts, are ignored and named through ``log``); with several, ``series`` (a Series
    Instance UID) chooses one. Its slices must lie on a regular grid: a gantry tilt, missing slices
    or mixed orientations raise ``InputError`` instead of giving voxels in the wrong place.
    Geometry is ITK's: LPS mm. A NIfTI file is read as named even beside its twin (``X.nii`` beside ``X.nii.gz``,
    which ITK would read instead), and its NaN / Inf voxels raise ``InputError`` (ITK would read them as 0) unless
    ``finite`` is False (a mask: there 0 means outside, as NaN did).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{name}: '{path}' was not found; check the path and spelling.")
    if path.is_dir():
        return _read_dicom_folder(path, name, series, log)
    if series is not None:
        raise InputError(f"{name}: a DICOM series UID was given, but '{path}' is a file, not a DICOM folder; "
                         "drop the series option or give the folder.")
    _check_gzip(path, name)
    try:
        image = _read_file(path)
    except RuntimeError as error:
        raise InputError(
            f"{name}: '{path}' could not be read as an image ({_sitk_reason(error)}); give a "
            "NIfTI, NRRD, MHA or other SimpleITK-readable file, or a DICOM folder."
        ) from error
    nan, inf = nonfinite_voxels(path) if finite else (0, 0)
    if nan or inf:
        raise InputError(f"{name}: '{path}' holds {nan} NaN and {inf} Inf voxels, which ITK's NIfTI reader turns into 0 "
                         "(water in HU); replace them (e.g. with -1000 HU) and save it again.")
    disagreement = orientation_disagreement(path, image)
    if disagreement and log is not None:
        log(disagreement)
    if image.GetDimension() == 2 or image.GetSize()[2:] == (1,):
        if _is_dicom_file(path):
            raise InputError(f"{name}: '{path}' is a single DICOM slice; give the folder that holds the whole "
                             f"series ('{path.parent}').")
    return image


def _check_gzip(path: Path, name: str) -> None:
    """Raise ``InputError`` for a gzip-compressed file (.nii.gz, ...) that does not decompress to its end.

    ITK reads a truncated one without a word and gives its missing part as zeros (0 HU: "wrong" wherever
    the other image has air or lung), so the whole stream is checked first (about a second per 100 MB).
    """
    with open(path, "rb") as stream:
        if stream.read(2) != b"\x1f\x8b":
            return
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as error:
        raise InputError(f"{name}: '{path}' is a damaged gzip file ({error}): it was cut short or corrupted, and "
                         "its missing voxels would be read as zeros. Copy or export it again (`gzip -t` checks a "
                         "file).") from error


def moving_coverage(moving: sitk.Image, fixed: sitk.Image) -> sitk.Image | None:
    """uint8 on ``fixed``'s grid: 1 where the 3-D ``moving`` image has data (a fixed voxel's centre within half a
    voxel of the moving grid), 0 beyond it; None when it covers every fixed voxel.

    Why: resampled onto the fixed grid, the part of the fixed image the moving one does not reach reads as
    air (``prepare_pair``'s fill), which the network takes for misalignment, there and in its context.
    """
    if not _geometry_differences(moving, fixed, 1e-4):
        return None
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    covered = sitk.Resample(ones, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return None if sitk.GetArrayViewFromImage(covered).all() else covered


def _faces(array: np.ndarray) -> np.ndarray:
    """The values on the six faces of a 3-D array, in one flat array (edges and corners repeated)."""
    return np.concatenate([face.ravel() for face in (array[0], array[-1], array[:, 0], array[:, -1],
                                                     array[:, :, 0], array[:, :, -1])])


FILL_MIN_SHARE = 0.01
"""A fill region (``fill_region``) is at least this share of the image."""


def fill_region(moving: sitk.Image, fixed: sitk.Image) -> tuple[sitk.Image, float] | None:
    """(uint8 mask, value) of a registration's fill in the ``moving`` image on ``fixed``'s grid, or None.

    A registered image's voxels that map outside the original moving image take one fill value (elastix:
    ``DefaultPixelValue``, 0 by default), which reads as water where the fixed image shows anatomy and
    which the network takes for misalignment. Found as the voxels of exactly the edges' most common value,
    connected to an edge, at least ``FILL_MIN_SHARE`` of the image, where the fixed image is not uniform
    (not both images' padding). Air-like values (below -900 HU) are left alone: they are what air reads as.
    """
    faces = _faces(sitk.GetArrayViewFromImage(moving))
    values, counts = np.unique(faces, return_counts=True)
    value = float(values[counts.argmax()])
    if value < -900.0 or counts.max() < 0.05 * faces.size:
        return None
    same = sitk.Cast(moving == value, sitk.sitkUInt8)
    labelled = sitk.ConnectedComponent(same)  # kept: the view below reads its buffer
    components = sitk.GetArrayViewFromImage(labelled)
    edge_labels = np.unique(_faces(components))
    region = np.isin(components, edge_labels[edge_labels > 0])
    if region.sum() < FILL_MIN_SHARE * region.size or sitk.GetArrayViewFromImage(fixed)[region].std() < 20.0:
        return None
    mask = sitk.GetImageFromArray(region.astype(np.uint8))
    mask.CopyInformation(fixed)
    return mask, value


def require_sitk(image: object, name: str) -> None:
    """Raise ``InputError`` unless ``image`` is a ``SimpleITK.Image`` (what the library's functions take)."""
    if not isinstance(image, sitk.Image):
        raise InputError(f"{name} is a {type(image).__module__}.{type(image).__qualname__}, not a SimpleITK.Image: read "
                         "a file with RegistrationMisalignmentLib.io.read_image (or SimpleITK.ReadImage); make one of a "
                         "numpy array with SimpleITK.GetImageFromArray and set its spacing, origin and direction.")


def validate_image(image: sitk.Image, name: str) -> None:
    """Raise ``InputError`` unless ``image`` is a finite, non-constant, scalar 3-D CT of usable size."""
    require_sitk(image, name)
    dimension = image.GetDimension()
    if dimension == 4:
        phases = image.GetSize()[3]
        raise InputError(f"{name} is 4-D with {phases} volumes (a 4-D CT's breathing phases?); a 3-D volume is "
                         f"required: save one phase as its own file first (SimpleITK: image[:, :, :, k] for k in "
                         f"0..{phases - 1}).")
    if dimension != 3:
        raise InputError(f"{name} is {dimension}-D; a 3-D volume is required (not a single slice or time series).")
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1 or image.GetPixelID() in _COMPLEX_TYPES:
        kind = "complex" if components == 1 else f"{components}-component (vector/colour)"
        raise InputError(f"{name} has {kind} voxels; give a scalar grey-value (CT) image.")
    size = image.GetSize()
    if 0 in size:
        raise InputError(f"{name} is empty (size {size}); give an image that contains voxels.")
    if 1 in size:
        axis = "xyz"[size.index(1)]
        raise InputError(f"{name} is a single slice along {axis} (size {size}, {image.GetSpacing()[size.index(1)]:g} mm "
                         "thick): a 2-D image, not a volume; give the whole 3-D series.")
    spacing = image.GetSpacing()
    for axis, value in zip("xyz", spacing):
        if not MIN_SPACING_MM < value <= MAX_SPACING_MM:
            raise InputError(
                f"{name} has voxel spacing {value:g} mm along {axis} (spacing {_fmt(spacing)} mm), outside "
                f"({MIN_SPACING_MM:g}, {MAX_SPACING_MM:g}] mm; fix the spacing in the file header "
                "(a unit mix-up: values in metres, or a NIfTI header whose xyzt_units names the wrong unit?)."
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


AIR_HU = (-1100.0, -500.0)
"""Air and lung in Hounsfield units; a chest CT in HU has a share of its voxels here."""
FAT_HU = (-150.0, -50.0)
"""Fat in Hounsfield units: an image in HU without air (a crop inside the body) still holds some."""
MIN_AIR_FRACTION = 0.01
"""Below this share of voxels in ``AIR_HU`` the values are not HU (padding rims stay well under it)."""
DEEP_AIR_HU = (-2600.0, -1500.0)
"""Below air: nothing in a CT in HU but a scanner's padding (-2048, -3024; smoothed where a tool resampled it); air of
HU - 1024 lies here."""
SOFT_TISSUE_HU = (-100.0, 100.0)
MAX_SOFT_SHARE_BELOW_HU = 0.02
"""HU - 1024 leaves almost no voxel at soft tissue (0.02-0.2 % of the shared CTs so stored, 28-46 % in HU): what
tells its air from a resampled CT's padding."""
_HU_SAMPLE_VOXELS = 1 << 22
"""The HU check looks at a regular subsample of at most about this many voxels."""


def _offsets(hu_offset: float | tuple[float, float]) -> tuple[float, float]:
    """``hu_offset`` as (fixed, moving): one number counts for both images."""
    values = (hu_offset, hu_offset) if np.isscalar(hu_offset) else tuple(hu_offset)
    if len(values) != 2 or not all(np.isfinite(float(v)) for v in values):
        raise InputError(f"hu offset {hu_offset!r}: give one finite number for both images, or two (fixed, moving).")
    return float(values[0]), float(values[1])


def _hu_problem(image: sitk.Image, name: str, hu_offset: float) -> tuple[str, float | None] | None:
    """None when ``image`` + ``hu_offset`` looks like HU; else what is wrong and the offset that would fix it."""
    values = sitk.GetArrayViewFromImage(image)
    stride = max(1, int(np.ceil((values.size / _HU_SAMPLE_VOXELS) ** (1 / 3))))
    sample = values[::stride, ::stride, ::stride]
    low, high = AIR_HU[0] - hu_offset, AIR_HU[1] - hu_offset
    fraction = np.count_nonzero((sample >= low) & (sample <= high)) / sample.size
    shifted = sample.astype(np.float64) + hu_offset
    deep = shifted[(shifted > DEEP_AIR_HU[0]) & (shifted < DEEP_AIR_HU[1])]
    eight_bit = image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt8)  # windowed exports: no HU fits in 8 bits
    soft = np.count_nonzero((shifted >= SOFT_TISSUE_HU[0]) & (shifted <= SOFT_TISSUE_HU[1])) / sample.size
    below = _air_below_hu(deep, sample.size) and soft < MAX_SOFT_SHARE_BELOW_HU
    if fraction >= MIN_AIR_FRACTION and not eight_bit and not below:
        return None
    fat = np.count_nonzero((shifted >= FAT_HU[0]) & (shifted <= FAT_HU[1])) / sample.size
    if not eight_bit and not below and fat >= MIN_AIR_FRACTION:
        return None  # fat: HU without air, a crop inside the body (stored as HU + 1024, fat would lie near 924)
    above_padding = shifted[shifted > AIR_HU[0]]
    air = float(np.percentile(above_padding, 1.0)) if above_padding.size else float(shifted.min())
    positive = sample[sample > 0]
    if shifted.max() - shifted.min() <= 10:
        cause, offset = "its values span only a few units: a normalised or windowed image, not HU", None
    elif eight_bit or (sample.min() >= 0 and sample.max() <= 255):
        cause, offset = ("its values fit in 8 bits: a display export (windowed to 0..255 or -128..127), not HU; "
                         "export the CT itself (int16 or float, in HU)"), None
    elif (sample.min() == 0 and np.count_nonzero(sample == 0) >= 0.05 * sample.size and positive.size
          and np.count_nonzero((positive >= 900) & (positive <= 1200)) < 0.05 * positive.size):
        # stored as HU + 1024, soft tissue lies at 900..1200 (45-63 % of the shared CTs' non-zero voxels); with
        # negative HU clamped to 0 that is dense bone (under 1 %)
        cause, offset = ("a large share of its voxels is exactly 0 and little lies where soft tissue would "
                         "(900..1200) if it were HU + 1024: negative HU "
                         "(air, lung, fat) were clamped to 0, as an unsigned output type does (e.g. elastix "
                         "ResultImagePixelType \"unsigned short\"); write it again as a signed type (short or "
                         "float): no offset brings the lost values back"), None
    elif below:
        cause = (f"its air and lung lie near {float(np.percentile(deep, 5)):.0f}..{float(np.percentile(deep, 95)):.0f}: "
                 "likely HU - 1024 (the rescale intercept applied twice, or a hu offset given for an image already "
                 "in HU)")
        offset = hu_offset + 1024.0
    elif -300 <= air <= 300:
        cause = f"its air lies near {air:.0f}: likely HU + 1024 stored without its rescale intercept"
        offset = hu_offset - 1024.0
    else:
        cause, offset = f"its air lies near {air:.0f}", hu_offset + round(-1000.0 - air)
    applied = f", hu offset {hu_offset:g} added" if hu_offset else ""
    evidence = (f"{100 * deep.size / sample.size:.1f}% of its voxels lie below air ({DEEP_AIR_HU[0]:g}.."
                f"{DEEP_AIR_HU[1]:g} HU, where a CT holds nothing but constant padding)" if below and not eight_bit else
                f"{100 * fraction:.2f}% of its voxels lie in air/lung ({AIR_HU[0]:g}..{AIR_HU[1]:g} HU; at least "
                f"{100 * MIN_AIR_FRACTION:g}% expected)")
    return (f"{name} does not look like a CT in Hounsfield units: {evidence}, values "
            f"{shifted.min():g}..{shifted.max():g} ({image.GetPixelIDTypeAsString()}{applied}); {cause}."), offset


def _air_below_hu(deep: np.ndarray, voxels: int) -> bool:
    """Whether ``deep`` (the sampled values in ``DEEP_AIR_HU``) may be air: at least 5 % of the ``voxels`` and noisy
    (padding as the scanner wrote it is one constant value; ``MAX_SOFT_SHARE_BELOW_HU`` tells resampled padding)."""
    return deep.size >= 0.05 * voxels and np.unique(deep).size >= 50


def check_hu(image: sitk.Image, name: str, hu_offset: float = 0.0) -> None:
    """Raise ``InputError`` unless ``image`` + ``hu_offset`` looks like a CT in Hounsfield units.

    A chest CT in HU holds air and lung (``AIR_HU``, -1100..-500 HU) in at least ``MIN_AIR_FRACTION``
    of its voxels. A CT stored as HU + 1024 without its rescale intercept (air near 0), or a normalised
    or windowed image, fails; the message names the likely cause and the offset that would put air
    at -1000 HU. ``image`` is a scalar 3-D image (see ``validate_image``); ``hu_offset`` is added first.
    """
    problem = _hu_problem(image, name, hu_offset)
    if problem is not None:
        message, offset = problem
        fix = (f"If so, add {offset:g} to its values (hu offset) or fix the rescale intercept in the file."
               if offset is not None else "Give the CT in Hounsfield units.")
        raise InputError(f"{message} {fix}")


def _check_pair_hu(fixed: sitk.Image, moving: sitk.Image, offsets: tuple[float, float]) -> None:
    """``check_hu`` for both images at once, so that the suggested fix is the offset for the pair."""
    problems = [_hu_problem(image, name, offset)
                for image, name, offset in ((fixed, "fixed image", offsets[0]), (moving, "moving image", offsets[1]))]
    if not any(problems):
        return
    messages = " ".join(problem[0] for problem in problems if problem)
    if any(problem and problem[1] is None for problem in problems):
        raise InputError(f"{messages} Give both images in Hounsfield units.")
    fixed_offset, moving_offset = (problem[1] if problem else offset for problem, offset in zip(problems, offsets))
    if fixed_offset == moving_offset:
        fix = f"hu_offset={fixed_offset:g} (regmis --hu-offset {fixed_offset:g})"
    else:
        fix = f"hu_offset=({fixed_offset:g}, {moving_offset:g}) (regmis --hu-offset={fixed_offset:g},{moving_offset:g})"
    raise InputError(f"{messages} If it is a CT stored so, add the offset with {fix}, or fix the rescale intercept "
                     "in the file; if it is not a CT (an MR or PET image), this model cannot judge it: it was trained "
                     "on CT in HU only.")


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
    if not np.allclose(fixed.GetDirection(), moving.GetDirection(), atol=1e-3):  # a header's flipped axis moves it
        boxes += (f"; their axis directions differ: fixed {_fmt(fixed.GetDirection())}, moving "
                  f"{_fmt(moving.GetDirection())}: a header written in another convention (RAS for LPS, a flipped "
                  "axis) puts an image elsewhere")
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


def _has_unit_grid(image: sitk.Image) -> bool:
    """Spacing 1 mm and identity directions (any origin)."""
    return np.allclose(image.GetSpacing(), 1.0) and np.allclose(image.GetDirection(), np.eye(3).ravel())


def _has_default_header(image: sitk.Image) -> bool:
    """Spacing 1 mm, origin 0 and identity directions: what an array saved without its geometry gets."""
    return _has_unit_grid(image) and np.allclose(image.GetOrigin(), 0.0)


def _check_lost_header(fixed: sitk.Image, moving: sitk.Image) -> None:
    """Raise ``InputError`` when one image of the pair has the other's size but a default header (the classic
    ``GetImageFromArray`` without ``CopyInformation``, or nibabel with an identity affine) and the other another
    spacing or directions: read by geometry, it would lie elsewhere and at another scale, and the map would call
    the misplacement misalignment."""
    _check_header_kept(moving, "moving image", fixed, "fixed image")
    _check_header_kept(fixed, "fixed image", moving, "moving image")


def _check_header_kept(image: sitk.Image, name: str, other: sitk.Image, other_name: str) -> None:
    """Raise ``InputError`` when ``image`` has ``other``'s size but a default header and ``other`` another spacing or
    directions (``_check_lost_header``)."""
    if image.GetSize() == other.GetSize() and _has_default_header(image) and not _has_unit_grid(other):
        raise InputError(  # origins alone differ in real pairs too
            f"the {name} has the {other_name}'s size {image.GetSize()} but a default header (spacing 1 mm, origin 0, "
            f"identity directions), the {other_name} spacing {_fmt(other.GetSpacing())} mm and origin "
            f"{_fmt(other.GetOrigin())} mm: its geometry was likely lost when it was saved (an array written "
            "without its header, e.g. SimpleITK GetImageFromArray without CopyInformation, or nibabel with an "
            f"identity affine). Copy the {other_name}'s header onto it (SimpleITK: image.CopyInformation(other)) "
            "and save it again."
        )


def prepare_pair(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    log: Callable[[str], None] | None = None,
    fill_hu: float = -1000.0,
    hu_offset: float | tuple[float, float] = 0.0,
) -> tuple[sitk.Image, sitk.Image]:
    """Validate both images and return them as float32 HU with the moving image on the fixed grid.

    ``hu_offset`` is added to the voxel values first: one number for both images or (fixed, moving),
    e.g. -1024 for a CT stored as HU + 1024 without its rescale intercept. Raises ``InputError`` for an
    image that is not a usable 3-D CT (``validate_image``), not in HU (``check_hu``), or that does not
    overlap the other; the moving image is resampled linearly (``fill_hu`` outside) onto the fixed grid.
    """
    fixed_offset, moving_offset = _offsets(hu_offset)
    validate_image(fixed, "fixed image")
    validate_image(moving, "moving image")
    _check_pair_hu(fixed, moving, (fixed_offset, moving_offset))
    _check_lost_header(fixed, moving)
    _check_overlap(fixed, moving)
    fixed_f32 = sitk.Cast(fixed, sitk.sitkFloat32)
    moving_f32 = sitk.Cast(moving, sitk.sitkFloat32)
    if fixed_offset:
        fixed_f32 = fixed_f32 + fixed_offset
    if moving_offset:
        moving_f32 = moving_f32 + moving_offset
    if log is not None and (fixed_offset or moving_offset):
        log(f"hu offset added: {fixed_offset:g} to the fixed image, {moving_offset:g} to the moving image")
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


MAX_MASK_LABELS = 1000
"""A label image with more distinct values than this is a grey-value image (segmentations hold up to ~120)."""
PROBABILITY_SLACK = 0.05
"""A soft segmentation's values may stray this far outside [0, 1] (smoothing, interpolation overshoot)."""
SCALED_PROBABILITY_RANGES = (255, 65535)
"""Full scales of probability maps stored as unsigned integers (MONAI's ``SaveImage(scale=255 | 65535)``)."""


def _scaled_probabilities(sample: np.ndarray, distinct: np.ndarray) -> bool:
    """Whether integer ``sample`` (``distinct``: its sorted values, from 0 to 255 or 65535) is a probability map
    scaled to that range: 90 % of the voxels within 1 % of either end (outside and inside an organ), at least
    1 % at the top, and soft borders that take values in every tenth of the range between. A label image (an
    "ignore" label 255 beside labels up to ~120) leaves the upper tenths empty; a CT stored as uint16 (raw or
    wrapped negative HU) has most of its voxels between the ends."""
    high = float(distinct[-1])
    top = np.count_nonzero(sample >= 0.99 * high)
    if top < 0.01 * sample.size or top + np.count_nonzero(sample <= 0.01 * high) < 0.9 * sample.size:
        return False
    between = distinct[(distinct > 0.01 * high) & (distinct < 0.99 * high)]
    tenths = np.histogram(between, bins=10, range=(0.01 * high, 0.99 * high))[0]
    return bool(np.all(tenths > 0))


def _probability_scale(values: np.ndarray, name: str) -> float | None:
    """How ``values`` encode a mask: None for labels (every non-zero value is inside), 1.0 for a soft segmentation
    (non-integer values within [0, 1], give or take ``PROBABILITY_SLACK``), 255 or 65535 for probabilities scaled
    to that unsigned integer range (``_scaled_probabilities``).

    Raises ``InputError`` for a grey-value image (a CT given as the mask): negative values, or more than
    ``MAX_MASK_LABELS`` distinct ones above 1 that are no scaled probabilities (counted on at most ~4 M voxels)."""
    sample = values.ravel()[:: max(1, values.size >> 22)]
    sample = sample[np.isfinite(sample)]
    if not sample.size:
        return None
    distinct = np.unique(sample)
    low, high = float(distinct[0]), float(distinct[-1])
    integral = not np.any(distinct != np.round(distinct))
    if -PROBABILITY_SLACK <= low and high <= 1 + PROBABILITY_SLACK and not integral:
        return 1.0
    if integral and low == 0 and high in SCALED_PROBABILITY_RANGES and _scaled_probabilities(sample, distinct):
        return high
    if low < 0 or (len(distinct) > MAX_MASK_LABELS and high > 1):
        raise InputError(
            f"{name} holds values from {low:g} to {high:g} (at least {len(distinct)} distinct): a grey-value image "
            "(a CT?), not a label image; give a mask with 0 outside and non-zero labels inside (e.g. a lung "
            "segmentation)."
        )
    return None


def prepare_mask(
    mask: sitk.Image,
    fixed: sitk.Image,
    *,
    name: str = "mask",
    log: Callable[[str], None] | None = None,
) -> sitk.Image:
    """Any label image -> uint8 0/1 on the fixed grid (every non-zero label counts as inside); a probability map
    (soft segmentation in [0, 1] or scaled to 0..255 / 0..65535, ``_probability_scale``) counts where it is at
    least 0.5, with a note to ``log``.

    Raises ``InputError`` for a 2-D or vector image, a grey-value image (``_probability_scale``), a mask with the
    fixed image's size but a default header (``_check_lost_header``) and a mask with no voxel inside the fixed
    image."""
    require_sitk(mask, name)
    if mask.GetDimension() != 3:
        raise InputError(f"{name} is {mask.GetDimension()}-D; a 3-D label image is required.")
    if mask.GetNumberOfComponentsPerPixel() != 1 or mask.GetPixelID() in _COMPLEX_TYPES:
        raise InputError(f"{name} has vector/complex voxels; give a scalar label image (0 = outside).")
    _check_header_kept(mask, name, fixed, "fixed image")
    values = sitk.GetArrayViewFromImage(mask)
    scale = _probability_scale(values, name)
    if scale is not None:
        inside = sitk.GetImageFromArray((np.isfinite(values) & (values >= 0.5 * scale)).astype(np.uint8))
        if log is not None:
            scaled = f" scaled to 0..{scale:g}" if scale > 1 else ""
            stored = f" (a stored value of at least {0.5 * scale:g})" if scale > 1 else ""
            log(f"{name} holds probabilities{scaled} (values from {np.nanmin(values):g} to {np.nanmax(values):g}): "
                f"inside where at least 0.5{stored}")
    else:
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


def shear_degrees(image: sitk.Image) -> float:
    """How far the image's axes are from perpendicular: the largest |90 deg - angle| between two of them (0 for
    the orthonormal directions ITK, NIfTI and DICOM volumes normally have)."""
    n = image.GetDimension()
    axes = np.array(image.GetDirection(), dtype=np.float64).reshape(n, n).T
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    cosines = [abs(float(axes[i] @ axes[j])) for i in range(n) for j in range(i + 1, n)]
    return float(np.degrees(np.arcsin(min(max(cosines), 1.0))))


MAX_NIFTI_SHEAR_DEGREES = 0.01
"""NIfTI stores orthonormal directions only: ITK writes a sheared grid as the nearest orthonormal one."""


def check_nifti_grid(image: sitk.Image, path: str | os.PathLike, name: str) -> None:
    """Raise ``InputError`` when ``path`` is NIfTI and ``image``'s grid is sheared: ITK would write it with other
    directions (with only a console warning), and every voxel would lie elsewhere than the fixed image's."""
    shear = shear_degrees(image)
    if Path(path).name.lower().endswith((".nii", ".nii.gz")) and shear > MAX_NIFTI_SHEAR_DEGREES:
        raise InputError(
            f"{name}: '{path}' is NIfTI, which cannot hold the fixed image's sheared grid (its axes are "
            f"{shear:.2f} deg from perpendicular); ITK would write other directions and move every voxel. Write "
            ".nrrd or .mha, or resample the fixed image onto an orthogonal grid first."
        )


def write_image(image: sitk.Image, path: str | os.PathLike, name: str = "output") -> Path:
    """Write ``image`` so that ``path`` either holds the complete file or does not exist.

    The image is written under its final name into a temporary folder next to ``path`` and moved
    into place afterwards; formats with a separate data file (.mhd + .raw, .nhdr) move as a set,
    with the named header last. Raises ``InputError`` for a folder, an unwritable place or format, and a
    sheared grid written as NIfTI (``check_nifti_grid``).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{name}: '{path}' is a folder; give a file name such as '{path / 'result.nii.gz'}'.")
    check_nifti_grid(image, path, name)
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
