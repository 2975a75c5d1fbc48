"""Dense displacement fields on a voxel grid: warping, composition, upsampling.

Convention (shared with the trainer): a DVF is (3, D, H, W) in mm, components (x, y, z) along the
image's i, j, k axes, and the deformed image is I_D(x) = I(x + u(x)); so |u(x)| is the misalignment
at fixed-grid point x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from RegistrationMisalignmentLib.networks.model import align_to_fine

Spacing = tuple[float, float, float]


def sample(volume: torch.Tensor, dvf: torch.Tensor, spacing: Spacing, mode: str, padding_mode: str) -> torch.Tensor:
    """Sample a (C, D, H, W) volume at x + u(x) (voxel centres, align_corners=True)."""
    _, depth, height, width = dvf.shape
    coords = []
    for component, (n, step, view) in enumerate(zip((width, height, depth), spacing,
                                                    ((1, 1, -1), (1, -1, 1), (-1, 1, 1)))):
        index = torch.arange(n, device=dvf.device, dtype=dvf.dtype).reshape(view)
        coords.append((index + dvf[component] / step) * (2.0 / max(n - 1, 1)) - 1.0)
    grid = torch.stack(coords, dim=-1)[None].to(volume.dtype)
    return F.grid_sample(volume[None], grid, mode=mode, padding_mode=padding_mode, align_corners=True)[0]


def warp(image: torch.Tensor, dvf: torch.Tensor, spacing: Spacing = (1.0, 1.0, 1.0), fill: float = -1000.0,
         mode: str = "bilinear") -> torch.Tensor:
    """I_D(x) = I(x + u(x)) for a (D, H, W) or (C, D, H, W) image; points outside read ``fill``."""
    channels = image.dim() == 4
    shifted = image.float() - fill  # zero padding of the shifted image is padding with fill
    out = sample(shifted if channels else shifted[None], dvf.to(shifted.device), spacing, mode, "zeros") + fill
    return out if channels else out[0]


def compose(first: torch.Tensor, second: torch.Tensor, spacing: Spacing = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """u(x) = u0(x) + u1(x + u0(x)) for first = u0, second = u1 (edges replicated).

    Warping with the result equals warping the image by u1 and then the result by u0: use it to stack
    a synthetic field on a real residual, or to add a residual estimated on an already-warped image.
    """
    return first + sample(second, first, spacing, "bilinear", "border")


def upsample_dvf(coarse: torch.Tensor, scale: int, fine_shape: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear upsampling of a pyramid-level DVF (coarse voxel q on fine voxel scale*q)."""
    padded = F.pad(coarse.unsqueeze(0), (0, 1, 0, 1, 0, 1), mode="replicate")
    return align_to_fine(padded, list(fine_shape), 0, scale)[0]
