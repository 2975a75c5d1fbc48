"""Landmarks where a human would put them: distinct points inside the lungs, spread over both lungs.

DIR-Lab's observers marked vessel and airway bifurcations and other points they could find again in
the other phase. The detector here finds points of that kind with the Förstner interest operator,
the 3-D structure tensor J = G_rho * (grad I grad I^T) of the image (gradient at scale ``sigma_mm``,
integration at ``rho_mm``): its determinant is large only where the intensity changes in all three
directions (a bifurcation, a vessel bending or ending, a nodule), not along a straight vessel or a flat
wall, and det(J) / trace(J) is the Förstner measure of such a point's precision.

Candidates are the local maxima of that measure (``NMS_MM`` neighbourhood) inside the lungs eroded by
``INSET_MM``, on a bright structure (HU above ``MIN_HU``: on a vessel or airway wall, not in the lung
parenchyma or air beside it). As an observer spreads points over the whole lung, the lungs are cut
into cubic cells and each cell gives its strongest candidate (at least half a cell from a stronger
one); the cell is the largest that still gives ``count`` points (about the lungs' volume per point,
~25 mm for 300 points in 5 L), and of those the ``count`` strongest are kept. So the landmarks are
spread in proportion to lung volume, periphery included, instead of crowding at the hila where the
largest vessels give the strongest measure. Ties of the measure are broken by the seed only; the
same image, mask and seed give the same points.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from RegistrationMisalignmentLib.errors import InputError

SIGMA_MM = 1.0
RHO_MM = 2.0
NMS_MM = 5.0
INSET_MM = 2.0
MIN_HU = -700.0
WINDOW_HU = (-1000.0, 200.0)
"""Bone and contrast above 200 HU are clipped, so ribs near the lungs do not dominate the measure."""


def forstner_measure(hu: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
                     sigma_mm: float = SIGMA_MM, rho_mm: float = RHO_MM) -> np.ndarray:
    """det(J) / trace(J) of the structure tensor of a (D, H, W) HU image, float32 (see the module)."""
    image = np.clip(hu, *WINDOW_HU).astype(np.float32)
    step = np.array(spacing[::-1], dtype=np.float64)  # (z, y, x) mm
    sigma, rho = sigma_mm / step, rho_mm / step
    gradients = []
    for axis in range(3):
        order = [0, 0, 0]
        order[axis] = 1
        gradients.append(ndimage.gaussian_filter(image, sigma, order=order) / np.float32(step[axis]))
    del image
    tensor = {}
    for a in range(3):
        for b in range(a, 3):
            tensor[a, b] = ndimage.gaussian_filter(gradients[a] * gradients[b], rho)
    del gradients
    j = lambda a, b: tensor[min(a, b), max(a, b)]  # noqa: E731 - symmetric lookup
    det = (j(0, 0) * (j(1, 1) * j(2, 2) - j(1, 2) ** 2) - j(0, 1) * (j(0, 1) * j(2, 2) - j(1, 2) * j(0, 2))
           + j(0, 2) * (j(0, 1) * j(1, 2) - j(1, 1) * j(0, 2)))
    trace = j(0, 0) + j(1, 1) + j(2, 2)
    return (np.maximum(det, 0.0) / np.maximum(trace, 1e-6)).astype(np.float32)


def _greedy(points_mm: np.ndarray, order: np.ndarray, spacing: float, count: int) -> list[int]:
    """Indices (into points_mm) taken in ``order`` that keep ``spacing`` mm from each other, at most ``count``."""
    tree = cKDTree(points_mm)
    blocked = np.zeros(len(points_mm), dtype=bool)
    kept: list[int] = []
    for i in order:
        if blocked[i]:
            continue
        kept.append(int(i))
        if len(kept) == count:
            break
        blocked[tree.query_ball_point(points_mm[i], spacing)] = True
    return kept


def _one_per_cell(points_mm: np.ndarray, order: np.ndarray, cell_mm: float, count: int) -> np.ndarray:
    """The strongest candidate of every cell of a ``cell_mm`` grid, at least half a cell from a stronger one
    kept before it; the ``count`` strongest of those (or all, when fewer), strongest first."""
    keys = np.floor(points_mm[order] / cell_mm).astype(np.int64)
    _, first = np.unique(keys, axis=0, return_index=True)
    winners = order[np.sort(first)]  # ``order`` is strongest first, so are the winners
    kept = _greedy(points_mm[winners], np.arange(len(winners)), 0.5 * cell_mm, count)
    return winners[kept]


def detect_landmarks(hu: np.ndarray, lung: np.ndarray, count: int, seed: int,
                     spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), name: str = "image") -> np.ndarray:
    """``count`` distinct points in the lungs of a (D, H, W) HU image: (count, 3) voxel indices (z, y, x).

    Raises ``InputError`` when the lungs hold fewer candidates than ``count``.
    """
    step = np.array(spacing[::-1], dtype=np.float64)
    lungs = ndimage.binary_erosion(lung, iterations=max(1, int(round(INSET_MM / step.min()))))
    box = ndimage.find_objects(lungs.astype(np.uint8))
    if not box:
        raise InputError(f"{name}: no lung inside {INSET_MM:g} mm of the lung surface; no landmarks to place")
    # The measure needs the image around the lungs only (plus the filters' reach).
    reach = [int(np.ceil(3 * (SIGMA_MM + RHO_MM) / s)) + 1 for s in step]
    lo = [max(sl.start - r, 0) for sl, r in zip(box[0], reach)]
    hi = [min(sl.stop + r, n) for sl, r, n in zip(box[0], reach, hu.shape)]
    region = tuple(slice(a, b) for a, b in zip(lo, hi))
    measure = forstner_measure(hu[region], spacing)
    size = [max(3, 2 * int(round(NMS_MM / 2 / s)) + 1) for s in step]
    peaks = (measure == ndimage.maximum_filter(measure, size=size)) & (measure > 0)
    peaks &= lungs[region] & (hu[region] > MIN_HU)
    index = np.argwhere(peaks)
    if len(index) < count:
        raise InputError(f"{name}: only {len(index)} distinct points in the lungs for {count} landmarks; "
                         "lower --landmarks")
    strength = measure[tuple(index.T)]
    ties = np.random.default_rng(seed).random(len(index))
    order = np.lexsort((ties, -strength))  # strongest first; the seed orders equal strengths
    points_mm = index * step
    cell = float(np.cbrt(lungs.sum() * step.prod() / count))  # one cell of lung per landmark, to start
    kept = _one_per_cell(points_mm, order, cell, count)
    extent = float(np.max(np.ptp(points_mm, axis=0))) + 1.0
    while len(kept) == count and cell < extent:  # the largest cells that still give ``count`` points...
        larger = _one_per_cell(points_mm, order, cell * 1.05, count)
        if len(larger) < count:
            break
        cell, kept = cell * 1.05, larger
    while len(kept) < count:  # ...or the smaller ones that first do
        cell *= 0.95
        kept = _one_per_cell(points_mm, order, cell, count)
    return index[np.sort(kept)] + np.array(lo)


__all__ = ["forstner_measure", "detect_landmarks", "SIGMA_MM", "RHO_MM", "NMS_MM", "INSET_MM", "MIN_HU"]
