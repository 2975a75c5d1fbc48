"""Landmark files, transforms and residual TRE, all in LPS millimetres.

Inside the Lib every point is LPS (ITK's physical space, the space of SimpleITK images and
transforms). Slicer files may be RAS; ``ras_to_lps`` is the one place where the two meet.
Supported landmark files: Slicer markups ``.mrk.json``, Slicer fiducial ``.fcsv``, DIR-Lab
``.txt`` (1-based voxel indices, needs the image they refer to) and a plain ``.csv``
(``label,x,y,z`` in LPS mm).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from RegistrationMisalignmentLib.errors import InputError

FCSV_COLUMNS = ("id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc",
                "associatedNodeID")
MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                  "Resources/Schema/markups-schema-v1.0.3.json#")
DISPLACEMENT_FIELD_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class Landmarks:
    """Named points in LPS mm; the i-th fixed landmark pairs with the i-th moving one."""

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


def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}. Check the path.")
    return path


# ---- readers -----------------------------------------------------------------------------
def _read_markups_json(path: Path) -> Landmarks:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        markups = doc["markups"]
        if not isinstance(markups, list) or not all(isinstance(m, dict) for m in markups):
            raise TypeError("'markups' must be a list of objects")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a Slicer markups JSON file ({exc}). Save the points from "
                         "Slicer as .mrk.json.") from exc
    points, labels = [], []
    for m, markup in enumerate(markups):
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
    with path.open(newline="", encoding="utf-8") as f:
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
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
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
    points, labels = [], []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        if header[:4] != ["label", "x", "y", "z"]:
            raise InputError(f"{path} line 1: the header must start with label,x,y,z (LPS mm), got "
                             f"{','.join(header)!r}.")
        reader.fieldnames = header
        for row in reader:
            try:
                points.append([float(row["x"]), float(row["y"]), float(row["z"])])
            except (TypeError, ValueError) as exc:
                raise InputError(f"{path} line {reader.line_num}: x,y,z must be numbers, got "
                                 f"{[row.get(k) for k in 'xyz']}.") from exc
            labels.append(row["label"])
    return Landmarks(np.array(points).reshape(-1, 3), labels)


def read_landmarks(path: str | Path, reference: sitk.Image | None = None) -> Landmarks:
    """Read landmarks (chosen by suffix) into LPS mm; ``reference`` is needed for DIR-Lab .txt."""
    path = _require_file(path, "Landmark")
    suffix = _suffix(path)
    if suffix in (".mrk.json", ".json"):
        return _read_markups_json(path)
    if suffix == ".fcsv":
        return _read_fcsv(path)
    if suffix == ".txt":
        return _read_dirlab_txt(path, reference)
    if suffix == ".csv":
        return _read_plain_csv(path)
    raise InputError(f"{path}: unknown landmark file type {suffix!r}; use .mrk.json, .fcsv, "
                     "DIR-Lab .txt or .csv (label,x,y,z in LPS mm).")


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
def read_transform(path: str | Path) -> sitk.Transform:
    """An ITK transform file, or a displacement-field image (3-component vectors, LPS mm).

    Either way the transform maps fixed physical points to moving physical points (ITK's
    resampling convention, also Slicer's "from parent" transform saved in LPS).
    """
    path = _require_file(path, "Transform")
    if _suffix(path) in DISPLACEMENT_FIELD_SUFFIXES:
        try:
            field = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise InputError(f"{path}: cannot read the displacement field ({exc}).") from exc
        if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
            raise InputError(f"{path}: a displacement field must be a 3-D image of 3-component "
                             f"vectors, got {field.GetDimension()}-D with "
                             f"{field.GetNumberOfComponentsPerPixel()} component(s).")
        return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    try:
        return sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: not a readable ITK transform file ({exc}). Save the transform "
                         "as .tfm/.h5/.txt or as a displacement-field image.") from exc


def residual_tre(fixed: Landmarks, moving: Landmarks, transform: sitk.Transform | None = None) -> np.ndarray:
    """Per landmark ||T(x_F) - x_M|| in mm; ||x_F - x_M|| when ``transform`` is None."""
    if len(fixed) != len(moving):
        raise InputError(f"the fixed and moving landmark files have {len(fixed)} and {len(moving)} "
                         "points; they must pair one to one, in the same order.")
    mapped = fixed.points_lps
    if transform is not None:
        mapped = np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in mapped]).reshape(-1, 3)
    return np.linalg.norm(mapped - moving.points_lps, axis=1)


def sample_labelmap(labelmap: sitk.Image, points_lps: np.ndarray) -> np.ndarray:
    """Value of the nearest voxel at each point (ITK rounding, half up); 0 outside the image."""
    if labelmap.GetDimension() != 3:
        raise InputError(f"the labelmap must be 3-D, got {labelmap.GetDimension()}-D.")
    points = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    origin = np.array(labelmap.GetOrigin())
    matrix = np.array(labelmap.GetDirection()).reshape(3, 3) * np.array(labelmap.GetSpacing())
    index = np.floor(np.linalg.solve(matrix, (points - origin).T).T + 0.5).astype(np.int64)
    size = np.array(labelmap.GetSize())
    inside = np.all((index >= 0) & (index < size), axis=1)
    array = sitk.GetArrayViewFromImage(labelmap)  # z, y, x
    values = np.zeros(len(points), dtype=array.dtype)
    i = index[inside]
    values[inside] = array[i[:, 2], i[:, 1], i[:, 0]]
    return values


__all__ = ["Landmarks", "ras_to_lps", "lps_to_ras", "read_landmarks", "write_landmarks",
           "read_transform", "residual_tre", "sample_labelmap"]
