"""Landmark files, transforms and residual TRE, all in LPS millimetres.

Inside the Lib every point is LPS (ITK's physical space, the space of SimpleITK images and
transforms). Slicer files may be RAS; ``ras_to_lps`` is the one place where the two meet.
Supported landmark files: Slicer markups ``.mrk.json``, Slicer fiducial ``.fcsv``, DIR-Lab
``.txt`` (1-based voxel indices, needs the image they refer to) and a plain ``.csv``
(``label,x,y,z`` in LPS mm). Fixed and moving landmarks are paired explicitly (``pair_landmarks``: by
label, or by order when the two files share no label), and every transform that is read maps fixed to
moving points, whatever direction its file was stored in (``read_transform``).
"""

from __future__ import annotations

import csv
import io
import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk

from RegistrationMisalignmentLib.elastix_transform import is_elastix_transform, read_elastix_transform
from RegistrationMisalignmentLib.errors import InputError

FCSV_COLUMNS = ("id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc",
                "associatedNodeID")
MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                  "Resources/Schema/markups-schema-v1.0.3.json#")
DISPLACEMENT_FIELD_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class Landmarks:
    """Named points (N, 3) in LPS mm with their labels; ``pair_landmarks`` matches fixed and moving ones."""

    points_lps: np.ndarray
    labels: list[str]

    def __post_init__(self) -> None:
        self.points_lps = np.asarray(self.points_lps, dtype=np.float64).reshape(-1, 3)
        self.labels = [str(label) for label in self.labels]
        if len(self.labels) != len(self.points_lps):
            raise ValueError(f"{len(self.points_lps)} points but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


def ras_to_lps(points: np.ndarray) -> np.ndarray:
    """Negate x and y; the same flip takes LPS back to RAS (``lps_to_ras`` is this function)."""
    out = np.array(points, dtype=np.float64, copy=True)
    out[..., :2] *= -1.0
    return out


lps_to_ras = ras_to_lps


def _coordinate_system(value: object, source: str) -> str:
    """'RAS' or 'LPS' from a file's tag; Slicer also wrote 0 (RAS) and 1 (LPS)."""
    text = str(value).strip().upper()
    mapping = {"RAS": "RAS", "0": "RAS", "LPS": "LPS", "1": "LPS"}
    if text not in mapping:
        raise InputError(f"{source}: unknown coordinate system {value!r}; expected RAS or LPS.")
    return mapping[text]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for compound in (".mrk.json", ".nii.gz"):
        if name.endswith(compound):
            return compound
    return path.suffix.lower()


POINT_LIST_TYPES = ("Fiducial", "PointList")
"""Slicer markups that hold landmarks; lines, curves, angles, planes and ROIs do not."""


def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}. Check the path.")
    return path


# ---- readers -----------------------------------------------------------------------------
_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def _read_text(path: Path) -> str:
    """A landmark file's text as editors save it: UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8"),
    UTF-16 with one (Windows Notepad's "Unicode"), else Windows-1252 (Excel's plain CSV; Latin-1 where it has no
    character)."""
    data = path.read_bytes()
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data.decode(encoding)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        try:
            return data.decode("cp1252")
        except UnicodeDecodeError:
            return data.decode("latin-1")


def _read_markups_json(path: Path) -> Landmarks:
    try:
        doc = json.loads(_read_text(path))
        markups = doc["markups"]
        if not isinstance(markups, list) or not all(isinstance(m, dict) for m in markups):
            raise TypeError("'markups' must be a list of objects")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a Slicer markups JSON file ({exc}). Save the points from "
                         "Slicer as .mrk.json.") from exc
    for m, markup in enumerate(markups):
        if not isinstance(markup.get("controlPoints", []), list):
            raise InputError(f"{path}: markup {m} ({markup.get('type', '?')}) has controlPoints "
                             f"{markup['controlPoints']!r}, not a list of points; save the points from Slicer again.")
    lists = [(m, markup) for m, markup in enumerate(markups) if markup.get("type", "Fiducial") in POINT_LIST_TYPES]
    if len(lists) != 1:
        kinds = ", ".join(f"{m}: {markup.get('type', '?')} ({len(markup.get('controlPoints', []))} points)"
                          for m, markup in enumerate(markups))
        raise InputError(f"{path}: {'no point list' if not lists else f'{len(lists)} point lists'} among its "
                         f"markups ({kinds or 'none'}); save the landmarks as one point list (Slicer: Markups, "
                         "a point list node, Save).")
    points, labels = [], []
    for m, markup in lists:
        system = _coordinate_system(markup.get("coordinateSystem", "LPS"), f"{path} markup {m}")
        for c, cp in enumerate(markup.get("controlPoints", [])):
            where = f"{path}: markup {m}, control point {c} ({cp.get('label', '')!r})"
            if cp.get("positionStatus", "defined") != "defined" or "position" not in cp:
                raise InputError(f"{where} has no defined position; place or delete it in Slicer.")
            try:
                p = np.array(cp["position"], dtype=np.float64).reshape(3)
            except (TypeError, ValueError) as exc:
                raise InputError(f"{where}: position must be three numbers, got {cp['position']!r}.") from exc
            points.append(ras_to_lps(p) if system == "RAS" else p)
            labels.append(cp.get("label") or str(len(labels) + 1))
    return Landmarks(np.array(points).reshape(-1, 3), labels)


def _read_fcsv(path: Path) -> Landmarks:
    """Slicer fiducial CSV. Files without a CoordinateSystem line predate Slicer 4.11: RAS."""
    system, columns = "RAS", list(FCSV_COLUMNS)
    points, labels = [], []
    with io.StringIO(_read_text(path), newline="") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if line.startswith("#"):
                key, _, value = line[1:].partition("=")
                if key.strip().lower() == "coordinatesystem":
                    system = _coordinate_system(value, f"{path} line {lineno}")
                elif key.strip().lower() == "columns":
                    columns = [c.strip() for c in value.split(",")]
                continue
            row = dict(zip(columns, next(csv.reader([line]))))
            try:
                p = np.array([float(row["x"]), float(row["y"]), float(row["z"])])
            except (KeyError, ValueError) as exc:
                raise InputError(f"{path} line {lineno}: expected {','.join(columns)} with numeric "
                                 f"x,y,z, got {line.strip()!r}.") from exc
            points.append(ras_to_lps(p) if system == "RAS" else p)
            labels.append(row.get("label") or str(len(labels) + 1))
    return Landmarks(np.array(points).reshape(-1, 3), labels)


def _read_dirlab_txt(path: Path, reference: sitk.Image | None) -> Landmarks:
    """DIR-Lab: one 'i j k' per line, 1-based voxel indices of the reference image."""
    if reference is None:
        raise InputError(f"{path}: DIR-Lab .txt landmarks are voxel indices; give the image they "
                         "refer to (reference) so they can be converted to mm.")
    if reference.GetDimension() != 3:
        raise InputError(f"{path}: the reference image must be 3-D, got {reference.GetDimension()}-D.")
    points, labels = [], []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            ijk = [float(v) for v in line.split()]
            if len(ijk) != 3:
                raise ValueError
        except ValueError as exc:
            raise InputError(f"{path} line {lineno}: expected three voxel indices 'i j k', got "
                             f"{line.strip()!r}.") from exc
        points.append(reference.TransformContinuousIndexToPhysicalPoint([v - 1.0 for v in ijk]))
        labels.append(str(len(labels) + 1))
    return Landmarks(np.array(points).reshape(-1, 3), labels)


def _read_plain_csv(path: Path) -> Landmarks:
    """label,x,y,z (LPS mm), header in any case; also as a spreadsheet in a comma-decimal locale saves it
    (label;x;y;z with 1,5 for 1.5)."""
    points, labels = [], []
    text = _read_text(path)
    first = text.lstrip().split("\n", 1)[0]
    delimiter = ";" if first.count(";") >= 3 and first.count(",") < 3 else ","
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = [h.strip().lower() for h in reader.fieldnames or []]
        if header[:4] != ["label", "x", "y", "z"]:
            raise InputError(f"{path} line 1: the header must start with label,x,y,z (LPS mm; or label;x;y;z), got "
                             f"{delimiter.join(header)!r}.")
        reader.fieldnames = header
        for row in reader:
            try:
                points.append([float(row[k].replace(",", ".") if delimiter == ";" else row[k]) for k in "xyz"])
            except (AttributeError, TypeError, ValueError) as exc:
                raise InputError(f"{path} line {reader.line_num}: x,y,z must be numbers, got "
                                 f"{[row.get(k) for k in 'xyz']}.") from exc
            labels.append(row["label"])
    return Landmarks(np.array(points).reshape(-1, 3), labels)


def read_landmarks(path: str | Path, reference: sitk.Image | None = None) -> Landmarks:
    """Read landmarks (chosen by suffix) into LPS mm; ``reference`` is needed for DIR-Lab .txt."""
    path = _require_file(path, "Landmark")
    suffix = _suffix(path)
    if suffix in (".mrk.json", ".json"):
        landmarks = _read_markups_json(path)
    elif suffix == ".fcsv":
        landmarks = _read_fcsv(path)
    elif suffix == ".txt":
        landmarks = _read_dirlab_txt(path, reference)
    elif suffix == ".csv":
        landmarks = _read_plain_csv(path)
    else:
        raise InputError(f"{path}: unknown landmark file type {suffix!r}; use .mrk.json, .fcsv, "
                         "DIR-Lab .txt or .csv (label,x,y,z in LPS mm).")
    if not len(landmarks):
        raise InputError(f"{path}: holds no landmark; place the points (Slicer: Markups) and save them again, or "
                         "give the right file.")
    unknown = [label for label, p in zip(landmarks.labels, landmarks.points_lps) if not np.isfinite(p).all()]
    if unknown:  # a nan would drop the point from every score without a word
        raise InputError(f"{path}: {len(unknown)} landmark(s) with a coordinate that is not a number (nan or inf): "
                         f"{_some(unknown)}; give all three coordinates or remove the point.")
    return landmarks


# ---- pairing ------------------------------------------------------------------------------
INDEX_SUFFIXES = (".txt",)
"""Landmark files that hold voxel indices and need the image they were placed on."""


class Pairing(NamedTuple):
    """Fixed and moving landmarks in matching order, and how they were matched: 'label' or 'order'."""

    fixed: Landmarks
    moving: Landmarks
    by: str

    def describe(self) -> str:
        if self.by == "label":
            return f"{len(self.fixed)} landmark pairs matched by label"
        return (f"{len(self.fixed)} landmark pairs matched by order (the two files share no label: "
                f"{_some(self.fixed.labels)} with {_some(self.moving.labels)})")


def _some(labels: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(label) for label in labels[:n])
    return f"{shown}, ... ({len(labels)})" if len(labels) > n else shown


def _duplicates(labels: list[str]) -> list[str]:
    seen: set[str] = set()
    return sorted({label for label in labels if label in seen or seen.add(label)})


def pair_landmarks(fixed: Landmarks, moving: Landmarks) -> Pairing:
    """Match moving landmarks to fixed ones: by label when both carry the same labels, else by order.

    Same set of labels (each once): the moving points are reordered to the fixed order. No label in
    common (e.g. Slicer's defaults F-1, F-2.. and M-1, M-2..): the i-th fixed point pairs with the
    i-th moving point, and the counts must agree. Raises ``InputError`` for a partial overlap (naming
    the unmatched labels), for repeated labels that make label pairing ambiguous, and for different counts.
    """
    fixed_set, moving_set = set(fixed.labels), set(moving.labels)
    if fixed.labels == moving.labels:
        return Pairing(fixed, moving, "label")
    if fixed_set == moving_set:
        repeated = _duplicates(fixed.labels) or _duplicates(moving.labels)
        if repeated or len(fixed) != len(moving):
            raise InputError(f"landmark label(s) {_some(repeated)} appear more than once, so the fixed and moving "
                             "landmarks cannot be matched by label; give every landmark its own label.")
        where = {label: i for i, label in enumerate(moving.labels)}
        order = [where[label] for label in fixed.labels]
        return Pairing(fixed, Landmarks(moving.points_lps[order], [moving.labels[i] for i in order]), "label")
    if fixed_set & moving_set:
        only_fixed = [label for label in fixed.labels if label not in moving_set]
        only_moving = [label for label in moving.labels if label not in fixed_set]
        raise InputError(f"the fixed and moving landmark files share {len(fixed_set & moving_set)} labels but not "
                         f"all: only in the fixed file {_some(only_fixed) or 'none'}; only in the moving file "
                         f"{_some(only_moving) or 'none'}. Give both files the same labels (pairs are matched by "
                         "label) or wholly different ones (matched by order).")
    if len(fixed) != len(moving):
        raise InputError(f"the fixed and moving landmark files have {len(fixed)} and {len(moving)} points and no "
                         "label in common; they must pair one to one, in the same order (or by equal labels).")
    return Pairing(fixed, moving, "order")


def read_landmark_pair(fixed_path: str | Path, moving_path: str | Path, *,
                       fixed_reference: sitk.Image | None = None, moving_reference: sitk.Image | None = None,
                       moving_on_own_grid: bool = False) -> Pairing:
    """Read both landmark files (LPS mm) and pair them (``pair_landmarks``).

    Voxel-index files (DIR-Lab .txt) are converted with the image they were placed on: the fixed file
    with ``fixed_reference``, the moving file with ``moving_reference``. When the moving landmarks lie
    in the moving image's own space (``moving_on_own_grid``: a registration transform is given), the
    moving image's grid is not the fixed one, so an index file without ``moving_reference`` raises
    ``InputError``; otherwise (landmarks already in the registered space) it defaults to the fixed one.
    """
    if moving_reference is None and _suffix(Path(moving_path)) in INDEX_SUFFIXES:
        if moving_on_own_grid:
            raise InputError(f"{moving_path}: voxel-index landmarks of the moving image, used with a transform, "
                             "need the moving image's own grid to become mm; give the moving image as moving "
                             "reference (--moving-reference), not assumed to share the fixed grid.")
        moving_reference = fixed_reference
    return pair_landmarks(read_landmarks(fixed_path, fixed_reference), read_landmarks(moving_path, moving_reference))


# ---- writers -----------------------------------------------------------------------------
def _write_markups_json(landmarks: Landmarks, path: Path, system: str) -> None:
    points = ras_to_lps(landmarks.points_lps) if system == "RAS" else landmarks.points_lps
    # Slicer writes the (identity) orientation in the file's own coordinate system.
    orientation = [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0] if system == "RAS" else [-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0]
    control_points = [
        {"id": str(i + 1), "label": label, "description": "", "associatedNodeID": "",
         "position": [float(v) for v in p], "orientation": orientation, "selected": True,
         "locked": False, "visibility": True, "positionStatus": "defined"}
        for i, (label, p) in enumerate(zip(landmarks.labels, points))
    ]
    doc = {"@schema": MARKUPS_SCHEMA,
           "markups": [{"type": "Fiducial", "coordinateSystem": system, "coordinateUnits": "mm",
                        "controlPoints": control_points}]}
    path.write_text(json.dumps(doc, indent=4), encoding="utf-8")


def _write_fcsv(landmarks: Landmarks, path: Path, system: str) -> None:
    points = ras_to_lps(landmarks.points_lps) if system == "RAS" else landmarks.points_lps
    out = io.StringIO()
    out.write("# Markups fiducial file version = 4.11\n")
    out.write(f"# CoordinateSystem = {system}\n")
    out.write(f"# columns = {','.join(FCSV_COLUMNS)}\n")
    writer = csv.writer(out, lineterminator="\n")
    for i, (label, p) in enumerate(zip(landmarks.labels, points)):
        writer.writerow([f"vtkMRMLMarkupsFiducialNode_{i}", *(repr(float(v)) for v in p),
                         0, 0, 0, 1, 1, 1, 0, label, "", ""])
    path.write_text(out.getvalue(), encoding="utf-8")


def _write_plain_csv(landmarks: Landmarks, path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["label", "x", "y", "z"])
        for label, p in zip(landmarks.labels, landmarks.points_lps):
            writer.writerow([label, *(repr(float(v)) for v in p)])


def write_landmarks(landmarks: Landmarks, path: str | Path, coordinate_system: str = "LPS") -> Path:
    """Write .mrk.json or .fcsv (in ``coordinate_system``) or .csv (always LPS mm)."""
    path = Path(path)
    system = _coordinate_system(coordinate_system, "coordinate_system")
    suffix = _suffix(path)
    if suffix not in (".mrk.json", ".fcsv", ".csv"):
        raise InputError(f"{path}: cannot write landmarks as {suffix!r}; use .mrk.json, .fcsv or .csv.")
    if suffix == ".csv" and system != "LPS":
        raise InputError(f"{path}: plain .csv landmarks are always LPS mm; use .mrk.json or .fcsv for RAS.")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mrk.json":
        _write_markups_json(landmarks, path, system)
    elif suffix == ".fcsv":
        _write_fcsv(landmarks, path, system)
    else:
        _write_plain_csv(landmarks, path)
    return path


# ---- transforms and TRE ------------------------------------------------------------------
FIELD_TYPE_KEY = "displacement field type"
"""Slicer's NRRD header field: 'resampling' (fixed -> moving, ITK's convention) or 'modeling' (moving -> fixed)."""
INVERSE_TOLERANCE_MM = 0.5
"""An inverted displacement field must undo the original to within this (mm) wherever both are defined."""
_SLICER_INVERSE = re.compile(rb"Inverse(DisplacementField|BSpline|ThinPlateSplineKernel)Transform_(double|float)_3_3")
_ITK_REASON = re.compile(r"ITK ERROR: \w+\(0x[0-9a-f]+\): (.*)")


def _transform_reason(error: Exception) -> str:
    """The readable sentence of an ITK transform-reading error, without the factory's list of every class."""
    text = str(error)
    match = _ITK_REASON.search(text)
    if match:
        return match.group(1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200]


def _is_modeling(field: sitk.Image, path: Path) -> bool:
    if not field.HasMetaDataKey(FIELD_TYPE_KEY):
        return False
    kind = field.GetMetaData(FIELD_TYPE_KEY).strip().lower()
    if kind not in ("resampling", "modeling"):
        raise InputError(f"{path}: unknown '{FIELD_TYPE_KEY}' {kind!r}; Slicer writes 'resampling' (fixed -> "
                         "moving) or 'modeling' (moving -> fixed).")
    return kind == "modeling"


def invert_displacement_field(field: sitk.Image, what: str = "displacement field") -> sitk.Image:
    """The inverse of a displacement field on the same grid (ITK's ``InvertDisplacementField``).

    ``field``: 3-D image of 3-component vectors, LPS mm, mapping x to x + v(x). Returns u (float64
    vectors, same grid) with x + u(x) + v(x + u(x)) = x. Raises ``InputError`` when u undoes v by more
    than ``INVERSE_TOLERANCE_MM`` anywhere both are defined (a folding or too coarse field).
    """
    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    # ITK's filter gets the outermost voxel layer wrong; inverting a copy padded with its edge values (what
    # ITK's displacement field transform extrapolates outside its grid) and cropping it back does not.
    pad = [2, 2, 2]
    inverse = sitk.InvertDisplacementField(sitk.ZeroFluxNeumannPad(field, pad, pad), maximumNumberOfIterations=100,
                                           maxErrorToleranceThreshold=0.01, meanErrorToleranceThreshold=0.0001,
                                           enforceBoundaryCondition=False)
    inverse = sitk.Crop(inverse, pad, pad)
    mapping = sitk.DisplacementFieldTransform(sitk.Image(inverse))  # the constructor takes its image's buffer
    back = sitk.GetArrayFromImage(sitk.Resample(field, inverse, mapping, sitk.sitkLinear, 0.0))
    ones = sitk.Image(field.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(field)
    inside = sitk.GetArrayFromImage(sitk.Resample(ones, inverse, mapping, sitk.sitkLinear, 0.0)) > 0.999
    error = np.linalg.norm(sitk.GetArrayViewFromImage(inverse) + back, axis=-1)[inside]
    worst = float(error.max()) if error.size else np.inf
    if worst > INVERSE_TOLERANCE_MM:
        raise InputError(f"{what} cannot be inverted accurately (the inverse is off by up to {worst:.2g} mm; does "
                         "it fold?); export the transform in the fixed -> moving direction instead (Slicer: "
                         "Transforms module, Invert, then save).")
    return inverse


def _read_slicer_inverse(path: Path, kind: str, log: Callable[[str], None] | None) -> sitk.Transform:
    """A transform Slicer stored as 'to parent' (class Inverse...): read as the plain class, then inverted."""
    what = f"{path}: a Slicer 'modeling' (to parent, moving -> fixed) {kind} transform"
    data = path.read_bytes()
    if kind == "ThinPlateSplineKernel" or b"CompositeTransform" in data:
        part = "thin-plate-spline" if kind == "ThinPlateSplineKernel" else "composite"
        raise InputError(f"{what}, {part}, which cannot be inverted here; in Slicer invert it (Transforms module, "
                         "Invert) or harden it into a grid transform, and save it again.")
    # Slicer's class names are ITK's with an 'Inverse' prefix; the same bytes under the plain name (NUL-padded
    # to the same length) are an ordinary ITK file of the same parameters.
    plain = _SLICER_INVERSE.sub(lambda m: m.group(0)[len(b"Inverse"):] + b"\0" * len(b"Inverse"), data)
    with tempfile.TemporaryDirectory(prefix="regmis-transform-") as folder:
        copy = Path(folder) / ("plain" + "".join(path.suffixes[-1:]))
        copy.write_bytes(plain)
        try:
            transform = sitk.ReadTransform(str(copy))
        except RuntimeError as exc:
            raise InputError(f"{what} that could not be read ({_transform_reason(exc)}); invert it in Slicer "
                             "(Transforms module, Invert) and save it again.") from exc
    if kind == "BSpline":  # sampled every 2 mm over its domain, then inverted like a grid transform
        bspline = sitk.BSplineTransform(transform)
        size = [int(round(n / 2.0)) + 1 for n in bspline.GetTransformDomainPhysicalDimensions()]
        field = sitk.TransformToDisplacementField(bspline, sitk.sitkVectorFloat64, size,
                                                  bspline.GetTransformDomainOrigin(), (2.0, 2.0, 2.0),
                                                  bspline.GetTransformDomainDirection())
    else:
        field = sitk.DisplacementFieldTransform(transform).GetDisplacementField()
    inverse = invert_displacement_field(field, what)
    if log is not None:
        log(f"{what}: inverted with ITK's InvertDisplacementField to map fixed -> moving")
    return sitk.DisplacementFieldTransform(inverse)


def read_transform(path: str | Path, *, log: Callable[[str], None] | None = None) -> sitk.Transform:
    """An ITK transform file, a displacement-field image (3-component vectors, LPS mm), or an elastix
    ``TransformParameters`` file (``elastix_transform``; needs itk-elastix).

    The result always maps fixed physical points to moving physical points (LPS mm; ITK's resampling
    convention, Slicer's "from parent"). Transforms stored the other way are inverted: a displacement
    field whose header says ``displacement field type: modeling``, and Slicer's ``Inverse...Transform``
    classes (a grid or B-spline transform saved "to parent" as .h5/.tfm), both with ITK's
    ``InvertDisplacementField``; ``log`` (a callable taking one line) is told when that happens.
    Raises ``InputError`` (a short message naming the file, what it is and the fix) otherwise, and for a
    transform that is not 3-D.
    """
    transform = _read_transform_file(path, log)
    if transform.GetDimension() != 3:
        raise InputError(f"{path}: a {transform.GetDimension()}-D transform; a 3-D registration transform is needed.")
    return transform


def _read_transform_file(path: str | Path, log: Callable[[str], None] | None) -> sitk.Transform:
    """``read_transform`` without its dimension check."""
    path = _require_file(path, "Transform")
    if _suffix(path) in DISPLACEMENT_FIELD_SUFFIXES:
        try:
            field = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise InputError(f"{path}: cannot read the displacement field ({_transform_reason(exc)}).") from exc
        if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
            raise InputError(f"{path}: a displacement field must be a 3-D image of 3-component "
                             f"vectors, got {field.GetDimension()}-D with "
                             f"{field.GetNumberOfComponentsPerPixel()} component(s).")
        if _is_modeling(field, path):
            what = f"{path}: a 'modeling' (moving -> fixed) displacement field"
            inverse = invert_displacement_field(field, what)
            if log is not None:
                log(f"{what}: inverted with ITK's InvertDisplacementField to map fixed -> moving")
            return sitk.DisplacementFieldTransform(inverse)
        return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    if is_elastix_transform(path):
        transform = read_elastix_transform(path)
        if log is not None:
            log(f"{path}: an elastix transform parameter file, sampled by transformix as a displacement field")
        return transform
    try:
        return sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        slicer_inverse = _SLICER_INVERSE.search(path.read_bytes())
        if slicer_inverse:
            return _read_slicer_inverse(path, slicer_inverse.group(1).decode(), log)
        raise InputError(f"{path}: not a readable ITK transform file ({_transform_reason(exc)}). Save the transform "
                         "as .tfm/.h5/.txt or as a displacement-field image.") from exc


def residual_tre(fixed: Landmarks, moving: Landmarks, transform: sitk.Transform | None = None) -> np.ndarray:
    """Per landmark ||T(x_F) - x_M|| in mm; ||x_F - x_M|| when ``transform`` is None.

    The i-th fixed point pairs with the i-th moving one: match them first with ``pair_landmarks``
    (``evaluation.evaluate_landmarks`` does).
    """
    if len(fixed) != len(moving):
        raise InputError(f"the fixed and moving landmark files have {len(fixed)} and {len(moving)} "
                         "points; they must pair one to one, in the same order.")
    mapped = fixed.points_lps
    if transform is not None:
        check_field_covers(transform, fixed)
        mapped = np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in mapped]).reshape(-1, 3)
    return np.linalg.norm(mapped - moving.points_lps, axis=1)


class FieldGrid(NamedTuple):
    """Where a displacement-field transform is defined: its grid (LPS mm)."""

    size: np.ndarray
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray


def field_grid(transform: sitk.Transform) -> FieldGrid | None:
    """The grid of a displacement-field transform (its fixed parameters), None for other transforms."""
    if transform.GetName() != "DisplacementFieldTransform":
        return None
    parameters = np.array(transform.GetFixedParameters(), dtype=np.float64)  # size, origin, spacing, direction
    return FieldGrid(parameters[0:3], parameters[3:6], parameters[6:9], parameters[9:18].reshape(3, 3))


def _continuous_index(points_lps: np.ndarray, origin, direction, spacing) -> np.ndarray:
    """(N, 3) continuous x, y, z index of (N, 3) LPS points on the grid of ``origin``, ``direction`` (3 x 3 or 9
    values, row-major as ITK gives it) and ``spacing``."""
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3) * np.asarray(spacing, dtype=np.float64)
    points = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    return np.linalg.solve(matrix, (points - np.asarray(origin, dtype=np.float64)).T).T


def _on_field_grid(grid: FieldGrid, points_lps: np.ndarray) -> np.ndarray:
    index = _continuous_index(points_lps, grid.origin, grid.direction, grid.spacing)
    return np.all((index >= -0.5) & (index <= grid.size - 0.5), axis=1)


def inside_field_grid(transform: sitk.Transform, points_lps: np.ndarray) -> np.ndarray | None:
    """(N,) bool: which points (LPS mm) lie on a displacement-field transform's grid, where its displacement is the
    registration's (beyond it ITK applies none: the identity); None for other transforms, defined everywhere."""
    grid = field_grid(transform)
    return None if grid is None else _on_field_grid(grid, points_lps)


def check_field_covers(transform: sitk.Transform, fixed: Landmarks) -> None:
    """Raise ``InputError`` when fixed landmarks lie outside a displacement-field transform's grid
    (``inside_field_grid``): there it maps them to themselves, and their TRE would be the raw distance."""
    grid = field_grid(transform)
    if grid is None:
        return
    inside = _on_field_grid(grid, fixed.points_lps)
    if inside.all():
        return
    labels = [label for label, kept in zip(fixed.labels, inside) if not kept]
    raise InputError(f"{len(labels)} of the {len(fixed)} fixed landmarks ({_some(labels)}) lie outside the "
                     f"displacement field's grid (origin {np.round(grid.origin, 1).tolist()}, extent "
                     f"{np.round(grid.size * grid.spacing, 1).tolist()} mm), where ITK applies no displacement: their "
                     "TRE would ignore the registration. Give a field (or elastix file) whose grid covers the fixed "
                     "landmarks: the registration's output on the fixed image's grid.")


def nearest_voxels(image: sitk.Image, points_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) x, y, z index of the voxel nearest each point (ITK rounding, half up) and whether it lies in
    the 3-D ``image``."""
    index = np.floor(_continuous_index(points_lps, image.GetOrigin(), image.GetDirection(), image.GetSpacing())
                     + 0.5).astype(np.int64)
    return index, np.all((index >= 0) & (index < np.array(image.GetSize())), axis=1)


def sample_labelmap(labelmap: sitk.Image, points_lps: np.ndarray) -> np.ndarray:
    """Value of the nearest voxel at each point (ITK rounding, half up); 0 outside the image."""
    if labelmap.GetDimension() != 3:
        raise InputError(f"the labelmap must be 3-D, got {labelmap.GetDimension()}-D.")
    if labelmap.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"the labelmap has {labelmap.GetNumberOfComponentsPerPixel()}-component voxels: that is "
                         "predict's --probabilities output or a displacement field; give the labelmap (predict's "
                         "--out).")
    index, inside = nearest_voxels(labelmap, points_lps)
    array = sitk.GetArrayViewFromImage(labelmap)  # z, y, x
    values = np.zeros(len(index), dtype=array.dtype)
    i = index[inside]
    values[inside] = array[i[:, 2], i[:, 1], i[:, 0]]
    return values


__all__ = ["Landmarks", "Pairing", "ras_to_lps", "lps_to_ras", "read_landmarks", "read_landmark_pair",
           "pair_landmarks", "write_landmarks", "read_transform", "invert_displacement_field", "residual_tre",
           "nearest_voxels", "sample_labelmap"]
