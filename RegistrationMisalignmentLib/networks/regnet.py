"""RegNet "U-Net advanced" (Uadv): the per-scale encoder of the method, and its DVF head.

Topology after ``functions/network/crop4_connection.py`` of the authors' public code
(hsokooti/RegNet, Apache-2.0): a full-resolution branch R1 that is cropped to the centre right after
its first convolution, and two max-pooled branches R2, R4 (dilated convolutions) that carry the wide
context and are upsampled (fixed trilinear kernel) back onto R1's grid. All convolutions are valid
and followed by batch norm + ReLU.

Two deliberate changes from the TensorFlow code, both documented in the tests:
- the upsampling emits interior values only (n -> 2n - 1) and the crops were re-chosen so that no
  zero-padded border ever reaches the output; the network is then exactly equivariant to input
  shifts of 4 voxels, the property tiled inference relies on;
- channel widths are scaled (x ~0.76) so that encoder + DVF head total ~737k parameters, the count the
  paper reports for Uadv (the TF widths give 1.26M).

Geometry: an input of side n = 101 + 4k (k >= -8) gives features of side n - 76; feature voxel i
sits on input voxel i + 38. The DVF head adds two valid 3x3x3 convolutions: DVF side n - 80, voxel i
on input voxel i + 40.
"""

from __future__ import annotations

import torch
from torch import nn

from RegistrationMisalignmentLib.networks.blocks import ConvBNReLU, center_crop, upsample2

R1_WIDTHS = (12, 16, 18, 22, 24, 24, 24)
R2_WIDTHS = (22, 22, 24, 26, 28, 28)
R2_MERGE_WIDTH = 30
R4_WIDTHS = (30, 30, 32, 34, 34)
R4_DILATIONS = (1, 1, 2, 2, 1)
R4_MERGE_WIDTHS = (34, 30)
HEAD_WIDTHS = (90, 46)

ENCODER_CONTEXT = 38
"""Input voxels consumed per side by the encoder (101 -> 25)."""
HEAD_CONTEXT = 2
"""Extra voxels per side consumed by the DVF head (25 -> 21)."""


def _chain(in_channels: int, widths: tuple[int, ...], dilations: tuple[int, ...] | None = None) -> nn.Sequential:
    dilations = dilations or (1,) * len(widths)
    layers = []
    for width, dilation in zip(widths, dilations):
        layers.append(ConvBNReLU(in_channels, width, dilation=dilation))
        in_channels = width
    return nn.Sequential(*layers)


class RegNetEncoder(nn.Module):
    """Two-channel (fixed, deformed moving) patch -> multi-branch feature map.

    Input (B, 2, n, n, n) with n = 101 + 4k; output (B, ``out_channels``, n - 76, ...).
    """

    out_channels: int = R1_WIDTHS[-1] + R2_MERGE_WIDTH + R4_MERGE_WIDTHS[-1]

    def __init__(self, in_channels: int = 2):
        super().__init__()
        self.context = ENCODER_CONTEXT
        self.r1_first = ConvBNReLU(in_channels, R1_WIDTHS[0])
        self.r1 = _chain(R1_WIDTHS[0], R1_WIDTHS[1:])
        self.pool = nn.MaxPool3d(2)
        self.r2_first = ConvBNReLU(R1_WIDTHS[0], R2_WIDTHS[0])
        self.r2_conv2 = ConvBNReLU(R2_WIDTHS[0], R2_WIDTHS[1])
        self.r2_dilated = nn.ModuleList(
            [ConvBNReLU(a, b, dilation=2) for a, b in zip(R2_WIDTHS[1:-1], R2_WIDTHS[2:])]
        )
        self.r2_merge = ConvBNReLU(R2_WIDTHS[-1] + R1_WIDTHS[0], R2_MERGE_WIDTH)
        self.r4 = _chain(R2_WIDTHS[0], R4_WIDTHS, R4_DILATIONS)
        self.r4_merge1 = ConvBNReLU(R4_WIDTHS[-1] + R2_WIDTHS[4], R4_MERGE_WIDTHS[0])
        self.r4_merge2 = ConvBNReLU(R4_MERGE_WIDTHS[0] + R1_WIDTHS[0], R4_MERGE_WIDTHS[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.r1_first(x)                                   # n - 2
        out_size = [s - 2 * self.context for s in x.shape[-3:]]
        r1 = self.r1(center_crop(c1, [s + 12 for s in out_size]))  # -> out

        r2_in = self.r2_first(self.pool(c1))
        r2 = self.r2_conv2(center_crop(r2_in, [s - 14 for s in r2_in.shape[-3:]]))
        r2_levels: list[torch.Tensor] = []
        for conv in self.r2_dilated:
            r2 = conv(r2)
            r2_levels.append(r2)
        conv5_r2 = r2_levels[-2]
        up2 = upsample2(r2)
        skip = [s + 2 for s in out_size]
        r2_out = self.r2_merge(torch.cat([center_crop(up2, skip), center_crop(c1, skip)], 1))

        r4 = self.r4(self.pool(r2_in))
        up4 = upsample2(r4)
        mid = [s for s in up4.shape[-3:]]
        r4 = self.r4_merge1(torch.cat([up4, center_crop(conv5_r2, mid)], 1))
        up4 = upsample2(r4)
        r4_out = self.r4_merge2(torch.cat([center_crop(up4, skip), center_crop(c1, skip)], 1))
        return torch.cat([r1, r2_out, r4_out], 1)


def dvf_head() -> nn.Sequential:
    """RegNet's DVF regression head: encoder features (B, 84, n, ...) -> displacement (B, 3, n - 4, ...) in mm."""
    return nn.Sequential(
        ConvBNReLU(RegNetEncoder.out_channels, HEAD_WIDTHS[0]),
        ConvBNReLU(HEAD_WIDTHS[0], HEAD_WIDTHS[1]),
        nn.Conv3d(HEAD_WIDTHS[1], 3, kernel_size=1),
    )


class RegNet(nn.Module):
    """Uadv encoder + DVF regression head: the registration network pre-trained per scale.

    Output (B, 3, n - 80, ...): displacement in mm, components (x, y, z) along the image axes.
    """

    def __init__(self, in_channels: int = 2):
        super().__init__()
        self.encoder = RegNetEncoder(in_channels)
        self.head = dvf_head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))
