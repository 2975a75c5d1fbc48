"""Stage 2's auxiliary DVF regression (``TrainConfig.dvf_loss_weight``): a RegNet DVF head per scale on the
misalignment model's encoder features, trained beside it and never exported.

Why: the misalignment model's encoders are RegNets (Sokooti et al. 2021, Sec. III-A), pre-trained to register and
then trained on classes alone. After an affine registration the misalignment is a smooth 3-10 mm motion that only
features which measure displacement can tell apart; the heads keep the encoders registering while the decoder
learns to classify. The heads start from stage 1's (the same architecture, ``RegNet.head``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from RegistrationMisalignmentLib.networks.model import MisalignmentNet
from RegistrationMisalignmentLib.networks.regnet import dvf_head
from trainer.dataset import weighted_huber

SCALES = (4, 2, 1)


class DVFHeads(nn.Module):
    """One RegNet DVF head per scale: encoder features (B, 84, n, ...) -> DVF (B, 3, n - 4, ...) in mm, components
    (x, y, z) along the image axes, on that scale's grid."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({str(s): dvf_head() for s in SCALES})

    def start_from(self, regnets: dict[int, dict[str, torch.Tensor]]) -> None:
        """Copy each scale's head from stage 1's RegNet weights (``{scale: RegNet state dict}``)."""
        for scale, weights in regnets.items():
            self.heads[str(scale)].load_state_dict({k.removeprefix("head."): v for k, v in weights.items()
                                                    if k.startswith("head.")})

    def loss(self, features: dict[int, torch.Tensor],
             targets: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over the scales that ran of the weighted Huber loss (mm) of each head's DVF against ``targets``
        (``trainer.dataset.Batch.dvfs``, on the features' device), and (detached, for the history) the weighted
        end-point errors (mm) of the heads and of the zero predictor, as a tensor of two."""
        losses, errors = [], []
        for scale, feature in features.items():
            target, weights = targets[scale]
            dvf = self.heads[str(scale)](feature)
            losses.append(weighted_huber(dvf, target, weights))
            total = weights.sum().clamp(min=1e-6)
            end_point = (dvf.detach().float() - target).square().sum(1, keepdim=True).sqrt()
            errors.append(torch.stack([(end_point * weights).sum() / total,
                                       (target.square().sum(1, keepdim=True).sqrt() * weights).sum() / total]))
        return torch.stack(losses).mean(), torch.stack(errors).mean(0)


@contextmanager
def encoder_features(model: MisalignmentNet) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, every forward pass of ``model`` leaves each encoder's output in the yielded
    ``{scale: (B, 84, ...)}`` (a scale whose encoder did not run, e.g. the single-scale decoder's x4 and x2, is
    missing); forward hooks, so that the model's own forward (and a DistributedDataParallel around it) is unchanged."""
    features: dict[int, torch.Tensor] = {}
    hooks = [getattr(model, f"encoder{s}").register_forward_hook(
        lambda _module, _inputs, output, scale=s: features.__setitem__(scale, output)) for s in SCALES]
    try:
        yield features
    finally:
        for hook in hooks:
            hook.remove()
