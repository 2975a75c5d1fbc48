"""Three-class scores of a misalignment prediction: confusion, accuracy, F1, kappa, cw.

Class indices are 0 correct, 1 poor, 2 wrong (``MisalignmentConfig.classify_mm``). The paper
reports accuracy, per-class F1, Cohen's kappa and *cw*, the number of correct<->wrong confusions
(two classes apart), which is the error a user of the map cares about most. One implementation
serves the CLI, the Slicer module and the benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from RegistrationMisalignmentLib.config import CLASS_NAMES


def confusion_matrix(true: ArrayLike, pred: ArrayLike, num_classes: int = 3) -> np.ndarray:
    """Counts with rows = true class, columns = predicted class (sklearn's layout)."""
    t = np.asarray(true).ravel()
    p = np.asarray(pred).ravel()
    if t.shape != p.shape:
        raise ValueError(f"true and pred differ in length: {t.size} vs {p.size}")
    for name, a in (("true", t), ("pred", p)):
        if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} must hold integer classes in [0, {num_classes}), got {np.unique(a)[:10]}")
    flat = t.astype(np.int64) * num_classes + p.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def f1_per_class(cm: ArrayLike) -> np.ndarray:
    """F1 = 2 TP / (2 TP + FP + FN) per class.

    A class with no true and no predicted sample has 0/0: it is nan (undefined), not 0, so that
    a patient without any 'wrong' landmark does not drag the mean F1 down. A class that exists
    but is never found scores 0.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    denom = cm.sum(axis=0) + cm.sum(axis=1)  # = 2 TP + FP + FN
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2.0 * tp / denom, np.nan)


def cohen_kappa(cm: ArrayLike) -> float:
    """Cohen's kappa (po - pe) / (1 - pe); nan when undefined (no samples, or pe = 1)."""
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.sum()
    if n == 0:
        return math.nan
    po = np.trace(cm) / n
    pe = float(np.dot(cm.sum(axis=0), cm.sum(axis=1))) / (n * n)
    if pe >= 1.0:
        return math.nan
    return float((po - pe) / (1.0 - pe))


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


@dataclass(frozen=True)
class ClassificationReport:
    """All scores of one evaluation; ``f1`` is (F1 correct, F1 poor, F1 wrong)."""

    confusion: np.ndarray
    n: int
    accuracy: float
    f1: tuple[float, float, float]
    mean_f1: float
    kappa: float
    cw: int

    def to_dict(self) -> dict:
        """JSON-ready: lists and plain numbers, undefined scores (nan) as None.

        ``f1`` and the confusion rows (true) / columns (predicted) follow ``class_names``.
        """
        return {
            "n": self.n,
            "accuracy": _nan_to_none(self.accuracy),
            "f1": [_nan_to_none(v) for v in self.f1],
            "mean_f1": _nan_to_none(self.mean_f1),
            "kappa": _nan_to_none(self.kappa),
            "cw": self.cw,
            "confusion": self.confusion.astype(int).tolist(),
            "class_names": list(CLASS_NAMES),
        }

    def format_table(self) -> str:
        """Readable text for a terminal or a log box; scores in %, n/a where undefined."""

        def pct(x: float) -> str:
            return "n/a" if math.isnan(x) else f"{100.0 * x:.1f}"

        def score(name: str, x: float) -> str:
            return f"{name:<10}{pct(x):>6}" + ("" if math.isnan(x) else " %")

        f1c, f1p, f1w = self.f1
        lines = [
            f"N         {self.n:6d}",
            score("accuracy", self.accuracy),
            score("F1c", f1c),
            score("F1p", f1p),
            score("F1w", f1w),
            score("mean F1", self.mean_f1),
            score("kappa", self.kappa),
            f"cw        {self.cw:6d}",
            "",
            "confusion (rows true, columns predicted; % of N)",
            " " * 10 + "".join(f"{name:>9}" for name in CLASS_NAMES),
        ]
        share = self.confusion / self.n if self.n else np.full(self.confusion.shape, np.nan)
        for name, row in zip(CLASS_NAMES, share):
            lines.append(f"{name:<10}" + "".join(f"{pct(v):>9}" for v in row))
        return "\n".join(lines)


def evaluate_classes(true: ArrayLike, pred: ArrayLike) -> ClassificationReport:
    """Scores of predicted against true classes (0 correct, 1 poor, 2 wrong).

    ``mean_f1`` is the nan-mean of the three F1s: classes absent from both ``true`` and
    ``pred`` are left out rather than counted as 0. It is nan only when every F1 is.
    """
    cm = confusion_matrix(true, pred, num_classes=len(CLASS_NAMES))
    n = int(cm.sum())
    f1 = f1_per_class(cm)
    defined = f1[~np.isnan(f1)]
    return ClassificationReport(
        confusion=cm,
        n=n,
        accuracy=float(np.trace(cm) / n) if n else math.nan,
        f1=tuple(float(v) for v in f1),
        mean_f1=float(defined.mean()) if defined.size else math.nan,
        kappa=cohen_kappa(cm),
        cw=int(cm[0, 2] + cm[2, 0]),
    )


__all__ = ["confusion_matrix", "f1_per_class", "cohen_kappa", "ClassificationReport", "evaluate_classes"]
