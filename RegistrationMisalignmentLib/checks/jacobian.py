"""Jacobian determinant of the registration transform on the fixed grid: folding and implausible volume change.

det J(x) = det(I + du/dx) of the displacement u(x) = T(x) - x of the transform T (fixed -> moving, LPS mm)
is the local volume ratio: a small neighbourhood of x in the fixed image maps onto a region of the moving
image det J times its volume (1: volume kept; < 1: the moving region is smaller; > 1: larger). det J <= 0
means the transform folds (it is not invertible there: anatomy is mirrored or overlaps itself), which no
physical motion does. The check is the one of the AAPM TG-132 report on image
registration QA (Brock et al., Med. Phys. 44(7), 2017) and of the Registration QA extension for Slicer.

How: u is sampled on the fixed grid (``fields.displacement_slab``: SimpleITK's
``TransformToDisplacementField``) and differentiated with central differences along the voxel axes
(one-sided at the image border), du/dxi (xi: mm along each voxel axis); du/dx = du/dxi D^T with the
grid's direction matrix D. SimpleITK's ``DisplacementFieldJacobianDeterminant`` computes the same numbers
on an axis-aligned grid but ignores the direction, which makes it wrong on oblique grids (a rotated grid
under the same affine gives another determinant); hence this implementation, tested against it on an
axis-aligned grid. Central differences are exact for an affine transform.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from RegistrationMisalignmentLib.checks.fields import TransformLike, as_transform, displacement_slab, on_grid, slabs
from RegistrationMisalignmentLib.progress import Reporter
from RegistrationMisalignmentLib.errors import InputError

PLAUSIBLE_RANGE: tuple[float, float] = (0.5, 2.0)
"""Default plausible det J: a local volume change of at most a factor 2 either way. Our convention (lung
volume changes between inhale and exhale stay within it almost everywhere), not a published threshold;
``regmis qa --jacobian-range`` changes it."""


def _derivative(u: np.ndarray, axis: int, step_mm: float) -> np.ndarray:
    """du/d(mm) along one array axis: central differences, one-sided at the ends, 0 for a single voxel."""
    if u.shape[axis] < 2:
        return np.zeros_like(u)
    return np.gradient(u, step_mm, axis=axis)


def _determinant(j: np.ndarray) -> np.ndarray:
    """det of (..., 3, 3) matrices, written out (exact and faster than LU for 3 x 3)."""
    return (j[..., 0, 0] * (j[..., 1, 1] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 1])
            - j[..., 0, 1] * (j[..., 1, 0] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 0])
            + j[..., 0, 2] * (j[..., 1, 0] * j[..., 2, 1] - j[..., 1, 1] * j[..., 2, 0]))


def jacobian_determinant(transform: TransformLike, reference: sitk.Image, *,
                         progress: Reporter | None = None) -> sitk.Image:
    """det(I + du/dx) of ``transform`` at every voxel of ``reference`` (float32, unitless, ``reference``'s grid).

    ``transform``: maps fixed to moving points in LPS mm (ITK convention); a ``SimpleITK.Transform`` of any
    kind (affine, B-spline, displacement field, composite), a displacement-field image or a transform file
    (``fields.as_transform``). ``reference``: the fixed image (only its grid is used; any direction).
    Raises ``InputError`` for an unusable transform or a reference that is not 3-D.
    """
    if reference.GetDimension() != 3:
        raise InputError(f"the fixed image must be 3-D for the Jacobian, got {reference.GetDimension()}-D.")
    transform = as_transform(transform, "registration transform")
    report = progress or Reporter()
    direction = np.array(reference.GetDirection(), dtype=np.float64).reshape(3, 3)
    sx, sy, sz = reference.GetSpacing()
    depth = reference.GetSize()[2]
    out = np.empty(reference.GetSize()[::-1], dtype=np.float32)
    for z0, z1 in slabs(reference):
        lo, hi = max(z0 - 1, 0), min(z1 + 1, depth)  # one slice of context each side for central differences
        u = displacement_slab(transform, reference, lo, hi)  # (z, y, x, 3): components x, y, z (LPS)
        # g[..., c, a] = du_c / dxi_a, xi_a = mm along voxel axis a (x, y, z index axes = array axes 2, 1, 0)
        g = np.stack([_derivative(u, 2, sx), _derivative(u, 1, sy), _derivative(u, 0, sz)], axis=-1)
        g = g[z0 - lo : z0 - lo + (z1 - z0)]
        out[z0:z1] = _determinant(np.eye(3) + g @ direction.T)
        report(z1 / depth, f"Jacobian: slice {z1}/{depth}")
    return on_grid(out, reference)


@dataclass(frozen=True)
class JacobianStats:
    """Folding and implausible volume change among the voxels of a region."""

    voxels: int
    folding: int
    """Voxels with det J <= 0 (the transform folds)."""
    outside_range: int
    """Voxels with det J outside ``plausible_range`` (folding voxels included)."""
    plausible_range: tuple[float, float]

    @property
    def folding_share(self) -> float:
        return self.folding / self.voxels if self.voxels else float("nan")

    @property
    def outside_share(self) -> float:
        return self.outside_range / self.voxels if self.voxels else float("nan")


def check_range(plausible_range: tuple[float, float]) -> tuple[float, float]:
    """``plausible_range`` as floats with 0 <= low < 1 < high, else ``InputError``."""
    low, high = (float(v) for v in plausible_range)
    if not (0.0 <= low < 1.0 < high):
        raise InputError(f"Jacobian range {low:g},{high:g}: give LOW,HIGH with 0 <= LOW < 1 < HIGH (e.g. 0.5,2).")
    return low, high


def jacobian_stats(determinant: sitk.Image, region: sitk.Image | None = None,
                   plausible_range: tuple[float, float] = PLAUSIBLE_RANGE) -> JacobianStats:
    """Count folding (det J <= 0) and out-of-range voxels of ``determinant`` inside ``region`` (non-zero voxels;
    None: everywhere). ``region`` must lie on ``determinant``'s grid."""
    low, high = check_range(plausible_range)
    values = sitk.GetArrayViewFromImage(determinant)
    if region is not None:
        values = values[sitk.GetArrayViewFromImage(region) != 0]
    return JacobianStats(voxels=int(values.size), folding=int(np.count_nonzero(values <= 0)),
                         outside_range=int(np.count_nonzero((values < low) | (values > high))),
                         plausible_range=(low, high))


__all__ = ["PLAUSIBLE_RANGE", "JacobianStats", "jacobian_determinant", "jacobian_stats", "check_range"]
