"""The catalogue of maps the checks produce: name, unit, kind, display range, colours, and what each is for.

One definition serves the CLI's table and file names, the figures (matplotlib) and the Slicer panel
(colour tables), so a map looks and reads the same everywhere. Colours of continuous maps are a few
anchor colours, interpolated linearly: viridis, magma and inferno (matplotlib's perceptually uniform
sequential maps, van der Walt and Smith 2015) for "more is worse or better", a blue-white-red diverging
map centred on 1 for the Jacobian determinant. Class maps use the learned map's colours (green / yellow /
red for correct / poor / wrong).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from RegistrationMisalignmentLib.checks.confidence import MAX_ENTROPY_BITS
from RegistrationMisalignmentLib.config import DEFAULT_CONFIG

VIRIDIS = ((0.267, 0.005, 0.329), (0.231, 0.322, 0.545), (0.129, 0.569, 0.549), (0.369, 0.788, 0.384),
           (0.992, 0.906, 0.145))
MAGMA = ((0.001, 0.000, 0.014), (0.231, 0.059, 0.439), (0.549, 0.161, 0.506), (0.871, 0.286, 0.408),
         (0.996, 0.624, 0.427), (0.988, 0.992, 0.749))
INFERNO = ((0.001, 0.000, 0.014), (0.259, 0.039, 0.408), (0.576, 0.149, 0.404), (0.867, 0.318, 0.227),
           (0.988, 0.647, 0.039), (0.988, 1.000, 0.643))
BLUE_WHITE_RED = ((0.020, 0.188, 0.380), (0.263, 0.576, 0.765), (0.969, 0.969, 0.969), (0.839, 0.376, 0.302),
                  (0.404, 0.000, 0.122))


@dataclass(frozen=True)
class MapInfo:
    """How one map is named, read and shown."""

    key: str
    """Identifier: file names, JSON keys, CLI flags (``--out-<key with - for _>``)."""
    title: str
    unit: str
    kind: str
    """"classes" (labels 0 outside, 1 correct, 2 poor, 3 wrong) or "continuous"."""
    display_range: tuple[float, float]
    colors: tuple[tuple[float, float, float], ...]
    """Anchor colours (RGB 0..1) from the low to the high end of ``display_range`` (classes: per class)."""
    use: str
    """What the map is good for, one sentence."""

    def colormap(self, n: int = 256) -> np.ndarray:
        """(n, 3) RGB colours from the low to the high end of the display range (anchors interpolated linearly)."""
        anchors = np.asarray(self.colors, dtype=np.float64)
        where = np.linspace(0.0, 1.0, len(anchors))
        t = np.linspace(0.0, 1.0, n)
        return np.stack([np.interp(t, where, anchors[:, c]) for c in range(3)], axis=1)


CLASS_COLORS = tuple(DEFAULT_CONFIG.class_colors)

MAPS: dict[str, MapInfo] = {m.key: m for m in (
    MapInfo("learned", "learned misalignment", "class", "classes", (0.0, 3.0), CLASS_COLORS,
            "where the network predicts the registration correct (< 3 mm), poor (3-6 mm) or wrong (>= 6 mm)"),
    MapInfo("confidence", "confidence of the learned map", "probability", "continuous", (1.0 / 3.0, 1.0), VIRIDIS,
            "low where the network is unsure of its own class (max probability; 1/3 = a guess)"),
    MapInfo("entropy", "entropy of the learned map", "bits", "continuous", (0.0, MAX_ENTROPY_BITS), MAGMA,
            "high where the class probabilities are spread (0 = certain, 1.585 bits = all three equal)"),
    MapInfo("jacobian", "Jacobian determinant", "ratio", "continuous", (0.0, 2.0), BLUE_WHITE_RED,
            "folding (det <= 0) and implausible compression or expansion of the registration transform"),
    MapInfo("inverse_consistency", "inverse consistency", "mm", "continuous", (0.0, 6.0), INFERNO,
            "where the two registration directions disagree: a lower bound on the error there"),
    MapInfo("intensity", "intensity difference |F - D|", "HU", "continuous", (0.0, 500.0), INFERNO,
            "edges that do not line up; blind in uniform tissue, fooled by real density change"),
    MapInfo("residual", "re-registration residual |u|", "mm", "continuous", (0.0, 10.0), INFERNO,
            "what a second elastix B-spline registration still moves: the remaining misalignment it can see"),
    MapInfo("reregistration", "re-registration classes (elastix-t)", "class", "classes", (0.0, 3.0),
            CLASS_COLORS, "the residual classed at 3 / 6 mm, comparable with the learned map voxel for voxel"),
)}
"""Every map by key, in the order the summary lists them."""


__all__ = ["MapInfo", "MAPS", "VIRIDIS", "MAGMA", "INFERNO", "BLUE_WHITE_RED"]
