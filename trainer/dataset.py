"""Dense training blocks from synthetically deformed CT, cut with the Lib's block code.

A *pair pool* holds a few deformed pairs (fixed = real CT, moving = the CT warped by a random DVF,
with sponge model and noise). A training sample is one dense block: the encoders' inputs for an
output block of ``block_input - 82`` labels per side (stage 2; 19 for the paper's 101^3 patch, 59 for
141^3) or ``block_input - 80`` DVF voxels (stage 1), cut with ``preprocess.scale_blocks`` exactly as
inference cuts its tiles. Blocks are placed on body voxels and every labelled voxel inside the body is
supervised. The paper's 60 / 20 / 20 % balance of correct / poor / wrong is kept one of two ways
(``CENTRE_SAMPLING``): ``"uniform"`` centres, each voxel weighted so that the classes carry 60/20/20 of the
loss; or ``"class"``, the paper's own way: the block centre's class is drawn 60/20/20 (Sokooti et al. 2021,
section III-D: patches balanced by the magnitude at their centre) and every body voxel weighs the same.
Output blocks start on 1 mm voxels that are multiples of 4, the alignment the model assumes (see
``networks.model``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from RegistrationMisalignmentLib.config import MisalignmentConfig
from RegistrationMisalignmentLib.networks.regnet import ENCODER_CONTEXT, HEAD_CONTEXT
from RegistrationMisalignmentLib.preprocess import (background_value, block_geometry, build_pyramid, extract_block,
                                                    scale_blocks)
from RegistrationMisalignmentLib.synthetic.deform import deform_pair, registered_pair
from RegistrationMisalignmentLib.synthetic.dvf import KINDS, DVFSettings
from RegistrationMisalignmentLib.synthetic.images import TrainingImage
from trainer.config import CENTRE_SAMPLING

CLASS_BALANCE = (0.6, 0.2, 0.2)
"""Share of the loss carried by correct / poor / wrong voxels (the paper's 60/20/20)."""
CENTRE_STRIDE = 4
"""Block centres are drawn among the body voxels of this sub-grid (the model's alignment)."""


@dataclass
class DeformedPair:
    """A training pair on the 1 mm grid: its pyramid, its DVF (3, D, H, W) mm, |DVF| and the body."""

    name: str
    pyramid: dict[int, torch.Tensor]
    dvf: torch.Tensor
    magnitude: np.ndarray
    body: np.ndarray
    """(D, H, W) bool: voxels that are supervised (air outside the body carries no misalignment)."""
    centres: np.ndarray
    """(N, 3) body voxels on the ``CENTRE_STRIDE`` sub-grid: where blocks are centred."""
    registered: bool = False
    """Made as a registration leaves it (``synthetic.deform.registered_pair``, or by elastix)."""
    registration: str = ""
    """The elastix setting that registered it (``trainer.registration_bank``, the registration judge); "": synthetic."""

    @classmethod
    def of(cls, name: str, pyramid: dict[int, torch.Tensor], dvf: torch.Tensor, body: np.ndarray,
           registered: bool = False, registration: str = "") -> "DeformedPair":
        """The pair with what follows from its DVF (on any device; kept on the CPU) and body: |DVF| and the centres."""
        magnitude = dvf.square().sum(0).sqrt().cpu().numpy()  # |u|; vector_norm is several times slower here
        centres = np.argwhere(body[::CENTRE_STRIDE, ::CENTRE_STRIDE, ::CENTRE_STRIDE]) * CENTRE_STRIDE
        return cls(name, pyramid, dvf.cpu(), magnitude, body, centres, registered, registration)


def make_pair(image: TrainingImage, kind: str, seed: int, config: MisalignmentConfig, settings: DVFSettings,
              device: str | torch.device = "cpu", registered: bool = False, motion_left: float = 0.0) -> DeformedPair:
    """One pair from ``seed``; a ``registered`` one leaves a share of its breathing motion drawn uniformly from 0 to
    ``motion_left`` (``registered_pair``)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    fixed = torch.from_numpy(image.hu).to(device)
    spacing = (config.spacing_mm,) * 3
    body = image.body
    if registered:  # voxels the registered image does not show (made-up air at the faces) are not supervised
        left = motion_left * float(np.random.default_rng([seed, 2]).random())  # its own stream: the same DVF and motion
        moving, dvf, seen = registered_pair(fixed, kind, spacing, generator, settings, motion_left=left)
        body = body & seen.cpu().numpy()
    else:
        moving, dvf = deform_pair(fixed, kind, spacing, generator, settings)
    pyramid = build_pyramid(image.hu, moving.cpu().numpy(), config, device)
    name = f"{image.name}/{kind}{'/registered' if registered else ''}/{seed}"
    return DeformedPair.of(name, pyramid, dvf, body, registered)


def class_shares(classes: np.ndarray) -> np.ndarray:
    """Share of correct / poor / wrong among class indices (0, 1, 2); zeros where there are none."""
    counts = np.bincount(np.ravel(classes), minlength=3)
    return counts / max(counts.sum(), 1)


def class_weights(pairs: list[DeformedPair], config: MisalignmentConfig,
                  balance: tuple[float, float, float] = CLASS_BALANCE) -> np.ndarray:
    """Per final class, the voxel weight that gives each class ``balance`` of the loss over the pool's body.

    A class the pool lacks gets weight 0 and its share goes to the others. Counted on every second voxel.
    """
    counts = np.zeros(3)
    for pair in pairs:
        classes = config.classify_mm(pair.magnitude[::2, ::2, ::2][pair.body[::2, ::2, ::2]])
        counts += np.bincount(classes, minlength=3)
    present = counts > 0
    target = np.where(present, balance, 0.0)
    target = target / target.sum()
    share = counts / counts.sum()
    return np.where(present, target / np.where(present, share, 1.0), 0.0).astype(np.float32)


@dataclass
class Batch:
    """Network inputs per scale (B, 2, ...) and dense targets of the misalignment model."""

    inputs: dict[int, torch.Tensor]
    step_labels: list[torch.Tensor]
    """Per conv-LSTM step, (B, T, T, T) int64 class indices (0 where the weight is 0)."""
    final_labels: torch.Tensor
    """(B, T, T, T) int64: 0 correct, 1 poor, 2 wrong."""
    weights: torch.Tensor
    """(B, T, T, T) float32 voxel weights: the class weight inside the body, 0 outside it or the image."""
    registrations: tuple[str, ...] = ()
    """Per block, the elastix setting that registered its pair ("": synthetic); () in a judge cached before blocks
    were tagged (``Trainer._load_or_build_judge`` makes it again)."""
    dvfs: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    """Per scale, the DVF under a RegNet head on that scale's encoder features: (B, 3, m, m, m) mm on the level's
    grid and the voxel weights (B, 1, m, m, m), as stage 1's (``BlockSampler.batch(dvf=True)``); None: not asked."""


class BlockSampler:
    """Draws dense training blocks from a pool of deformed pairs."""

    def __init__(self, pairs: list[DeformedPair], config: MisalignmentConfig, rng: np.random.Generator,
                 block_input: int = 101, balance: tuple[float, float, float] = CLASS_BALANCE,
                 centres: str = "uniform"):
        if (block_input - 101) % 4 or block_input < 101:
            raise ValueError(f"block_input {block_input}: give 101 + 4k voxels (the encoder's input sizes)")
        if centres not in CENTRE_SAMPLING:
            raise ValueError(f"centres {centres!r}: give one of {', '.join(CENTRE_SAMPLING)}")
        self.pairs, self.config, self.rng = pairs, config, rng
        self.block_input = block_input
        self.labels_side = block_input - 2 * config.encoder_context - 2 * config.decoder_margin
        self.dvf_side = block_input - 2 * (ENCODER_CONTEXT + HEAD_CONTEXT)
        self.by_class = centres == "class"
        if self.by_class:
            self.weights = np.ones(3, dtype=np.float32)
            self.centres_of_class = self._centres_by_class()
            present = np.array([len(c) > 0 for c in self.centres_of_class])
            share = np.where(present, balance, 0.0)
            self.class_share = share / share.sum() if share.sum() else share
        else:
            self.weights = class_weights(pairs, config, balance)

    def _centres_by_class(self) -> list[np.ndarray]:
        """Per class, the (pair index, centre index) of every centre whose |DVF| falls in it."""
        found: list[list[np.ndarray]] = [[], [], []]
        for i, pair in enumerate(self.pairs):
            classes = self.config.classify_mm(pair.magnitude[tuple(pair.centres.T)]) if len(pair.centres) else []
            for k in range(3):
                index = np.flatnonzero(np.asarray(classes) == k)
                found[k].append(np.stack([np.full(len(index), i), index], axis=1))
        return [np.concatenate(f) for f in found]

    def draw_centre(self, klass: int | None = None) -> tuple[DeformedPair, np.ndarray]:
        """A pair and a body voxel of it on the centre sub-grid: uniformly (pair, then voxel), or with
        ``centres="class"`` a class (``klass``, or drawn by the balance) first, then uniformly one of the
        pool's centres of it."""
        if self.by_class:
            if not self.class_share.sum():
                raise ValueError("no body voxel in any pair of the pool")
            if klass is None:
                klass = int(self.rng.choice(3, p=self.class_share))
            of_class = self.centres_of_class[klass]
            pair_index, centre_index = of_class[int(self.rng.integers(len(of_class)))]
            pair = self.pairs[int(pair_index)]
            return pair, pair.centres[int(centre_index)]
        holders = [p for p in self.pairs if len(p.centres)]
        if not holders:
            raise ValueError("no body voxel in any pair of the pool")
        pair = holders[int(self.rng.integers(len(holders)))]
        return pair, pair.centres[int(self.rng.integers(len(pair.centres)))]

    def voxel_weights(self, magnitude: np.ndarray, body: np.ndarray) -> np.ndarray:
        """Class weight of every voxel of a |DVF| block (1 with class-drawn centres); 0 outside the body
        (or the image: body False)."""
        return np.where(body, self.weights[self.config.classify_mm(magnitude)], 0.0).astype(np.float32)

    def _targets(self, pair: DeformedPair, start: tuple[int, ...], size: int | tuple[int, ...], stride: int = 1):
        """|DVF| and body of the block at ``start`` of the level-``stride`` grid (outside: 0 / False)."""
        shape = (size,) * 3 if isinstance(size, int) else size
        magnitude = torch.from_numpy(pair.magnitude[::stride, ::stride, ::stride])[None]
        body = torch.from_numpy(pair.body[::stride, ::stride, ::stride])[None]
        return (extract_block(magnitude, start, shape, 0.0)[0].numpy(),
                extract_block(body, start, shape, False)[0].numpy())

    def class_quota(self, size: int) -> list[int]:
        """The centre classes of ``size`` blocks in the balance's exact proportion (largest remainders), for a
        validation set whose mix does not hang on a few draws; classes the pool lacks get none."""
        exact = self.class_share * size
        counts = np.floor(exact).astype(int)
        for k in np.argsort(counts - exact, kind="stable")[: size - counts.sum()]:
            counts[k] += 1
        return [k for k in range(3) for _ in range(counts[k])]

    def batch(self, size: int, stratified: bool = False, dvf: bool = False) -> Batch:
        """``size`` dense blocks for stage 2, each centred (to the model's 4-voxel alignment) on a body voxel;
        ``stratified`` with class-drawn centres: the centre classes in the balance's exact proportion; ``dvf``:
        with each scale's DVF targets (``Batch.dvfs``)."""
        side = self.labels_side
        inputs: dict[int, list[torch.Tensor]] = {s: [] for s in self.config.scales}
        dvfs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {s: [] for s in self.config.scales}
        finals, steps, weights, registrations = [], [], [], []
        classes = self.class_quota(size) if stratified and self.by_class else [None] * size
        for klass in classes:
            pair, centre = self.draw_centre(klass)
            start = tuple(int(c - side // 2) // 4 * 4 for c in centre)
            for s, block in scale_blocks(pair.pyramid, start, (side,) * 3, self.config).items():
                inputs[s].append(block)
            if dvf:
                geometry = block_geometry(start, (side,) * 3, self.config)
                for s in self.config.scales:
                    dvfs[s].append(self._dvf_target(pair, s, *geometry[s]))
            magnitude, body = self._targets(pair, start, side)
            weights.append(self.voxel_weights(magnitude, body))
            finals.append(self.config.classify_mm(magnitude))
            steps.append(self.config.step_labels(magnitude))
            registrations.append(pair.registration)
        return Batch(
            inputs={s: torch.stack(v) for s, v in inputs.items()},
            step_labels=[torch.from_numpy(np.stack([l[k] for l in steps])).long() for k in range(len(steps[0]))],
            final_labels=torch.from_numpy(np.stack(finals)).long(),
            weights=torch.from_numpy(np.stack(weights)),
            registrations=tuple(registrations),
            dvfs={s: (torch.stack([y for y, _ in v]), torch.stack([w for _, w in v])) for s, v in dvfs.items()}
            if dvf else None,
        )

    def _dvf_target(self, pair: DeformedPair, scale: int, input_start: tuple[int, ...],
                    input_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The DVF (3, ...) mm and voxel weights (1, ...) under a RegNet head on the level-``scale`` encoder's
        features, for its input block (``input_start``, ``input_shape`` on the level's grid: ``block_geometry``)."""
        context = ENCODER_CONTEXT + HEAD_CONTEXT
        out_start = tuple(q + context for q in input_start)
        out_shape = tuple(n - 2 * context for n in input_shape)
        target = extract_block(pair.dvf[:, ::scale, ::scale, ::scale], out_start, out_shape, 0.0)
        magnitude, body = self._targets(pair, out_start, out_shape, scale)
        return target, torch.from_numpy(self.voxel_weights(magnitude, body))[None]

    def regnet_batch(self, size: int, scale: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage-1 blocks of level ``scale``: inputs (B, 2, n, n, n) with n = ``block_input``, DVF targets
        (B, 3, m, m, m) in mm with m = n - 80, and voxel weights (B, 1, m, m, m).

        The target is the DVF sampled on the level's grid (level voxel q on 1 mm voxel s*q); the weights
        are the class weights of its magnitude inside the body, 0 elsewhere.
        """
        n_in, n_out = self.block_input, self.dvf_side
        fill = background_value(self.config)
        xs, ys, ws = [], [], []
        for _ in range(size):
            pair, centre = self.draw_centre()
            level = [int(c) // scale for c in centre]
            in_start = tuple(c - n_in // 2 for c in level)
            out_start = tuple(c - n_out // 2 for c in level)
            xs.append(extract_block(pair.pyramid[scale], in_start, (n_in,) * 3, fill))
            ys.append(extract_block(pair.dvf[:, ::scale, ::scale, ::scale], out_start, (n_out,) * 3, 0.0))
            magnitude, body = self._targets(pair, out_start, n_out, scale)
            ws.append(torch.from_numpy(self.voxel_weights(magnitude, body))[None])
        return torch.stack(xs), torch.stack(ys), torch.stack(ws)


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum of per-voxel cross-entropies times ``weights`` (B, ...), over the sum of the weights."""
    loss = F.cross_entropy(logits.float(), labels, reduction="none")
    return (loss * weights).sum() / weights.sum().clamp(min=1e-6)


def weighted_huber(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Huber loss of the DVF (B, 3, ...) weighted per voxel by ``weights`` (B, 1, ...), over the weights."""
    loss = F.smooth_l1_loss(prediction.float(), target, reduction="none") * weights
    return loss.sum() / (weights.sum() * prediction.shape[1]).clamp(min=1e-6)


def build_pool(images: list[TrainingImage], count: int, seed: int, config: MisalignmentConfig,
               settings: DVFSettings, device: str | torch.device = "cpu",
               kinds: tuple[str, ...] = KINDS, registered_share: float = 0.0,
               motion_left: float = 0.0) -> list[DeformedPair]:
    """``count`` deformed pairs, reproducible from ``seed``.

    Images are drawn in proportion to their body volume, so every millimetre of body is equally likely
    to be trained on whatever the size of its scan; kinds cycle through ``kinds``. Each pair is made as a
    registration leaves it (``registered_pair``) with probability ``registered_share``, up to ``motion_left`` of
    its breathing motion left (``make_pair``).
    """
    rng = np.random.default_rng(seed)
    registered = np.random.default_rng([seed, 1]).random(count) < registered_share  # its own stream: the same pairs
    volume = np.array([float(i.body.sum()) for i in images]) + 1.0
    pairs = []
    for i in range(count):
        image = images[int(rng.choice(len(images), p=volume / volume.sum()))]
        kind = kinds[i % len(kinds)] if count >= len(kinds) else kinds[int(rng.integers(len(kinds)))]
        pairs.append(make_pair(image, kind, int(rng.integers(2**31)), config, settings, device, bool(registered[i]),
                               motion_left))
    return pairs
