"""Balanced patch sampling from synthetically deformed CT, cut with the Lib's block code.

A *pair pool* holds a few deformed pairs (fixed = real CT, moving = the CT warped by a random DVF,
with sponge model and noise). Patches are drawn from the pool with the paper's magnitude balance —
60 % [0,3), 20 % [3,6), 20 % [6,inf) mm by the class of the patch's centre voxel — and cut with
``preprocess.scale_blocks``, exactly as inference cuts its tiles. Patch output blocks start on 1 mm
voxels that are multiples of 4 (the alignment the model assumes), so candidate centres are the voxels
at 4k + T//2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from RegistrationMisalignmentLib.config import MisalignmentConfig
from RegistrationMisalignmentLib.networks.regnet import ENCODER_CONTEXT, HEAD_CONTEXT
from RegistrationMisalignmentLib.preprocess import background_value, build_pyramid, extract_block, scale_blocks
from trainer.data import TrainingImage
from trainer.deformations import KINDS, DVFSettings, deform_pair

BODY_HU = -950.0
"""Patch centres must be denser than this (lung parenchyma is about -850 HU, outside air -1000)."""
CLASS_BALANCE = (0.6, 0.2, 0.2)
IGNORE = -100
"""Label of voxels outside the image (a patch near the border): cross-entropy ignores them."""
"""Share of patches whose centre voxel is correct / poor / wrong (the paper's 60/20/20)."""


@dataclass
class DeformedPair:
    """A training pair on the 1 mm grid: its pyramid, its DVF (3, D, H, W) mm and |DVF|."""

    name: str
    pyramid: dict[int, torch.Tensor]
    dvf: torch.Tensor
    magnitude: np.ndarray
    candidates: list[np.ndarray]
    """Per final class, (N, 3) output-block starts whose centre voxel has that class."""


def make_pair(image: TrainingImage, kind: str, seed: int, config: MisalignmentConfig, settings: DVFSettings,
              patch_output: int, device: str | torch.device = "cpu") -> DeformedPair:
    generator = torch.Generator(device=device).manual_seed(seed)
    fixed = torch.from_numpy(image.hu).to(device)
    moving, dvf = deform_pair(fixed, kind, (config.spacing_mm,) * 3, generator, settings)
    pyramid = build_pyramid(image.hu, moving.cpu().numpy(), config, device)
    magnitude = torch.linalg.vector_norm(dvf, dim=0).cpu().numpy()
    half = patch_output // 2
    # Centres at 4k + half; the block start 4k keeps the model's alignment (see networks.model).
    # Only centres in the body count: air against air carries no misalignment information.
    centres = magnitude[half::4, half::4, half::4]
    inside = image.hu[half::4, half::4, half::4] > BODY_HU
    classes = config.classify_mm(centres)
    candidates = [np.argwhere((classes == c) & inside) * 4 for c in range(3)]
    return DeformedPair(f"{image.name}/{kind}/{seed}", pyramid, dvf.cpu(), magnitude, candidates)


@dataclass
class Batch:
    """Network inputs per scale (B, 2, ...) and targets for the misalignment model."""

    inputs: dict[int, torch.Tensor]
    step_labels: list[torch.Tensor]
    """Per conv-LSTM step, (B, T, T, T) int64 class indices."""
    final_labels: torch.Tensor
    centre_classes: np.ndarray


class PatchSampler:
    """Draws class-balanced patches from a pool of deformed pairs."""

    def __init__(self, pairs: list[DeformedPair], config: MisalignmentConfig, rng: np.random.Generator,
                 balance: tuple[float, float, float] = CLASS_BALANCE):
        self.pairs, self.config, self.rng = pairs, config, rng
        self.balance = np.asarray(balance, dtype=np.float64)
        self.output = config.train_output

    def draw_start(self) -> tuple[DeformedPair, tuple[int, int, int], int]:
        """A pair, an output-block start and the centre's class, with the balance over classes."""
        available = [c for c in range(3) if any(len(p.candidates[c]) for p in self.pairs)]
        weights = self.balance[available] / self.balance[available].sum()
        cls = int(self.rng.choice(available, p=weights))
        holders = [p for p in self.pairs if len(p.candidates[cls])]
        pair = holders[int(self.rng.integers(len(holders)))]
        start = pair.candidates[cls][int(self.rng.integers(len(pair.candidates[cls])))]
        return pair, (int(start[0]), int(start[1]), int(start[2])), cls

    def labels(self, pair: DeformedPair, start: tuple[int, int, int]) -> list[np.ndarray]:
        """Per-step labels and the final classes of the output block; ``IGNORE`` outside the image."""
        size = (self.output,) * 3
        block = extract_block(torch.from_numpy(pair.magnitude)[None], start, size, -1.0)[0].numpy()
        outside = block < 0
        return [np.where(outside, IGNORE, labels) for labels in self.config.step_labels(block)
                + [self.config.classify_mm(block)]]

    def batch(self, size: int) -> Batch:
        inputs: dict[int, list[torch.Tensor]] = {s: [] for s in self.config.scales}
        labels: list[list[np.ndarray]] = []
        centres = []
        for _ in range(size):
            pair, start, cls = self.draw_start()
            for s, block in scale_blocks(pair.pyramid, start, (self.output,) * 3, self.config).items():
                inputs[s].append(block)
            labels.append(self.labels(pair, start))
            centres.append(cls)
        steps = len(labels[0]) - 1
        return Batch(
            inputs={s: torch.stack(v) for s, v in inputs.items()},
            step_labels=[torch.from_numpy(np.stack([l[k] for l in labels])).long() for k in range(steps)],
            final_labels=torch.from_numpy(np.stack([l[-1] for l in labels])).long(),
            centre_classes=np.asarray(centres),
        )

    def regnet_batch(self, size: int, scale: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RegNet pre-training patches of level ``scale``: inputs (B, 2, 101^3), DVF targets (B, 3, 21^3)
        and a mask (B, 1, 21^3) of target voxels inside the image.

        The centre is drawn with the same class balance; the target is the DVF sampled on the level's
        grid (level voxel q on 1 mm voxel s*q), in mm.
        """
        n_in = self.config.encoder_input
        n_out = n_in - 2 * (ENCODER_CONTEXT + HEAD_CONTEXT)
        fill = background_value(self.config)
        xs, ys, masks = [], [], []
        for _ in range(size):
            pair, start, _ = self.draw_start()
            centre = [(a + self.output // 2) // scale for a in start]
            in_start = tuple(c - n_in // 2 for c in centre)
            out_start = tuple(c - n_out // 2 for c in centre)
            xs.append(extract_block(pair.pyramid[scale], in_start, (n_in,) * 3, fill))
            dvf_level = pair.dvf[:, ::scale, ::scale, ::scale]
            ys.append(extract_block(dvf_level, out_start, (n_out,) * 3, 0.0))
            inside = torch.ones((1, *dvf_level.shape[1:]))
            masks.append(extract_block(inside, out_start, (n_out,) * 3, 0.0))
        return torch.stack(xs), torch.stack(ys), torch.stack(masks)


def build_pool(images: list[TrainingImage], count: int, seed: int, config: MisalignmentConfig,
               settings: DVFSettings, device: str | torch.device = "cpu",
               kinds: tuple[str, ...] = KINDS) -> list[DeformedPair]:
    """``count`` deformed pairs, image and DVF kind drawn from ``seed`` (reproducible)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(count):
        image = images[int(rng.integers(len(images)))]
        kind = kinds[i % len(kinds)] if count >= len(kinds) else kinds[int(rng.integers(len(kinds)))]
        pairs.append(make_pair(image, kind, int(rng.integers(2**31)), config, settings, config.train_output, device))
    return pairs
