"""Intensity difference |F - D| in HU: the fixed image against the registered (deformed) moving image.

The oldest registration check: where anatomy lines up, a CT pair of the same patient differs only by noise
and contrast changes, so large differences at edges (lung surface, vessels, bone) point at misalignment.
It is blind in homogeneous tissue (a shift inside the liver changes nothing) and fooled by real intensity
change (breathing changes lung density by ~100 HU; contrast agent). Both images go through
``io.prepare_pair``, the same validation and resampling the learned map uses: float32 HU, the moving
image resampled linearly onto the fixed grid with -1000 HU (air) outside its field of view.
"""

from __future__ import annotations

from collections.abc import Callable

import SimpleITK as sitk

from RegistrationMisalignmentLib.io import prepare_pair


def intensity_difference(fixed: sitk.Image, deformed: sitk.Image, *, log: Callable[[str], None] | None = None,
                         hu_offset: float | tuple[float, float] = 0.0) -> sitk.Image:
    """|F(x) - D(x)| in HU at every voxel of ``fixed`` (float32, the fixed grid).

    ``deformed``: the moving image after registration, on any grid overlapping the fixed image (resampled
    onto it, and ``log`` is told). ``hu_offset`` as in ``io.prepare_pair``. Raises ``InputError`` for
    images ``prepare_pair`` refuses (not 3-D, not HU, no overlap), naming the image and the fix.
    """
    fixed_hu, deformed_hu = prepare_pair(fixed, deformed, log=log, hu_offset=hu_offset)
    return sitk.Abs(sitk.Subtract(fixed_hu, deformed_hu))


__all__ = ["intensity_difference"]
