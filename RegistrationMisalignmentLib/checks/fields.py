"""Any registration transform, sampled on the fixed image's grid slab by slab (LPS mm).

The checks that read a transform (Jacobian, inverse consistency) accept what users have: an ITK / Slicer
transform file (``landmarks.read_transform``: .tfm / .h5 / .txt, elastix TransformParameters, Slicer's inverse
"modeling" classes, displacement-field images), a displacement-field image, or any ``SimpleITK.Transform`` (affine, B-spline,
displacement field, composite). Every one of them maps fixed physical points to moving physical points
(ITK's resampling convention, Slicer's "from parent"). ``displacement_slab`` evaluates T(x) - x at the
voxel centres of slices [z0, z1) of the fixed grid with SimpleITK's ``TransformToDisplacementField``, so
memory stays bounded by the slab whatever the image size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import SimpleITK as sitk

from RegistrationMisalignmentLib.errors import InputError

SLAB_VOXELS = 1 << 21
"""Fixed-grid voxels per slab: the float64 displacements of a slab and their 9 derivatives take ~250 MB."""

TransformLike = sitk.Transform | sitk.Image | str | os.PathLike


def as_transform(transform: TransformLike, what: str = "transform",
                 log: Callable[[str], None] | None = None) -> sitk.Transform:
    """A ``SimpleITK.Transform`` mapping fixed to moving points (LPS mm) from a transform, field or file.

    A path goes through ``landmarks.read_transform`` (which inverts transforms stored moving -> fixed);
    an image must be a 3-D field of 3-component vectors in LPS mm (displacement, fixed -> moving).
    Raises ``InputError`` naming ``what`` otherwise.
    """
    if isinstance(transform, (str, os.PathLike)):
        from RegistrationMisalignmentLib.landmarks import read_transform

        return read_transform(transform, log=log)
    if isinstance(transform, sitk.Image):
        if transform.GetDimension() != 3 or transform.GetNumberOfComponentsPerPixel() != 3:
            raise InputError(f"{what}: a displacement field must be a 3-D image of 3-component vectors (LPS mm), "
                             f"got {transform.GetDimension()}-D with {transform.GetNumberOfComponentsPerPixel()} "
                             "component(s).")
        # The constructor takes its image's buffer: give it a copy, the caller's image stays whole.
        return sitk.DisplacementFieldTransform(sitk.Image(sitk.Cast(transform, sitk.sitkVectorFloat64)))
    if isinstance(transform, sitk.Transform):
        if transform.GetDimension() != 3:
            raise InputError(f"{what}: a {transform.GetDimension()}-D transform; a 3-D registration transform is "
                             "needed.")
        return transform
    raise InputError(f"{what}: expected a transform file, a displacement-field image or a SimpleITK transform, "
                     f"got {type(transform).__name__}.")


def slabs(reference: sitk.Image, slab_voxels: int = SLAB_VOXELS) -> Iterator[tuple[int, int]]:
    """Slice ranges [z0, z1) of ``reference`` with at most ``slab_voxels`` voxels each (at least one slice)."""
    width, height, depth = reference.GetSize()
    step = max(1, slab_voxels // (width * height))
    for z0 in range(0, depth, step):
        yield z0, min(z0 + step, depth)


def displacement_slab(transform: sitk.Transform, reference: sitk.Image, z0: int, z1: int) -> np.ndarray:
    """T(x) - x (float64, shape (z1 - z0, height, width, 3), LPS mm) at the voxel centres of slices z0..z1-1."""
    width, height, _ = reference.GetSize()
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, [width, height, z1 - z0],
                                              reference.TransformIndexToPhysicalPoint((0, 0, int(z0))),
                                              reference.GetSpacing(), reference.GetDirection())
    return sitk.GetArrayFromImage(field)


MAX_COVERAGE_POINTS = 1 << 16
"""``field_coverage`` counts on a regular subsample of the region of about this many voxels at most."""


def field_coverage(transform: sitk.Transform, reference: sitk.Image, region: sitk.Image | None,
                   mapped_by: sitk.Transform | None = None) -> float | None:
    """Share of ``region``'s voxels (the whole ``reference`` grid when None) on a displacement-field transform's
    grid (``landmarks.inside_field_grid``), or with ``mapped_by`` of their images under it; None for other
    transforms. Counted on a regular subsample (``MAX_COVERAGE_POINTS``)."""
    from RegistrationMisalignmentLib.landmarks import field_grid, inside_field_grid

    if field_grid(transform) is None:
        return None
    shape = reference.GetSize()[::-1]
    step = max(1, int(np.ceil((np.prod(shape) / MAX_COVERAGE_POINTS) ** (1 / 3))))
    chosen = (sitk.GetArrayViewFromImage(region)[::step, ::step, ::step] > 0 if region is not None
              else np.ones([len(range(0, n, step)) for n in shape], dtype=bool))
    zyx = np.argwhere(chosen) * step
    if not len(zyx):
        return None
    origin = np.array(reference.GetOrigin())
    matrix = np.array(reference.GetDirection()).reshape(3, 3) * np.array(reference.GetSpacing())
    points = origin + zyx[:, ::-1] @ matrix.T
    if mapped_by is not None:
        points = np.array([mapped_by.TransformPoint(tuple(float(v) for v in p)) for p in points])
    return float(inside_field_grid(transform, points).mean())


def on_grid(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A (z, y, x) array as a float32 image with ``reference``'s geometry."""
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    image.CopyInformation(reference)
    return image
