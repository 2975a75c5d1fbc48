"""Score a predicted misalignment labelmap against landmark pairs.

The landmarks' residual TRE after registration gives each landmark its true class; the labelmap
at the fixed landmark gives the predicted class. The CLI (``regmis evaluate``), the Slicer Logic
and the benchmarks all call ``evaluate_landmarks``, so they report the same numbers.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from RegistrationMisalignmentLib.config import CLASS_NAMES, DEFAULT_CONFIG, MisalignmentConfig
from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.landmarks import (
    Landmarks, nearest_voxels, pair_landmarks, ras_to_lps, residual_tre, sample_labelmap,
)
from RegistrationMisalignmentLib.metrics import ClassificationReport, evaluate_classes

OUTSIDE = -1
"""``predicted_class`` of a landmark where the labelmap says 'not predicted' (label 0)."""
OUTSIDE_NAME = "outside"
CSV_COLUMNS = ("label", "x", "y", "z", "tre_mm", "true_class", "predicted_class", "agree", "moving_label")


@dataclass
class LandmarkRow:
    """One landmark: where it is (LPS mm), its residual TRE, true and predicted class, and the label of
    the moving landmark it was paired with (the same label when pairs were matched by label)."""

    label: str
    position_lps: tuple[float, float, float]
    tre_mm: float
    true_class: int
    predicted_class: int
    moving_label: str = ""

    @property
    def agree(self) -> bool:
        return self.predicted_class == self.true_class


def labelmap_values_to_classes(values: np.ndarray, config: MisalignmentConfig = DEFAULT_CONFIG) -> np.ndarray:
    """Labelmap values (1/2/3, 0 outside) to class indices (0/1/2, -1 outside)."""
    lookup = {config.label_outside: OUTSIDE, **{v: c for c, v in enumerate(config.label_values)}}
    unknown = sorted(set(np.unique(values).tolist()) - set(lookup))
    if unknown:
        raise InputError(f"the labelmap holds values {unknown} at landmarks; a misalignment map holds "
                         f"only {sorted(lookup)}. Check that the right labelmap was given.")
    return np.array([lookup[v] for v in np.asarray(values).tolist()], dtype=np.int64)


def evaluate_landmarks(labelmap: sitk.Image, fixed: Landmarks, moving: Landmarks,
                       transform: sitk.Transform | None = None,
                       config: MisalignmentConfig = DEFAULT_CONFIG,
                       ) -> tuple[list[LandmarkRow], ClassificationReport]:
    """Rows for every landmark, and the scores of those inside the prediction.

    ``transform`` maps fixed to moving physical points (None: the moving landmarks are already
    in the registered space). Moving landmarks are matched to fixed ones by ``pair_landmarks``
    (by label when both carry the same labels, else by order); each row names its moving label.
    Landmarks where the labelmap is 0 (or that lie outside it) keep their row, with
    ``predicted_class = -1``, but do not count in the report; ``report.n`` says how many did.
    """
    fixed, moving, _ = pair_landmarks(fixed, moving)
    tre = residual_tre(fixed, moving, transform)
    true = np.asarray(config.classify_mm(tre), dtype=np.int64)
    pred = labelmap_values_to_classes(sample_labelmap(labelmap, fixed.points_lps), config)
    rows = [LandmarkRow(label, tuple(float(v) for v in p), float(d), int(t), int(c), moving_label)
            for label, p, d, t, c, moving_label in zip(fixed.labels, fixed.points_lps, tre, true, pred, moving.labels)]
    inside = pred != OUTSIDE
    return rows, evaluate_classes(true[inside], pred[inside])


def none_inside_message(labelmap: sitk.Image, fixed: Landmarks) -> str:
    """Why no fixed landmark was scored (``evaluate_landmarks`` gave ``report.n == 0``), and the fix: beyond the
    labelmap's box (in RAS rather than LPS, when negating x and y puts them inside), or inside it at label 0."""
    n, inside_box = len(fixed), int(nearest_voxels(labelmap, fixed.points_lps)[1].sum())
    if inside_box:
        counts = f"{n - inside_box} of the {n} fixed landmarks lie outside the labelmap's box and {inside_box}" \
            if inside_box < n else f"all {n}"
        return (f"{counts} lie where the labelmap is 0 (outside the body or mask it covers, or where the moving "
                "image has no data); check that they were placed on this fixed image")
    hint = ("they lie inside it with x and y negated: the file is likely in RAS; give LPS (ITK, .csv) or a Slicer "
            ".fcsv / .mrk.json that names its coordinate system"
            if nearest_voxels(labelmap, ras_to_lps(fixed.points_lps))[1].any()
            else "check that they belong to this fixed image and are in LPS mm")
    return f"all {n} fixed landmarks lie outside the labelmap's box; {hint}"


def coordinate_warning(labelmap: sitk.Image, fixed: Landmarks, config: MisalignmentConfig = DEFAULT_CONFIG) -> str:
    """A warning when scored fixed landmarks of a plain .csv look like RAS read as LPS, else "": at least a fifth of them (and 2) lie
    outside the map or where it is 0, and negating x and y would put at least a fifth more of them where it is not 0.

    A plain .csv is LPS mm; a RAS one (Slicer's coordinates copied out) is read mirrored through the origin in x and y,
    and where the mirror still meets the map some landmarks are scored at the wrong places. ``none_inside_message``
    covers the case where none of them meets it."""
    n = len(fixed)
    margin = max(2, -(-n // 5))
    scored = int((sample_labelmap(labelmap, fixed.points_lps) != config.label_outside).sum())
    negated = int((sample_labelmap(labelmap, ras_to_lps(fixed.points_lps)) != config.label_outside).sum())
    if n - scored < margin or negated - scored < margin:
        return ""
    return (f"{n - scored} of the {n} fixed landmarks lie outside the map or where it is 0, but with x and y negated "
            f"{negated} would lie inside it: the file is likely in RAS and the scores above mix in landmarks at mirrored "
            "places; a .csv holds LPS mm (ITK's space): negate x and y of a RAS file, or give a Slicer .fcsv / "
            ".mrk.json that names its coordinate system")


def _class_name(index: int) -> str:
    return OUTSIDE_NAME if index == OUTSIDE else CLASS_NAMES[index]


def write_rows_csv(rows: list[LandmarkRow], path: str | Path) -> Path:
    """One line per landmark; classes as words (correct/poor/wrong/outside), agree as true/false, and the
    paired moving landmark's label last."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow([r.label, *(repr(v) for v in r.position_lps), repr(r.tre_mm),
                             _class_name(r.true_class), _class_name(r.predicted_class),
                             "true" if r.agree else "false", r.moving_label])
    return path


def read_rows_csv(path: str | Path) -> list[LandmarkRow]:
    """Read back what ``write_rows_csv`` wrote (``agree`` is derived, so it is not read; tables written
    before ``moving_label`` existed read with an empty one)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Landmark table not found: {path}. Check the path.")
    classes = {name: i for i, name in enumerate(CLASS_NAMES)}
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(CSV_COLUMNS) - {"moving_label"} - set(reader.fieldnames or [])
        if missing:
            raise InputError(f"{path} line 1: missing columns {sorted(missing)}; expected "
                             f"{','.join(CSV_COLUMNS)}.")
        for r in reader:
            try:
                rows.append(LandmarkRow(
                    label=r["label"],
                    position_lps=(float(r["x"]), float(r["y"]), float(r["z"])),
                    tre_mm=float(r["tre_mm"]),
                    true_class=classes[r["true_class"]],
                    predicted_class={**classes, OUTSIDE_NAME: OUTSIDE}[r["predicted_class"]],
                    moving_label=r.get("moving_label") or "",
                ))
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"{path} line {reader.line_num}: bad value ({exc}); numbers for "
                                 "x,y,z,tre_mm and correct/poor/wrong(/outside) for the classes.") from exc
    return rows


__all__ = ["LandmarkRow", "evaluate_landmarks", "labelmap_values_to_classes", "write_rows_csv",
           "read_rows_csv", "OUTSIDE"]
