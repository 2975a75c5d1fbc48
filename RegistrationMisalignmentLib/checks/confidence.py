"""Confidence of the learned map: the largest class probability and the entropy of the class probabilities.

``inference.predict(..., with_probabilities=True)`` gives, at every fixed voxel, the network's probabilities
of correct / poor / wrong (a 3-component vector image on the fixed grid). The learned map takes their
argmax; how sure it is shows in

* confidence = max_c p_c, from 1 (certain) down to 1/3 (three classes equally likely);
* entropy H = -sum_c p_c log2 p_c in **bits**, from 0 (certain) up to log2 3 = 1.585 bits.

Both are the standard uncertainty measures of a softmax classifier (e.g. Hendrycks and Gimpel, "A baseline
for detecting misclassified and out-of-distribution examples in neural networks", ICLR 2017, for the
maximum probability; Shannon entropy for the spread). They say where the network itself is unsure, not
whether it is right: a confidently wrong map stays possible, which is why the classical maps sit beside it.
Probabilities are renormalised to sum 1 (linear resampling onto the fixed grid keeps the sum except
next to voxels that were not computed); voxels outside ``mask`` or with no probability get 0 in both maps.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from RegistrationMisalignmentLib.checks.fields import on_grid, slabs
from RegistrationMisalignmentLib.errors import InputError

MAX_ENTROPY_BITS = math.log2(3)
"""Entropy of three equally likely classes."""


def confidence_maps(probabilities: sitk.Image, mask: sitk.Image | None = None) -> tuple[sitk.Image, sitk.Image]:
    """(confidence, entropy in bits), float32 images on the probabilities' grid.

    ``probabilities``: a 3-D vector image of class probabilities (components correct, poor, wrong; any
    count >= 2 works), as ``predict(..., with_probabilities=True).probabilities``. ``mask``: optional
    label image on the same grid (non-zero inside; the learned labelmap itself serves). Raises
    ``InputError`` for a scalar or non-3-D image, or a mask on another grid.
    """
    if probabilities.GetDimension() != 3 or probabilities.GetNumberOfComponentsPerPixel() < 2:
        raise InputError("class probabilities must be a 3-D vector image with one component per class (as "
                         "`regmis predict --probabilities` writes), got a "
                         f"{probabilities.GetDimension()}-D image with {probabilities.GetNumberOfComponentsPerPixel()} "
                         "component(s).")
    if mask is not None and (mask.GetSize() != probabilities.GetSize()
                             or not np.allclose(mask.GetOrigin(), probabilities.GetOrigin(), atol=1e-4)
                             or not np.allclose(mask.GetSpacing(), probabilities.GetSpacing(), atol=1e-6)
                             or not np.allclose(mask.GetDirection(), probabilities.GetDirection(), atol=1e-6)):
        raise InputError("the mask for the confidence maps must lie on the probabilities' grid (the fixed "
                         "image's); resample it onto the fixed image first.")
    values = sitk.GetArrayViewFromImage(probabilities)  # (z, y, x, classes)
    inside = sitk.GetArrayViewFromImage(mask) != 0 if mask is not None else None
    confidence = np.zeros(values.shape[:3], dtype=np.float32)
    entropy = np.zeros(values.shape[:3], dtype=np.float32)
    for z0, z1 in slabs(probabilities):
        p = np.clip(np.asarray(values[z0:z1], dtype=np.float64), 0.0, None)
        total = p.sum(axis=-1, keepdims=True)
        valid = total[..., 0] > 0
        if inside is not None:
            valid &= inside[z0:z1]
        p = np.divide(p, total, out=np.zeros_like(p), where=total > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.sum(np.where(p > 0, p * np.log2(p), 0.0), axis=-1)
        confidence[z0:z1] = np.where(valid, p.max(axis=-1), 0.0)
        entropy[z0:z1] = np.where(valid, np.maximum(h, 0.0), 0.0)
    return on_grid(confidence, probabilities), on_grid(entropy, probabilities)


__all__ = ["MAX_ENTROPY_BITS", "confidence_maps"]
