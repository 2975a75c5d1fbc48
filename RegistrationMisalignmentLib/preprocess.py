"""From two images to network input blocks: 1 mm grid, HU window, the x4/x2/x1 pyramid, blocks.

One implementation serves inference and training (the trainer cuts its patches with
``scale_blocks`` too), so what the network sees in training is exactly what it sees at run time.

Grids. The 1 mm grid keeps the fixed image's origin and direction, its axes put in LPS order. Pyramid level s holds the
Gaussian-smoothed 1 mm image sampled at every s-th voxel: level voxel q sits on 1 mm voxel s*q.
Blocks may reach outside the image; they are padded with the normalised background (air).
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from RegistrationMisalignmentLib.config import MisalignmentConfig, round_up_encoder_output

Triple = tuple[int, int, int]

SMOOTH_CHUNK_VOXELS = 1 << 22
"""Voxels per channel that one smoothing convolution reads at a time (16 MB in float32)."""


def isotropic_reference(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """An empty image on the isotropic grid that covers ``image``, its axes in LPS order.

    ``image``'s grid is first re-indexed (axes permuted and flipped, the same voxel centres:
    ``sitk.DICOMOrient``) so that its axes run as close to L, P, S as they can, and the grid starts at that
    one's origin along its axes: the network learnt on chest CTs stored that way (axial slices, the
    breathing along the array's first axis), and a scan stored sagittally or flipped gave another map of the
    same pair. An LPS image's grid is unchanged; an oblique one keeps its tilt.
    """
    geometry = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    geometry.CopyInformation(image)
    oriented = sitk.DICOMOrient(geometry, "LPS")
    extent = np.array(oriented.GetSize()) * np.array(oriented.GetSpacing())
    size = [max(1, int(math.ceil(e / spacing_mm - 1e-6))) for e in extent]
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetOrigin(oriented.GetOrigin())
    ref.SetDirection(oriented.GetDirection())
    ref.SetSpacing([spacing_mm] * 3)
    return ref


def resample_onto(image: sitk.Image, reference: sitk.Image, default: float,
                  interpolator: int = sitk.sitkLinear) -> sitk.Image:
    """``image`` resampled onto ``reference``'s grid (physical space, identity transform)."""
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, float(default), sitk.sitkFloat32)


def normalize_hu(array: np.ndarray | torch.Tensor, config: MisalignmentConfig) -> np.ndarray | torch.Tensor:
    """Clip to the HU window and map it linearly to [-1, 1] (float32; a tensor stays on its device)."""
    lo, hi = config.hu_window
    scaled = (array.clip(lo, hi) - lo) * (2.0 / (hi - lo)) - 1.0
    return scaled.float() if isinstance(scaled, torch.Tensor) else scaled.astype(np.float32)


def background_value(config: MisalignmentConfig) -> float:
    """Normalised value of air, used to pad blocks that reach outside the image."""
    return float(normalize_hu(np.array([config.background_hu]), config)[0])


def smooth(volume: torch.Tensor, sigma: float | tuple[float, float, float], stride: int = 1) -> torch.Tensor:
    """Separable Gaussian of (C, D, H, W); ``sigma`` in voxels, one value or per axis (z, y, x).

    Edges are replicated, so no dark rim appears at the image border. Axes with sigma <= 0 are left alone.
    ``stride`` > 1 keeps every stride-th voxel (from 0) of each axis, inside that axis's pass: the same
    numbers as smoothing then subsampling, without ever holding the smoothed full-resolution volume.
    """
    sigmas = (sigma,) * 3 if isinstance(sigma, (int, float)) else sigma
    channels = volume.shape[0]
    out = volume[None]
    for axis, s in enumerate(sigmas):
        strides = [1, 1, 1]
        strides[axis] = stride
        if s <= 0:
            out = out[(slice(None), slice(None), *(slice(None, None, k) for k in strides))]
            continue
        radius = max(1, math.ceil(3 * s))
        taps = torch.arange(-radius, radius + 1, dtype=volume.dtype, device=volume.device)
        kernel = torch.exp(-0.5 * (taps / s) ** 2)
        kernel_shape = [1, 1, 1]
        kernel_shape[axis] = kernel.numel()
        kernel = (kernel / kernel.sum()).reshape(1, 1, *kernel_shape).expand(channels, 1, *kernel_shape)
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius  # F.pad lists the last axis first
        # The pass mixes voxels along ``axis`` only, so on the host it runs in chunks along another axis:
        # the padded copy and the convolution's work buffers then stay small, whatever the volume's size.
        # A GPU takes the whole pass in one call (its memory goal is met; benchmarks/results/speed_gpu_h100).
        other = 2 + (axis + 1) % 3
        chunk = out.shape[other]
        if volume.device.type == "cpu":
            chunk = max(1, SMOOTH_CHUNK_VOXELS // max(1, out[0, 0].numel() // out.shape[other]))
        parts = [F.conv3d(F.pad(part, pad, mode="replicate"), kernel, stride=strides, groups=channels)
                 for part in out.split(chunk, dim=other)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=other)  # one part: no copy
    return out[0]


def build_pyramid(fixed: np.ndarray, moving: np.ndarray, config: MisalignmentConfig,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[int, torch.Tensor]:
    """Normalised (2, D_s, H_s, W_s) tensors for every scale s, from HU arrays on the 1 mm grid.

    Channel 0 is the fixed image, channel 1 the (deformed) moving image. The levels are computed in
    float32 one image at a time and stored as ``dtype``: a float16 pyramid takes half the memory. Each
    image's float32 level is dropped as soon as it is stored (calling ``pyramid_of`` per image held it
    longer: +0.4 GB peak RSS at twice the chest CT).
    """
    levels: dict[int, torch.Tensor] = {}
    for channel, array in enumerate((fixed, moving)):
        image = torch.from_numpy(normalize_hu(array, config)[None]).to(device)
        for s in config.scales:
            level = pyramid_level(image, s, config)
            if s not in levels:
                levels[s] = torch.empty((2, *level.shape[1:]), dtype=dtype, device=level.device)
            levels[s][channel] = level[0]
        del image, level
    return levels


def pyramid_of(pair: torch.Tensor, config: MisalignmentConfig) -> dict[int, torch.Tensor]:
    """Every level of a normalised 1 mm (2, D, H, W) pair, on the pair's device."""
    return {s: pyramid_level(pair, s, config) for s in config.scales}


def pyramid_level(volume: torch.Tensor, scale: int, config: MisalignmentConfig) -> torch.Tensor:
    """Level ``scale`` of a normalised 1 mm volume (C, D, H, W): Gaussian anti-alias, then every s-th voxel."""
    if scale == 1:
        return volume.contiguous()
    return smooth(volume, config.smoothing_sigma_per_scale * scale, stride=scale).contiguous()


def extract_block(volume: torch.Tensor, start: Triple, size: Triple, fill: float) -> torch.Tensor:
    """Block (C, *size) of ``volume`` (C, D, H, W) from ``start``; outside voxels take ``fill``."""
    out = volume.new_full((volume.shape[0], *size), fill)
    src, dst = [], []
    for axis in range(3):
        n = volume.shape[axis + 1]
        a, b = max(start[axis], 0), min(start[axis] + size[axis], n)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - start[axis], b - start[axis]))
    out[(slice(None), *dst)] = volume[(slice(None), *src)]
    return out


def block_geometry(p0: Triple, out_size: Triple, config: MisalignmentConfig) -> dict[int, tuple[Triple, Triple]]:
    """Input block (start, size) per scale for the 1 mm output block starting at ``p0``.

    ``p0`` must be a multiple of 4 on every axis (see ``networks.model``). The blocks give at least
    ``out_size`` output voxels; encoder sizes are rounded up to what the encoder can produce, so the
    model may return a few extra voxels at the high end, which the caller drops.
    """
    if any(p % 4 for p in p0):
        raise ValueError(f"block start {p0} must be a multiple of 4 on every axis")
    m, ctx = config.decoder_margin, config.encoder_context
    fine = tuple(round_up_encoder_output(n + 2 * m) for n in out_size)
    starts = tuple(p - m for p in p0)
    geometry = {1: (tuple(s - ctx for s in starts), tuple(f + 2 * ctx for f in fine))}
    for s in config.scales:
        if s == 1:
            continue
        q0 = [math.floor(p / s) for p in starts]
        phase = [p - s * q for p, q in zip(starts, q0)]
        length = [round_up_encoder_output((r + f - 1) // s + 2) for r, f in zip(phase, fine)]
        geometry[s] = (tuple(q - ctx for q in q0), tuple(n + 2 * ctx for n in length))
    return geometry


def scale_blocks(pyramid: dict[int, torch.Tensor], p0: Triple, out_size: Triple,
                 config: MisalignmentConfig, scales: tuple[int, ...] | None = None) -> dict[int, torch.Tensor]:
    """The encoders' input blocks (2, ...) per scale for one 1 mm output block (see ``block_geometry``)."""
    fill = background_value(config)
    geometry = block_geometry(p0, out_size, config)
    return {s: extract_block(pyramid[s], *geometry[s], fill) for s in (scales or config.scales)}
