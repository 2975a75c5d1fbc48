"""PNG figures for people: the labelmap over the fixed CT, with landmarks coloured by agreement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from RegistrationMisalignmentLib.config import CLASS_NAMES, DEFAULT_CONFIG, MisalignmentConfig


def _slices(volume: np.ndarray, index: tuple[int, int, int]) -> list[np.ndarray]:
    z, y, x = index
    return [volume[z], volume[:, y][::-1], volume[:, :, x][::-1]]


def overlay_png(fixed: sitk.Image, labelmap: sitk.Image, path: str | Path, *, title: str = "",
                truth: sitk.Image | None = None, points_lps: np.ndarray | None = None,
                point_agree: np.ndarray | None = None, config: MisalignmentConfig = DEFAULT_CONFIG,
                opacity: float = 0.45) -> Path:
    """Axial, coronal and sagittal slices through the image centre (or the landmarks' centre).

    With ``truth`` a second row shows the true classes, for demos with a known deformation.
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
    colours = [(0, 0, 0, 0)] + [(*c, 1.0) for c in config.class_colors]
    cmap = ListedColormap(colours)
    rows = [("prediction", labels)] + ([("truth", sitk.GetArrayFromImage(truth))] if truth is not None else [])
    sx, sy, sz = fixed.GetSpacing()
    aspects = [sy / sx, sz / sx, sz / sy]
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 4.2 * len(rows)), squeeze=False)
    for r, (name, volume) in enumerate(rows):
        for c, (img, lab, aspect) in enumerate(zip(_slices(ct, centre), _slices(volume, centre), aspects)):
            ax = axes[r][c]
            ax.imshow(img, cmap="gray", vmin=-1000, vmax=400, aspect=aspect, interpolation="nearest")
            ax.imshow(np.ma.masked_equal(lab, 0), cmap=cmap, vmin=0, vmax=3, alpha=opacity, aspect=aspect,
                      interpolation="nearest")
            ax.set_title(f"{name}: {('axial', 'coronal', 'sagittal')[c]}")
            ax.axis("off")
            if r == 0 and c == 0 and points_lps is not None and len(points_lps):
                idx = np.array([fixed.TransformPhysicalPointToContinuousIndex(tuple(map(float, p))) for p in points_lps])
                near = np.abs(idx[:, 2] - centre[0]) <= 3
                agree = np.ones(len(idx), bool) if point_agree is None else np.asarray(point_agree, bool)
                ax.scatter(idx[near & agree, 0], idx[near & agree, 1], s=18, c="cyan", marker="o", label="agree")
                ax.scatter(idx[near & ~agree, 0], idx[near & ~agree, 1], s=24, c="magenta", marker="x", label="disagree")
    handles = [Patch(color=config.class_colors[i], label=CLASS_NAMES[i]) for i in range(3)]
    fig.legend(handles=handles, loc="lower center", ncol=3)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
