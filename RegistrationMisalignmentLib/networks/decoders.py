"""Decoders that turn the three scale-aligned feature maps into class probabilities.

All decoders use zero-padded 3x3x3 convolutions; their border voxels are therefore approximate and
the caller crops ``config.decoder_margin`` voxels per side (the conv-LSTM's 3 steps reach 3 voxels).
Every decoder starts with one 1x1x1 ``reduce`` block (conv, BN, ReLU) per input scale, which the
model applies (``MisalignmentNet.reduced_features``) so that the coarse scales are reduced before
they are resampled; ``decode`` takes the reduced maps and returns a list of per-step logits: one
entry for the CNNs, one per hierarchy level for the conv-LSTM.
"""

from __future__ import annotations

import torch
from torch import nn

from RegistrationMisalignmentLib.networks.blocks import ConvBNReLU


class ConvLSTMCell(nn.Module):
    """Convolutional LSTM cell (Shi et al. 2015): all four gates are one 3-D convolution over [x, h]."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.gates = nn.Conv3d(in_channels + hidden_channels, 4 * hidden_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i, f, o, g = torch.chunk(self.gates(torch.cat([x, h], 1)), 4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c

    def first(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(x, 0, 0)`` without convolving the zero state: half the gate FLOPs of step 1."""
        weight = self.gates.weight[:, : x.shape[1]]
        gates = nn.functional.conv3d(x, weight, self.gates.bias, padding=self.gates.padding)
        i, f, o, g = torch.chunk(gates, 4, dim=1)
        c = torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class HierarchicalLSTMDecoder(nn.Module):
    """The proposed decoder: features L4, L2, L1 fed in sequence to one conv-LSTM.

    Step k predicts ``step_classes[k]`` classes (2, 3, 4 for the 6-3-1 split) from its hidden state,
    refining the misalignment classes coarse to fine. The cell's weights are shared over the steps;
    each step has its own 1x1x1 classifier since the class count changes.
    """

    def __init__(self, in_channels: int, step_classes: list[int], hidden_channels: int = 16):
        super().__init__()
        self.reduce = nn.ModuleList([ConvBNReLU(in_channels, hidden_channels, kernel_size=1) for _ in step_classes])
        self.cell = ConvLSTMCell(hidden_channels, hidden_channels)
        self.classifiers = nn.ModuleList([nn.Conv3d(hidden_channels, n, kernel_size=1) for n in step_classes])

    def decode(self, reduced: list[torch.Tensor]) -> list[torch.Tensor]:
        """``reduced`` coarse to fine ([L4, L2, L1] after ``reduce``), each (B, hidden, F, F, F), one grid."""
        h, c = self.cell.first(reduced[0])
        logits: list[torch.Tensor] = []
        for step, classify in enumerate(self.classifiers):
            if step > 0:
                h, c = self.cell(reduced[step], h, c)
            logits.append(classify(h))
        return logits


class CNNDecoder(nn.Module):
    """Convolutional head: per-scale 1x1x1 reduction, concatenation, conv (BN + ReLU) x2 -> 3 classes.

    With all three scales it is the paper's multi-scale CNN; with L1 only, the single-scale CNN.
    The 1x1x1 reduction keeps the 3x3x3 convolutions cheap on whole images (the decoder runs on
    every 1 mm voxel, so its cost adds directly to the encoders').
    """

    def __init__(self, in_channels: int, num_scales: int, num_classes: int = 3, reduced_channels: int = 16,
                 widths: tuple[int, int] = (32, 32)):
        super().__init__()
        self.num_scales = num_scales
        self.reduce = nn.ModuleList([ConvBNReLU(in_channels, reduced_channels, kernel_size=1) for _ in range(num_scales)])
        self.head = nn.Sequential(
            ConvBNReLU(reduced_channels * num_scales, widths[0], padding=1),
            ConvBNReLU(widths[0], widths[1], padding=1),
            nn.Conv3d(widths[1], num_classes, kernel_size=1),
        )

    def decode(self, reduced: list[torch.Tensor]) -> list[torch.Tensor]:
        """``reduced``: one map per scale used (coarse to fine), after ``reduce``, on one grid."""
        return [self.head(torch.cat(reduced, 1))]
