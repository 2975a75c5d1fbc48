"""The assembled misalignment model (3 encoders + decoder) and the RegNet-t baseline.

Spatial alignment across scales is explicit. The caller hands each encoder a block of its own
pyramid level (see ``preprocess.scale_blocks``) such that, with P the first 1 mm voxel of the fine
feature block, the coarse block of scale s starts at coarse voxel floor(P / s). Fine voxel P + j then
sits at coarse coordinate (r_s + j) / s inside that block, r_s = P mod s. Both training patches and
inference tiles start at 1 mm voxels p0 = 0 (mod 4) and P = p0 - margin, so r_s is a constant of the
model. The coarse features are resampled onto the fine grid with separable linear interpolation —
the "crop the central region and upsample" of the method, with the crop and the sub-voxel phase
written down instead of implied.
"""

from __future__ import annotations

import torch
from torch import nn

from RegistrationMisalignmentLib.config import MisalignmentConfig
from RegistrationMisalignmentLib.networks.decoders import CNNDecoder, HierarchicalLSTMDecoder
from RegistrationMisalignmentLib.networks.regnet import RegNet, RegNetEncoder

DECODERS = ("lstm", "multiscale", "singlescale")
"""Trainable decoders; ``regnet-t`` is the untrained baseline built from the registration networks."""


def interpolation_matrix(num_fine: int, num_coarse: int, phase: int, scale: int, device: torch.device) -> torch.Tensor:
    """(num_fine, num_coarse) linear-interpolation weights of fine voxel j at coarse (phase + j) / scale."""
    coords = (torch.arange(num_fine, device=device, dtype=torch.float32) + phase) / scale
    lower = torch.floor(coords).long()
    if int(lower.max()) + 1 >= num_coarse:
        raise RuntimeError(f"coarse block of {num_coarse} voxels too short for {num_fine} fine voxels at scale {scale}")
    frac = coords - lower.to(coords.dtype)
    weights = torch.zeros(num_fine, num_coarse, device=device, dtype=torch.float32)
    rows = torch.arange(num_fine, device=device)
    weights[rows, lower] = 1.0 - frac
    weights[rows, lower + 1] = frac
    return weights


def align_to_fine(coarse: torch.Tensor, fine_size: list[int], phase: int, scale: int) -> torch.Tensor:
    """Resample coarse features (B, C, d, h, w) onto the fine grid ``fine_size`` (trilinear, separable)."""
    wd = interpolation_matrix(fine_size[0], coarse.shape[2], phase, scale, coarse.device).to(coarse.dtype)
    wh = interpolation_matrix(fine_size[1], coarse.shape[3], phase, scale, coarse.device).to(coarse.dtype)
    ww = interpolation_matrix(fine_size[2], coarse.shape[4], phase, scale, coarse.device).to(coarse.dtype)
    x = torch.einsum("bcdhw,Ww->bcdhW", coarse, ww)
    x = torch.einsum("bcdhw,Hh->bcdHw", x, wh)
    return torch.einsum("bcdhw,Dd->bcDhw", x, wd)


class MisalignmentNet(nn.Module):
    """Three RegNet encoders (x4, x2, x1) + one decoder.

    ``forward(x1, x2, x4)`` takes the three input blocks (B, 2, ...) and returns the per-step logits
    on the fine grid, the decoder margin already cropped. ``probabilities`` merges the last step into
    the 3 final classes (correct, poor, wrong). The single-scale decoder ignores x2 and x4 (they may
    be empty tensors); its x4/x2 encoders exist only so that all decoders share one state layout.
    """

    def __init__(self, decoder: str, config: MisalignmentConfig, hidden_channels: int = 16):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"decoder {decoder!r} is not one of {DECODERS}")
        if tuple(config.scales) != (4, 2, 1):
            raise ValueError(f"the model is built for scales (4, 2, 1), got {config.scales}")
        self.decoder_name = decoder
        self.margin = config.decoder_margin
        self.multiscale = decoder != "singlescale"
        self.phase2 = (-config.decoder_margin) % 2
        self.phase4 = (-config.decoder_margin) % 4
        self.encoder4 = RegNetEncoder()
        self.encoder2 = RegNetEncoder()
        self.encoder1 = RegNetEncoder()
        channels = RegNetEncoder.out_channels
        if decoder == "lstm":
            self.step_classes = config.step_num_classes()
            self.decoder = HierarchicalLSTMDecoder(channels, self.step_classes, hidden_channels)
            final_map = torch.as_tensor(config.final_class_map())
        else:
            self.step_classes = [3]
            self.decoder = CNNDecoder(channels, num_scales=3 if self.multiscale else 1)
            final_map = torch.arange(3)
        self.register_buffer("merge", nn.functional.one_hot(final_map, 3).float(), persistent=False)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x4: torch.Tensor) -> list[torch.Tensor]:
        m = self.margin
        return [logit[:, :, m : logit.shape[2] - m, m : logit.shape[3] - m, m : logit.shape[4] - m]
                for logit in self.decoder.decode(self.reduced_features(x1, x2, x4))]

    def reduced_features(self, x1: torch.Tensor, x2: torch.Tensor, x4: torch.Tensor) -> list[torch.Tensor]:
        """The decoder's per-scale 1x1x1 reductions, coarse to fine, all on the fine grid.

        A coarse scale's reduction is conv + BN (affine), then the alignment (weights summing to one),
        then ReLU: in eval mode the same numbers as aligning first (in training, batch norm takes its
        statistics on the coarse grid), but the resampling moves 16 channels instead
        of the encoder's 76 and the 1x1x1 convolution runs on the coarse grid.
        """
        fine = self.encoder1(x1)
        coarse = [fine]
        if self.multiscale:
            coarse = [self.encoder4(x4), self.encoder2(x2), fine]
        size = [fine.shape[2], fine.shape[3], fine.shape[4]]
        reduced: list[torch.Tensor] = []
        for i, reduce in enumerate(self.decoder.reduce):
            if self.multiscale and i < 2:
                scale = 4 if i == 0 else 2
                phase = self.phase4 if i == 0 else self.phase2
                reduced.append(torch.relu(align_to_fine(reduce.linear(coarse[i]), size, phase, scale)))
            else:
                reduced.append(reduce(coarse[i]))
        return reduced

    @torch.jit.export
    def probabilities(self, x1: torch.Tensor, x2: torch.Tensor, x4: torch.Tensor) -> torch.Tensor:
        """Final 3-class probabilities (B, 3, ...): softmax of the last step, auxiliary classes merged."""
        last = torch.softmax(self.forward(x1, x2, x4)[-1].float(), dim=1)
        return torch.einsum("bkdhw,kc->bcdhw", last, self.merge)


class RegNetT(nn.Module):
    """The RegNet-t baseline's networks: one registration RegNet per scale (x4, x2, x1).

    Used as a 3-level registration by ``inference``: x4 first, then x2 and x1 on the result; the
    magnitude of the total displacement is thresholded at 3 and 6 mm.
    """

    def __init__(self, config: MisalignmentConfig):
        super().__init__()
        if tuple(config.scales) != (4, 2, 1):
            raise ValueError(f"RegNet-t is built for scales (4, 2, 1), got {config.scales}")
        self.regnet4 = RegNet()
        self.regnet2 = RegNet()
        self.regnet1 = RegNet()

    def forward(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        """DVF (B, 3, n - 80, ...) in mm for an input block (B, 2, n, ...) of pyramid level ``scale``."""
        if scale == 4:
            return self.regnet4(x)
        if scale == 2:
            return self.regnet2(x)
        return self.regnet1(x)
