"""SimpleITK-equivalent linear resampling between image grids, in torch (used on the GPU).

Why: on a GPU the network is no longer the slow part of ``predict``; SimpleITK resampling to 1 mm
and back on the host, with the transfers around it, took half of the time (benchmarks/speed.py).
Doing it with ``grid_sample`` keeps the whole pipeline on the device.

Same numbers as ``sitk.Resample`` with an identity transform and linear interpolation: a target
voxel maps to the source's continuous index through both images' origin, spacing and direction;
within the half-voxel rim around the source the nearest edge value is used (as ITK's linear
interpolator clamps there), and beyond it either ``default`` or, with ``default=None``, the
nearest voxel (ITK's nearest-neighbour extrapolator). The target grid is processed in slabs of
``slab_voxels`` so that the coordinate grid never holds more than that, whatever the image size.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

SLAB_VOXELS = 1 << 23
"""Target voxels per slab: the float64 coordinates of one slab take 200 MB."""


def index_map(source: sitk.Image, target: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(A, b): source continuous index (x, y, z) = A @ target index (x, y, z) + b, in physical space."""

    def frame(image: sitk.Image) -> np.ndarray:
        direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        return direction @ np.diag(image.GetSpacing())

    to_source = np.linalg.inv(frame(source))
    offset = np.array(target.GetOrigin(), dtype=np.float64) - np.array(source.GetOrigin(), dtype=np.float64)
    return to_source @ frame(target), to_source @ offset


def target_slabs(target: sitk.Image, slab_voxels: int) -> Iterator[tuple[int, int]]:
    """Slice ranges [z0, z1) of ``target`` holding at most ``slab_voxels`` voxels each (at least one slice)."""
    width, height, depth = target.GetSize()
    slab = max(1, slab_voxels // (width * height))
    for z0 in range(0, depth, slab):
        yield z0, min(z0 + slab, depth)


def source_box(source: sitk.Image, target: sitk.Image, z0: int, z1: int) -> tuple[list[int], list[int]]:
    """Source index box [lo, hi) (x, y, z) that target slices z0..z1-1 read, with linear interpolation and
    nearest-voxel extrapolation: resampling a slab from this crop gives the numbers the whole source would.

    The slab maps to a parallelepiped whose corners bound it; one voxel of margin absorbs rounding. Where
    the slab leaves the source the box reaches the source's edge, whose voxels the extrapolation repeats.
    """
    a, b = index_map(source, target)
    width, height, _ = target.GetSize()
    corners = np.array([[x, y, z] for x in (0, width - 1) for y in (0, height - 1) for z in (z0, z1 - 1)], float)
    index = corners @ a.T + b
    size = np.array(source.GetSize())
    lo = np.clip(np.floor(index.min(axis=0)).astype(int) - 1, 0, size - 1)
    hi = np.clip(np.floor(index.max(axis=0)).astype(int) + 3, lo + 1, size)
    return lo.tolist(), hi.tolist()


def resample_to_grid(volume: torch.Tensor, source: sitk.Image, target: sitk.Image, default: float | None,
                     slab_voxels: int = SLAB_VOXELS) -> torch.Tensor:
    """``volume`` (C, D, H, W) on ``source``'s grid, linearly resampled onto ``target``'s: (C, D', H', W').

    ``default`` fills target voxels that lie outside the source; ``None`` extrapolates the nearest voxel.
    """
    if volume.dim() != 4 or tuple(volume.shape[1:]) != tuple(reversed(source.GetSize())):
        raise ValueError(f"volume {tuple(volume.shape)} is not (C, *{tuple(reversed(source.GetSize()))})")
    device = volume.device
    a, b = (torch.from_numpy(v).to(device) for v in index_map(source, target))
    source_size = torch.tensor(source.GetSize(), dtype=torch.float64, device=device)
    width, height, depth = target.GetSize()
    x = torch.arange(width, dtype=torch.float64, device=device).reshape(1, 1, -1, 1)
    y = torch.arange(height, dtype=torch.float64, device=device).reshape(1, -1, 1, 1)
    in_plane = x * a[:, 0] + y * a[:, 1] + b  # (1, H', W', 3): the part of every coordinate that z does not change
    out = volume.new_empty((volume.shape[0], depth, height, width))
    for z0, z1 in target_slabs(target, slab_voxels):
        z = torch.arange(z0, z1, dtype=torch.float64, device=device).reshape(-1, 1, 1, 1)
        index = in_plane + z * a[:, 2]  # (dz, H', W', 3) source (x, y, z) continuous indices
        inside = ((index >= -0.5) & (index < source_size - 0.5)).all(dim=-1, keepdim=True)
        if default is None:  # nearest voxel outside: integer coordinates make the interpolation exact
            index = torch.where(inside, index, torch.minimum(index.round().clamp(min=0), source_size - 1))
        # align_corners=True: -1 and 1 are the centres of the first and last voxel; border padding clamps
        # to them, which is what ITK's linear interpolation does in the half-voxel rim.
        normalised = index * (2.0 / (source_size - 1).clamp(min=1)) - 1.0
        values = F.grid_sample(volume[None], normalised.to(volume.dtype)[None], mode="bilinear",
                               padding_mode="border", align_corners=True)[0]
        if default is not None:
            values = torch.where(inside[..., 0], values, torch.full_like(values, default))
        out[:, z0 : z0 + index.shape[0]] = values
    return out
