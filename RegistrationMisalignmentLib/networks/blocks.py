"""Small building blocks shared by the encoder and the decoders."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    """3-D convolution -> batch norm -> ReLU. ``padding=0`` (valid) unless asked otherwise.

    The bias is dropped because batch norm's shift makes it redundant.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1, padding: int = 0):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """Convolution and batch norm without the ReLU: an affine map (in eval mode) that commutes with
        any interpolation whose weights sum to one, so it can run on a coarse grid before resampling."""
        return self[1](self[0](x))


def center_crop(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Crop the last three axes of ``x`` (B, C, D, H, W) symmetrically to ``size``.

    Raises if a side would be cropped by an odd number of voxels: in a valid-convolution network that
    means two branches are not aligned, which must never pass silently.
    """
    d, h, w = x.shape[-3], x.shape[-2], x.shape[-1]
    cd, ch, cw = d - size[0], h - size[1], w - size[2]
    if cd < 0 or ch < 0 or cw < 0 or cd % 2 != 0 or ch % 2 != 0 or cw % 2 != 0:
        raise RuntimeError(f"cannot centre-crop {[d, h, w]} to {size}")
    return x[:, :, cd // 2 : d - cd // 2, ch // 2 : h - ch // 2, cw // 2 : w - cw // 2]


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Fixed trilinear upsampling n -> 2n - 1 (``align_corners``): coarse voxel i lands on fine 2i.

    Only interior values are produced (no half-weighted borders), which keeps the encoder exactly
    shift-equivariant so that tiled inference equals one-shot inference.
    """
    size = [2 * x.shape[-3] - 1, 2 * x.shape[-2] - 1, 2 * x.shape[-1] - 1]
    return F.interpolate(x, size=size, mode="trilinear", align_corners=True)
