"""PNG figures for people: the labelmap over the fixed CT, with landmarks coloured by agreement.

Drawn for a clinician or physicist: radiological orientation marks on every view (R/L, A/P, S/I, read
from the image's direction), each slice's position in mm (LPS), a legend in millimetres, and slices
chosen where the misalignment is (the truth's poor + wrong voxels, when a truth is given).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from RegistrationMisalignmentLib.config import CLASS_NAMES, DEFAULT_CONFIG, MisalignmentConfig

VIEWS = ("axial", "coronal", "sagittal")
LPS_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))
"""Letters at the low and high end of the LPS axes x, y, z."""


def class_legend(config: MisalignmentConfig = DEFAULT_CONFIG) -> list[str]:
    """'correct < 3 mm', 'poor 3-6 mm', 'wrong >= 6 mm' from the configured thresholds."""
    lo, hi = config.thresholds_mm
    return [f"{CLASS_NAMES[0]} < {lo:g} mm", f"{CLASS_NAMES[1]} {lo:g}\u2013{hi:g} mm", f"{CLASS_NAMES[2]} \u2265 {hi:g} mm"]


def axis_letters(image: sitk.Image, axis: int) -> tuple[str, str]:
    """Anatomical letters at the low and high index end of image axis ``axis`` (0 = i, 1 = j, 2 = k)."""
    column = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)[:, axis]
    lps = int(np.argmax(np.abs(column)))
    low, high = LPS_LETTERS[lps]
    return (low, high) if column[lps] > 0 else (high, low)


def _slice(volume: np.ndarray, view: int, index: int) -> np.ndarray:
    """A (rows, columns) slice of a (k, j, i) array: axial (j, i); coronal and sagittal with k upwards."""
    if view == 0:
        return volume[index]
    return (volume[:, index] if view == 1 else volume[:, :, index])[::-1]


def slice_indices(shape: tuple[int, int, int], focus: np.ndarray | None, centre: tuple[int, int, int]) -> tuple[int, int, int]:
    """(k, j, i) of the axial, coronal and sagittal slice: where ``focus`` (bool, k j i) has the most voxels,
    else ``centre``."""
    if focus is None or not focus.any():
        return centre
    return tuple(int(np.argmax(focus.sum(axis=tuple(a for a in range(3) if a != axis)))) for axis in range(3))


def overlay_png(fixed: sitk.Image, labelmap: sitk.Image, path: str | Path, *, title: str = "",
                truth: sitk.Image | None = None, points_lps: np.ndarray | None = None,
                point_agree: np.ndarray | None = None, row_notes: dict[str, str] | None = None,
                footnote: str = "", focus: np.ndarray | None = None, config: MisalignmentConfig = DEFAULT_CONFIG,
                opacity: float = 0.45) -> Path:
    """Axial, coronal and sagittal slices of the labelmap over the fixed CT.

    With ``truth`` a second row shows the true classes. The slices pass where ``focus`` (bool, the fixed
    array's shape) has the most voxels, by default the truth's poor + wrong voxels; without either,
    through the landmarks' median, else the image centre. ``row_notes`` puts a line (e.g. the scores)
    under a row's name ("prediction", "truth").
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    ct = sitk.GetArrayFromImage(fixed)
    labels = sitk.GetArrayFromImage(labelmap)
    centre = tuple(s // 2 for s in ct.shape)
    if points_lps is not None and len(points_lps):
        idx = fixed.TransformPhysicalPointToIndex(tuple(float(v) for v in np.median(points_lps, axis=0)))
        centre = tuple(int(np.clip(i, 0, n - 1)) for i, n in zip(idx[::-1], ct.shape))
    truth_array = sitk.GetArrayFromImage(truth) if truth is not None else None
    if focus is None and truth_array is not None:
        focus = truth_array >= config.label_poor
    index = slice_indices(ct.shape, focus, centre)
    cmap = ListedColormap([(0, 0, 0, 0)] + [(*c, 1.0) for c in config.class_colors])
    rows = [("prediction", labels)] + ([("truth", truth_array)] if truth_array is not None else [])
    sx, sy, sz = fixed.GetSpacing()
    aspects = [sy / sx, sz / sx, sz / sy]
    # (left, right, top, bottom) letters of each view; rows of coronal / sagittal run from high k down.
    i_lo, i_hi = axis_letters(fixed, 0)
    j_lo, j_hi = axis_letters(fixed, 1)
    k_lo, k_hi = axis_letters(fixed, 2)
    marks = [(i_lo, i_hi, j_lo, j_hi), (i_lo, i_hi, k_hi, k_lo), (j_lo, j_hi, k_hi, k_lo)]
    positions = []
    for view, axis in zip(range(3), (2, 1, 0)):
        voxel = [0, 0, 0]
        voxel[axis] = index[view]
        point = fixed.TransformIndexToPhysicalPoint(voxel)
        lps = int(np.argmax(np.abs(np.asarray(fixed.GetDirection()).reshape(3, 3)[:, axis])))
        positions.append(f"{'xyz'[lps]} = {point[lps]:.1f} mm")
    fig, axes = plt.subplots(len(rows), 3, figsize=(13, 4.6 * len(rows) + 0.8), squeeze=False)
    for r, (name, volume) in enumerate(rows):
        for view in range(3):
            ax = axes[r][view]
            ax.imshow(_slice(ct, view, index[view]), cmap="gray", vmin=-1000, vmax=400, aspect=aspects[view],
                      interpolation="nearest")
            ax.imshow(np.ma.masked_equal(_slice(volume, view, index[view]), 0), cmap=cmap, vmin=0, vmax=3,
                      alpha=opacity, aspect=aspects[view], interpolation="nearest")
            ax.set_title(f"{name}, {VIEWS[view]} ({positions[view]})", fontsize=10)
            left, right, top, bottom = marks[view]
            style = dict(transform=ax.transAxes, color="white", fontsize=11, fontweight="bold")
            ax.text(0.02, 0.5, left, ha="left", va="center", **style)
            ax.text(0.98, 0.5, right, ha="right", va="center", **style)
            ax.text(0.5, 0.98, top, ha="center", va="top", **style)
            ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if view == 0 and r == 0 and points_lps is not None and len(points_lps):
                idx = np.array([fixed.TransformPhysicalPointToContinuousIndex(tuple(map(float, p))) for p in points_lps])
                near = np.abs(idx[:, 2] - index[0]) <= 3
                agree = np.ones(len(idx), bool) if point_agree is None else np.asarray(point_agree, bool)
                ax.scatter(idx[near & agree, 0], idx[near & agree, 1], s=18, c="cyan", marker="o", label="agree")
                ax.scatter(idx[near & ~agree, 0], idx[near & ~agree, 1], s=24, c="magenta", marker="x", label="disagree")
                ax.legend(fontsize=8, loc="lower right")
        note = (row_notes or {}).get(name, "")
        axes[r][0].set_ylabel(f"{name}\n{note}" if note else name, fontsize=10)
    handles = [Patch(color=config.class_colors[i], label=text) for i, text in enumerate(class_legend(config))]
    handles.append(Patch(facecolor="none", edgecolor="grey", label="no colour: outside the body / mask"))
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=10, frameon=False)
    if footnote:
        fig.text(0.5, 0.045, footnote, ha="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
