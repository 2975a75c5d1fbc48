"""Synthetic displacement fields (DVFs): single frequency, mixed frequency, respiratory, identity.

The four DVF families follow Sokooti et al. (2019, 2021) and their TensorFlow code
(github.com/hsokooti/RegNet: functions/artificial_generation/dvf_generation.py), reimplemented in
vectorised torch so that a training pair is generated in memory, on the GPU when there is one, instead
of through files on disk. ``synthetic.deform`` applies them to an image.

Conventions (shared with the Lib): volumes are (D, H, W) = (z, y, x); a DVF is a float32 tensor
(3, D, H, W) in mm whose components are (x, y, z) along the image's i, j, k axes; spacing is
(sx, sy, sz) mm; the deformed image is I_D(x) = I(x + u(x)), so |u(x)| is the misalignment at
the fixed-grid point x. Every random number comes from the caller's torch.Generator, drawn on
the generator's device and then moved, so one seed gives the same field on CPU and on CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from RegistrationMisalignmentLib.preprocess import smooth

Shape = tuple[int, int, int]
Spacing = tuple[float, float, float]

KINDS = ("single", "mixed", "respiratory", "identity")


@dataclass(frozen=True)
class DVFSettings:
    """Ranges of the synthetic deformations.

    The authors' presets (functions/setting/artificial_generation_setting.py) exist for a
    maximum of 7, 15 and 20 mm; the paper trains with 10 mm, so grid spacings and sigmas below
    sit between their '3D_max7_D14_K' and '3D_max15_D14_K' presets.
    """

    max_displacement_mm: float = 10.0
    """Largest |u| per axis (the paper's 10 mm)."""
    amplitude_ratio: tuple[float, float] = (0.5, 1.0)
    """Each field is rescaled so that its largest per-axis |u| is U(ratio) * max_displacement_mm."""
    single_freq_grid_mm: tuple[float, ...] = (35.0, 40.0, 45.0, 50.0)
    """B-spline knot spacings (authors: 50..20 mm for max 7 mm, 60..35 mm for max 15 mm)."""
    grid_smoothing_sigma: float = 0.8
    """Gaussian sigma, in control points, applied to the random coefficients (authors: 0.8)."""
    mixed_freq_grid_mm: tuple[float, ...] = (25.0, 35.0, 45.0)
    """Knot spacings of the mixed-frequency base field (authors: 50..20 mm at 7, 60..35 mm at 15)."""
    mixed_sigma_mm: tuple[float, float] = (5.0, 10.0)
    """Sigma of the Gaussian that smooths the switched field (authors: 5-10 voxels at 7 mm, 7-12 at 15)."""
    mixed_region_mm: float = 20.0
    """Knot spacing of the random field whose sign switches the base field on and off
    (the authors grow and delete blocks of radius 20 voxels)."""
    respiratory_expansion_mm: tuple[float, float] = (3.0, 8.0)
    """Transversal displacement at the body outline, at and below the lung base."""
    diaphragm_shift_mm: tuple[float, float] = (5.0, 10.0)
    """Cranio-caudal shift at and below the lung base (authors: t0 = 15 mm at 7, 22 mm at 15,
    with the sum rescaled to the maximum afterwards)."""
    respiratory_single_freq_ratio: float = 0.5
    """Amplitude of the added single-frequency field, as a fraction of the maximum (authors: 0.5)."""
    noise_sigma_hu: float = 5.0
    """Gaussian noise added to the deformed image (the paper: 5 HU)."""
    sponge_clamp: tuple[float, float] = (0.5, 2.0)
    """Range of the local volume ratio used by the sponge model (authors clamp to 0.7-1.3)."""


# ---- random draws ---------------------------------------------------------------------------
def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand(1, generator=generator, device=generator.device).item()


def _choice(generator: torch.Generator, options: tuple[float, ...]) -> float:
    return options[int(torch.randint(len(options), (1,), generator=generator, device=generator.device).item())]


def _amplitude(generator: torch.Generator, settings: DVFSettings) -> float:
    lo, hi = settings.amplitude_ratio
    return _uniform(generator, lo, hi) * settings.max_displacement_mm


def _rescale(u: torch.Tensor, peak: float) -> torch.Tensor:
    """Scale ``u`` so that its largest per-axis |u| equals ``peak`` (the authors' normalize_dvf)."""
    current = u.abs().amax()
    return u * (peak / current) if current > 0 else u


# ---- building blocks ----------------------------------------------------------------------
def _bspline_weights(n_voxels: int, spacing: float, knot_mm: float, device: torch.device) -> torch.Tensor:
    """(n_voxels, n_ctrl) cubic B-spline basis values of a uniform knot grid centred on the axis.

    Two spare knots beyond each end keep the four supporting knots of every voxel inside the grid.
    """
    extent = (n_voxels - 1) * spacing
    n_ctrl = math.ceil(extent / knot_mm) + 5
    knots = extent / 2 + (torch.arange(n_ctrl, device=device, dtype=torch.float32) - (n_ctrl - 1) / 2) * knot_mm
    positions = torch.arange(n_voxels, device=device, dtype=torch.float32) * spacing
    t = ((positions[:, None] - knots[None, :]) / knot_mm).abs()
    inner = (4 - 6 * t**2 + 3 * t**3) / 6
    outer = (2 - t).clamp(min=0) ** 3 / 6
    return torch.where(t < 1, inner, outer)


def _bspline_field(shape: Shape, spacing: Spacing, knot_mm: float, generator: torch.Generator,
                   grid_sigma: float, device: torch.device) -> torch.Tensor:
    """A (3, D, H, W) cubic B-spline field with random coefficients, evaluated exactly (separable)."""
    depth, height, width = shape
    sx, sy, sz = spacing
    wz = _bspline_weights(depth, sz, knot_mm, device)
    wy = _bspline_weights(height, sy, knot_mm, device)
    wx = _bspline_weights(width, sx, knot_mm, device)
    grid = (3, wz.shape[1], wy.shape[1], wx.shape[1])
    coeff = torch.rand(grid, generator=generator, device=generator.device).to(device) * 2 - 1
    coeff = smooth(coeff, (grid_sigma,) * 3)
    # Contract one axis at a time (x, then y, then z): never an intermediate larger than the field.
    field = torch.einsum("wi,ckji->ckjw", wx, coeff)
    field = torch.einsum("hj,ckjw->ckhw", wy, field)
    return torch.einsum("dk,ckhw->cdhw", wz, field).contiguous()


def _device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


# ---- the four kinds -----------------------------------------------------------------------
def single_frequency_dvf(shape: Shape, spacing: Spacing, generator: torch.Generator,
                         settings: DVFSettings = DVFSettings(), device=None) -> torch.Tensor:
    """Random coefficients on one uniform cubic B-spline grid (one spatial frequency).

    Coefficients are uniform, smoothed over the control grid, evaluated exactly as a cubic
    B-spline on the dense grid, then rescaled to a random peak <= max_displacement_mm.
    """
    knot = _choice(generator, settings.single_freq_grid_mm)
    u = _bspline_field(shape, spacing, knot, generator, settings.grid_smoothing_sigma, _device(device))
    return _rescale(u, _amplitude(generator, settings))


def mixed_frequency_dvf(shape: Shape, spacing: Spacing, generator: torch.Generator,
                        settings: DVFSettings = DVFSettings(), device=None) -> torch.Tensor:
    """A B-spline field switched on and off in random regions, then smoothed with a small Gaussian.

    As in the authors' code the switch is per component; their switched regions grow from image
    edges in the lung, here they are where a coarse random field is positive. The switch edges,
    blurred by a sigma smaller than the knot spacing, add the higher frequencies.
    """
    device = _device(device)
    knot = _choice(generator, settings.mixed_freq_grid_mm)
    base = _bspline_field(shape, spacing, knot, generator, settings.grid_smoothing_sigma, device)
    switch = _bspline_field(shape, spacing, settings.mixed_region_mm, generator, 0.0, device) > 0
    sigma = _uniform(generator, *settings.mixed_sigma_mm)
    sx, sy, sz = spacing
    u = smooth(base * switch, (sigma / sz, sigma / sy, sigma / sx))
    return _rescale(u, _amplitude(generator, settings))


def _axis_span(mask: torch.Tensor | None, axis: int, n: int, spacing: float, fraction: float = 0.0) -> tuple[float, float]:
    """First and last position (mm) along ``axis`` where the mask's other-axes count exceeds
    ``fraction`` of its maximum; the whole axis when there is no mask."""
    if mask is None or not bool(mask.any()):
        return 0.0, (n - 1) * spacing
    others = tuple(a for a in range(3) if a != axis)
    count = mask.sum(dim=others).float()
    idx = torch.nonzero(count > fraction * count.max()).flatten()
    return idx[0].item() * spacing, idx[-1].item() * spacing


def respiratory_dvf(shape: Shape, spacing: Spacing, generator: torch.Generator,
                    settings: DVFSettings = DVFSettings(), device=None,
                    body_mask: torch.Tensor | None = None, lung_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Breathing: transversal expansion + diaphragm shift + a single-frequency field (after Hub et al. 2009).

    Both motions are full at and below the lung base and fade to zero at mid-lung with the
    authors' logarithmic profile (dvf_generation.respiratory_motion). The expansion is radial
    about the body centre (body_mask; the image centre without one), proportional to the
    normalised distance and constant outside the body. The lung base and height come from
    lung_mask (without one: base at a quarter of the height, apex at the top). Inhale or exhale
    is drawn at random. The result is rescaled, not clipped, when it exceeds the maximum so it
    stays smooth.
    """
    device = _device(device)
    depth, height, width = shape
    sx, sy, sz = spacing
    x0, x1 = _axis_span(body_mask, 2, width, sx)
    y0, y1 = _axis_span(body_mask, 1, height, sy)
    base, top = _axis_span(lung_mask, 0, depth, sz, fraction=0.1)
    if lung_mask is None or not bool(lung_mask.any()):
        base = 0.25 * top
    half_lung = max((top - base) / 2, sz)
    alpha = 1.3 / half_lung  # the authors' constant

    z = torch.arange(depth, device=device, dtype=torch.float32) * sz
    rise = (z - base).clamp(0, half_lung)
    top_rise = torch.tensor(half_lung, device=device, dtype=torch.float32)  # same rounding as rise: exactly 0 above
    profile = (1 - torch.log1p(rise * alpha) / torch.log1p(top_rise * alpha))[:, None, None]
    rel_x = ((torch.arange(width, device=device, dtype=torch.float32) * sx - (x0 + x1) / 2)
             / max((x1 - x0) / 2, sx)).clamp(-1, 1)[None, None, :]
    rel_y = ((torch.arange(height, device=device, dtype=torch.float32) * sy - (y0 + y1) / 2)
             / max((y1 - y0) / 2, sy)).clamp(-1, 1)[None, :, None]

    expansion = _uniform(generator, *settings.respiratory_expansion_mm)
    shift = _uniform(generator, *settings.diaphragm_shift_mm)
    sign = 1.0 if _uniform(generator, 0.0, 1.0) < 0.5 else -1.0
    # Inhale (sign +1): in I_D the chest is wider and the diaphragm lower, so I_D(x) = I(x + u)
    # samples nearer the centre (u points inward) and further up (u_z > 0).
    u = torch.stack(torch.broadcast_tensors(-sign * expansion * profile * rel_x,
                                            -sign * expansion * profile * rel_y,
                                            sign * shift * profile))
    random_part = single_frequency_dvf(shape, spacing, generator, settings, device)
    random_part[2] *= 0.3  # the authors keep the cranio-caudal part of this field small
    u = u + settings.respiratory_single_freq_ratio * random_part
    peak = u.abs().amax().item()
    return _rescale(u, settings.max_displacement_mm) if peak > settings.max_displacement_mm else u


def identity_dvf(shape: Shape, device=None) -> torch.Tensor:
    """No deformation: perfectly aligned pairs, all labelled correct."""
    return torch.zeros((3, *shape), dtype=torch.float32, device=_device(device))


def random_dvf(kind: str, shape: Shape, spacing: Spacing, generator: torch.Generator,
               settings: DVFSettings = DVFSettings(), device=None,
               body_mask: torch.Tensor | None = None, lung_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One DVF of ``kind`` (one of KINDS); the masks are used by the respiratory kind only."""
    if kind == "single":
        return single_frequency_dvf(shape, spacing, generator, settings, device)
    if kind == "mixed":
        return mixed_frequency_dvf(shape, spacing, generator, settings, device)
    if kind == "respiratory":
        return respiratory_dvf(shape, spacing, generator, settings, device, body_mask, lung_mask)
    if kind == "identity":
        return identity_dvf(shape, device)
    raise ValueError(f"DVF kind {kind!r} is not one of {KINDS}")
