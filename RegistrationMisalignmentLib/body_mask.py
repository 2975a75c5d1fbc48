"""The body of a CT, so that prediction skips the air and the table and the map says nothing about them.

Outside air is the part of the air (< ``AIR_HU``) that touches the image border and is as dark as room
air on average (mean < ``ROOM_AIR_MEAN_HU``); lung parenchyma (about -850 HU) is brighter, so a crop
whose lungs reach its border keeps them. The body is the largest connected component of the rest (the
table and other objects separated by air fall away), with the holes of every axial slice filled (lungs
and airways that connect to the outside only through the trachea, above the scan). SimpleITK throughout.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

AIR_HU = -500.0
"""Air and lung are below this; soft tissue, fat (about -100 HU) and bone above."""
ROOM_AIR_MEAN_HU = -950.0
"""Outside air averages about -1000 HU; aerated lung about -850 HU (emphysema down to about -950)."""


def body_mask(image: sitk.Image) -> sitk.Image:
    """uint8 mask (1 body, 0 outside) on ``image``'s grid, for a CT in HU (see the module).

    An image with no outside air at all (a crop inside the body) is all body.
    """
    image = sitk.Cast(image, sitk.sitkFloat32)
    air = sitk.BinaryThreshold(image, -1e30, AIR_HU, 1, 0)
    components = sitk.ConnectedComponent(air)
    labels = sitk.GetArrayViewFromImage(components)
    border = np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()]))
    stats = sitk.LabelIntensityStatisticsImageFilter()
    stats.Execute(components, image)
    outside = [int(k) for k in border if k and stats.GetMean(int(k)) < ROOM_AIR_MEAN_HU]
    not_outside = np.isin(labels, outside, invert=True).astype(np.uint8)
    inside = sitk.GetImageFromArray(not_outside)
    inside.CopyInformation(image)
    largest = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(inside), sortByObjectSize=True) == 1)
    for k, plane in enumerate(largest):  # slices as plain 2-D images: their holes do not depend on geometry
        largest[k] = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(plane)))
    body = sitk.GetImageFromArray(largest.astype(np.uint8))
    body.CopyInformation(image)
    return body
