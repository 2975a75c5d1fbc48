"""One summary for any set of check maps: inside a region, and at landmarks.

Inside the region (the mask, else the fixed CT's body): for a class map (the learned map, the
re-registration classes) the share of correct / poor / wrong among its labelled voxels; for a continuous
map its mean, 95th percentile and maximum; for the Jacobian determinant also the count and share of
folding voxels (det <= 0) and of voxels outside the plausible range (``jacobian.jacobian_stats``).

At landmarks (fixed and moving points paired by ``landmarks.pair_landmarks``): every map's value at each
fixed landmark (class maps at the nearest voxel, as ``evaluation`` reads the learned map; continuous maps
interpolated linearly), beside the landmark's residual TRE ||T(x_F) - x_M|| and its true class. Per map:
for class maps the scores of ``metrics.evaluate_classes`` against the true classes (accuracy, F1, kappa,
cw), for continuous maps the Spearman rank correlation of the value with the TRE (does the map rise
where the error does?). The CLI prints ``format_table`` and writes ``to_dict`` as JSON and the landmark
rows as CSV; the Slicer panel shows the same numbers.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from RegistrationMisalignmentLib.checks.jacobian import PLAUSIBLE_RANGE, JacobianStats, jacobian_stats
from RegistrationMisalignmentLib.checks.maps import MAPS, MapInfo
from RegistrationMisalignmentLib.config import CLASS_NAMES, DEFAULT_CONFIG, MisalignmentConfig
from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.landmarks import Pairing, residual_tre, sample_labelmap
from RegistrationMisalignmentLib.metrics import ClassificationReport, evaluate_classes

OUTSIDE = "outside"


def _number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass
class MapSummary:
    """One map inside the region. Continuous maps fill mean / p95 / maximum; class maps ``class_shares``."""

    key: str
    info: MapInfo
    voxels: int
    mean: float | None = None
    p95: float | None = None
    maximum: float | None = None
    class_shares: tuple[float, float, float] | None = None
    """Shares (0..1) of correct, poor, wrong among the map's labelled voxels in the region."""
    jacobian: JacobianStats | None = None

    def to_dict(self) -> dict:
        out = {"title": self.info.title, "unit": self.info.unit, "kind": self.info.kind, "voxels": self.voxels}
        if self.class_shares is not None:
            out["class_shares"] = dict(zip(CLASS_NAMES, (_number(v) for v in self.class_shares)))
        else:
            out.update(mean=_number(self.mean), p95=_number(self.p95), max=_number(self.maximum))
        if self.jacobian is not None:
            out.update(folding=self.jacobian.folding, folding_share=_number(self.jacobian.folding_share),
                       outside_range=self.jacobian.outside_range,
                       outside_range_share=_number(self.jacobian.outside_share),
                       plausible_range=list(self.jacobian.plausible_range))
        return out


@dataclass
class LandmarkChecks:
    """Every map's value at each fixed landmark, beside the landmark's TRE and true class."""

    labels: list[str]
    moving_labels: list[str]
    points_lps: np.ndarray
    tre_mm: np.ndarray
    true_class: np.ndarray
    """0 correct, 1 poor, 2 wrong (``MisalignmentConfig.classify_mm`` of the TRE)."""
    values: dict[str, np.ndarray] = field(default_factory=dict)
    """Per map key: class index (-1 outside the map) for class maps, the value (nan outside) for the others."""
    reports: dict[str, ClassificationReport] = field(default_factory=dict)
    """Per class map: its classes against the true classes, at the landmarks inside it."""
    correlations: dict[str, float] = field(default_factory=dict)
    """Per continuous map: Spearman rank correlation of the value with the TRE (nan when undefined)."""

    def to_dict(self) -> dict:
        return {"n": len(self.labels),
                "scores": {key: report.to_dict() for key, report in self.reports.items()},
                "spearman_with_tre": {key: _number(value) for key, value in self.correlations.items()}}

    def cell(self, key: str, i: int) -> str:
        """The CSV text of map ``key`` at landmark ``i``: a class name, a number, or empty when undefined."""
        value = self.values[key][i]
        if MAPS[key].kind == "classes":
            return OUTSIDE if value < 0 else CLASS_NAMES[int(value)]
        return "" if not math.isfinite(value) else repr(float(value))

    def write_csv(self, path: str | Path) -> Path:
        """One row per landmark: label, x, y, z (LPS mm), tre_mm, true_class, moving_label, then one column per map."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self.values)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["label", "x", "y", "z", "tre_mm", "true_class", "moving_label", *keys])
            for i, label in enumerate(self.labels):
                writer.writerow([label, *(repr(float(v)) for v in self.points_lps[i]), repr(float(self.tre_mm[i])),
                                 CLASS_NAMES[int(self.true_class[i])], self.moving_labels[i],
                                 *(self.cell(key, i) for key in keys)])
        return path


@dataclass
class ChecksSummary:
    """The summary of a set of maps (``summarize``)."""

    region: str
    """What the region is: "mask", "body" or "whole image"."""
    region_voxels: int
    maps: list[MapSummary]
    landmarks: LandmarkChecks | None = None

    def to_dict(self) -> dict:
        out = {"region": self.region, "region_voxels": self.region_voxels,
               "maps": {m.key: m.to_dict() for m in self.maps}}
        if self.landmarks is not None:
            out["landmarks"] = self.landmarks.to_dict()
        return out

    def format_table(self) -> str:
        """A table for a terminal or the panel's text box: one row per map, then the landmark scores."""

        def num(value: float | None) -> str:
            return "" if value is None or not math.isfinite(value) else f"{value:.3g}"

        def pct(value: float | None) -> str:
            return "" if value is None or not math.isfinite(value) else f"{100 * value:.1f} %"

        lines = [f"region: {self.region}, {self.region_voxels} voxels",
                 f"{'map':<36}{'unit':>12}{'mean':>9}{'p95':>9}{'max':>9}{'correct':>10}{'poor':>9}{'wrong':>9}"]
        for m in self.maps:
            shares = m.class_shares or (None, None, None)
            lines.append(f"{m.info.title:<36}{m.info.unit:>12}{num(m.mean):>9}{num(m.p95):>9}{num(m.maximum):>9}"
                         f"{pct(shares[0]):>10}{pct(shares[1]):>9}{pct(shares[2]):>9}")
            if m.jacobian is not None:
                low, high = m.jacobian.plausible_range
                lines.append(f"{'':<4}folding (det <= 0): {m.jacobian.folding} voxels ({pct(m.jacobian.folding_share)}); "
                             f"outside {low:g}-{high:g}: {m.jacobian.outside_range} voxels "
                             f"({pct(m.jacobian.outside_share)})")
        if self.landmarks is not None:
            marks = self.landmarks
            lines += ["", f"at {len(marks.labels)} landmarks (true class from the TRE: "
                          f"{', '.join(f'{n} {int(np.sum(marks.true_class == c))}' for c, n in enumerate(CLASS_NAMES))})"]
            for key, report in marks.reports.items():
                scores = report.to_dict()
                lines.append(f"  {MAPS[key].title:<34} N {scores['n']}, accuracy {pct(scores['accuracy'])}, mean F1 "
                             f"{pct(scores['mean_f1'])}, kappa {num(scores['kappa'])}, cw {scores['cw']}")
            for key, rho in marks.correlations.items():
                lines.append(f"  {MAPS[key].title:<34} Spearman rank correlation with the TRE {num(rho)}")
        return "\n".join(lines)


def values_at(image: sitk.Image, points_lps: np.ndarray, kind: str) -> np.ndarray:
    """Values of ``image`` at (N, 3) LPS points: class maps (``kind`` "classes") at the nearest voxel (0 outside),
    continuous maps interpolated linearly (nan outside the image)."""
    points = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    if kind == "classes":
        return sample_labelmap(image, points).astype(np.float64)
    from scipy.ndimage import map_coordinates

    index = np.array([image.TransformPhysicalPointToContinuousIndex(tuple(map(float, p))) for p in points])
    index = index.reshape(-1, 3)
    size = np.array(image.GetSize(), dtype=np.float64)
    inside = np.all((index >= -0.5) & (index <= size - 0.5), axis=1)
    values = map_coordinates(sitk.GetArrayViewFromImage(image).astype(np.float64), index[:, ::-1].T, order=1,
                             mode="nearest")
    return np.where(inside, values, np.nan)


def _spearman(values: np.ndarray, tre: np.ndarray) -> float:
    ok = np.isfinite(values)
    if ok.sum() < 3 or np.ptp(values[ok]) == 0 or np.ptp(tre[ok]) == 0:
        return float("nan")
    from scipy.stats import spearmanr

    return float(spearmanr(values[ok], tre[ok]).statistic)


def landmark_checks(maps: Mapping[str, sitk.Image], pairs: Pairing, transform: sitk.Transform | None = None,
                    config: MisalignmentConfig = DEFAULT_CONFIG) -> LandmarkChecks:
    """Every map's value at the fixed landmarks, their TRE ||T(x_F) - x_M|| (``transform`` None: ||x_F - x_M||,
    the moving landmarks already in the registered space) and true classes; scores per map (see the module)."""
    from RegistrationMisalignmentLib.evaluation import labelmap_values_to_classes

    tre = residual_tre(pairs.fixed, pairs.moving, transform)
    true = np.asarray(config.classify_mm(tre), dtype=np.int64)
    out = LandmarkChecks(list(pairs.fixed.labels), list(pairs.moving.labels), pairs.fixed.points_lps, tre, true)
    for key, image in maps.items():
        info = MAPS[key]
        raw = values_at(image, pairs.fixed.points_lps, info.kind)
        if info.kind == "classes":
            predicted = labelmap_values_to_classes(raw.astype(np.int64), config)
            out.values[key] = predicted
            inside = predicted >= 0
            out.reports[key] = evaluate_classes(true[inside], predicted[inside])
        else:
            out.values[key] = raw
            out.correlations[key] = _spearman(raw, tre)
    return out


def summarize(maps: Mapping[str, sitk.Image], region: sitk.Image | None = None, region_name: str = "whole image", *,
              plausible_range: tuple[float, float] = PLAUSIBLE_RANGE, pairs: Pairing | None = None,
              transform: sitk.Transform | None = None,
              config: MisalignmentConfig = DEFAULT_CONFIG) -> ChecksSummary:
    """The summary of ``maps`` (keys of ``maps.MAPS`` -> images on one grid, the fixed image's) inside ``region``.

    ``region``: uint8 (non-zero inside) on the same grid, None for the whole image; ``region_name`` says what
    it is. ``pairs`` (and the registration ``transform``, fixed -> moving) add the landmark table.
    Raises ``InputError`` for an unknown map key or a map on another grid.
    """
    unknown = [key for key in maps if key not in MAPS]
    if unknown:
        raise InputError(f"unknown map(s) {unknown}; known: {', '.join(MAPS)}")
    images = list(maps.values())
    if not images:
        raise InputError("no map to summarise; choose at least one check.")
    size = images[0].GetSize()
    for key, image in maps.items():
        if image.GetSize() != size:
            raise InputError(f"map {key!r} is not on the fixed image's grid ({image.GetSize()} vs {size} voxels).")
    inside = (sitk.GetArrayViewFromImage(region) != 0) if region is not None else np.ones(size[::-1], dtype=bool)
    rows = []
    for key in (k for k in MAPS if k in maps):
        info, image = MAPS[key], maps[key]
        values = sitk.GetArrayViewFromImage(image)[inside]
        row = MapSummary(key, info, int(values.size))
        if info.kind == "classes":
            counts = np.array([np.count_nonzero(values == v) for v in config.label_values], dtype=np.float64)
            total = counts.sum()
            row.class_shares = tuple(float(c / total) if total else float("nan") for c in counts)
        elif values.size:
            finite = values[np.isfinite(values)].astype(np.float64)
            if finite.size:
                row.mean, row.p95, row.maximum = float(finite.mean()), float(np.percentile(finite, 95)), float(finite.max())
        if key == "jacobian":
            row.jacobian = jacobian_stats(image, region, plausible_range)
        rows.append(row)
    landmarks = landmark_checks(maps, pairs, transform, config) if pairs is not None else None
    return ChecksSummary(region_name, int(np.count_nonzero(inside)), rows, landmarks)


__all__ = ["MapSummary", "LandmarkChecks", "ChecksSummary", "summarize", "landmark_checks", "values_at"]
