"""Inverse consistency: how far the two directions of a registration disagree, |T_back(T_forward(x)) - x| in mm.

When a pair was registered both ways, the forward transform (fixed -> moving points) followed by the
backward one (moving -> fixed points) should bring every fixed point back to itself. The distance it
misses by is a lower bound on the registration error where it is large (at least one direction is wrong
there), and says nothing where it is small (both can be wrong the same way). Christensen and Johnson,
"Consistent image registration", IEEE TMI 20(7), 2001, introduced the measure; the Registration QA
extension for Slicer and the AAPM TG-132 report (Brock et al. 2017) use it as a QA map.

How: the two transforms are composed into one (SimpleITK ``CompositeTransform([backward, forward])``,
which applies ``forward`` first) and sampled on the fixed grid with ``TransformToDisplacementField``, slab
by slab; the map is the length of that round-trip displacement. A displacement-field transform applies no
displacement beyond its own grid (ITK's identity there), so ``run_checks`` refuses a backward field that
does not cover where the forward transform sends the region (``run._check_fields_cover``).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from RegistrationMisalignmentLib.checks.fields import TransformLike, as_transform, displacement_slab, on_grid, slabs
from RegistrationMisalignmentLib.progress import Reporter
from RegistrationMisalignmentLib.errors import InputError


def inverse_consistency(forward: TransformLike, backward: TransformLike, reference: sitk.Image, *,
                        progress: Reporter | None = None) -> sitk.Image:
    """|backward(forward(x)) - x| in mm at every voxel x of ``reference`` (float32, ``reference``'s grid).

    ``forward``: the registration transform, fixed -> moving points (LPS mm, ITK convention: what
    ``--transform`` gives); ``backward``: the registration of the other direction, moving -> fixed points
    (the transform found with the moving image as fixed: ``--inverse-transform``). Each may be a
    ``SimpleITK.Transform``, a displacement-field image or a transform file (``fields.as_transform``).
    Raises ``InputError`` for an unusable transform or a reference that is not 3-D.
    """
    if reference.GetDimension() != 3:
        raise InputError(f"the fixed image must be 3-D for inverse consistency, got {reference.GetDimension()}-D.")
    forward = as_transform(forward, "registration transform (forward)")
    backward = as_transform(backward, "inverse registration transform (backward)")
    round_trip = sitk.CompositeTransform([backward, forward])  # backward(forward(x))
    report = progress or Reporter()
    depth = reference.GetSize()[2]
    out = np.empty(reference.GetSize()[::-1], dtype=np.float32)
    for z0, z1 in slabs(reference):
        out[z0:z1] = np.linalg.norm(displacement_slab(round_trip, reference, z0, z1), axis=-1)
        report(z1 / depth, f"inverse consistency: slice {z1}/{depth}")
    return on_grid(out, reference)


__all__ = ["inverse_consistency"]
