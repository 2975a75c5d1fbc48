"""All tunable constants of the method, in one frozen dataclass.

Values follow Sokooti et al. (IEEE Access 2021) unless a comment says otherwise. Everything that
must agree between training and inference (thresholds, split, spacing, patch geometry,
normalisation) lives here and is written into every model card, so a model can refuse a
configuration it was not trained with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

SPLITS: dict[str, tuple[float, float, float]] = {
    "6-3-1": (6.0, 3.0, 1.0),
    "12-6-3": (12.0, 6.0, 3.0),
    "6-3-3": (6.0, 3.0, 3.0),
}
"""Hierarchical splits theta1 >= theta2 >= theta3 (mm); 6-3-1 was best in the paper."""

CLASS_NAMES: tuple[str, str, str] = ("correct", "poor", "wrong")
PRECISIONS: tuple[str, str] = ("auto", "float32")
"""The network's precision: "auto" is bf16 where the device computes it natively (CUDA, or a CPU with
AVX-512 BF16 / AMX), float32 elsewhere; "float32" always (``inference._autocast``)."""


@dataclass(frozen=True)
class MisalignmentConfig:
    """Configuration shared by the Lib, the trainer and the Slicer module."""

    thresholds_mm: tuple[float, float] = (3.0, 6.0)
    """Class edges: correct [0, 3), poor [3, 6), wrong [6, inf) mm."""
    split: str = "6-3-1"
    """Hierarchical split of the conv-LSTM decoder, a key of ``SPLITS``."""

    spacing_mm: float = 1.0
    """Both images are resampled to this isotropic spacing before the network."""
    scales: tuple[int, ...] = (4, 2, 1)
    """Pyramid levels (downsampling factors of the 1 mm image), coarse to fine."""
    smoothing_sigma_per_scale: float = 0.5
    """Gaussian anti-alias sigma, in units of the scale's voxel (sigma = 0.5 * s mm)."""

    encoder_input: int = 101
    """RegNet Uadv patch side (voxels) that gives ``encoder_output`` features."""
    encoder_output: int = 25
    """Feature-map side of the encoder for a ``encoder_input`` patch."""
    encoder_stride: int = 4
    """The encoder is shift-equivariant for input shifts that are multiples of this."""
    decoder_margin: int = 3
    """Voxels of decoder context per side: the 3 conv-LSTM steps each see one voxel further."""

    tile_size: int = 128
    """Side (1 mm voxels) of one inference output tile; a multiple of 16 keeps tiles exact. Larger
    tiles re-read less context (an output tile of n needs n + 89 input voxels per side at x1) but
    hold more activations (benchmarks/speed.py measures time and peak memory per tile size)."""
    cuda_tile_size: int = 192
    """The tile side on CUDA: on an H100, 192 took the chest CT from 4.0 s (128) to 3.66 s (both
    before channels-last) at 6.0 GB peak allocated; 256 is faster still (2.21 s against 2.47 s with
    channels-last) but reserves 16 GB of CUDA memory (benchmarks/results/speed_gpu_h100/)."""
    tile_batch: int = 1
    """Tiles per forward pass: one 128^3 tile already fills every CPU core and a GPU."""

    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    """HU clipped to this window, then mapped linearly to [-1, 1]."""
    background_hu: float = -1000.0
    """Value outside the field of view (air), used for padding and resampling."""

    label_outside: int = 0
    label_correct: int = 1
    label_poor: int = 2
    label_wrong: int = 3
    class_colors: tuple[tuple[float, float, float], ...] = field(
        default=((0.0, 0.75, 0.0), (1.0, 0.85, 0.0), (0.9, 0.0, 0.0))
    )
    """RGB (0..1) of correct, poor, wrong: green, yellow, red."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split {self.split!r} is not one of {sorted(SPLITS)}")
        lo, hi = self.thresholds_mm
        if not 0 < lo < hi:
            raise ValueError(f"thresholds_mm must satisfy 0 < t1 < t2, got {self.thresholds_mm}")
        for name in ("tile_size", "cuda_tile_size"):
            if getattr(self, name) % 16:
                raise ValueError(f"{name} must be a multiple of 16, got {getattr(self, name)}")
        if (self.encoder_input - self.encoder_output) % 2 or (self.encoder_output - 1) % 4:
            raise ValueError("encoder_output must be 1 mod 4 and (input - output) even")

    # ---- derived geometry -------------------------------------------------------------
    @property
    def encoder_context(self) -> int:
        """Input voxels lost per side by the encoder's valid convolutions (38 for 101 -> 25)."""
        return (self.encoder_input - self.encoder_output) // 2

    @property
    def train_output(self) -> int:
        """Label side of one training patch: encoder features minus the decoder margin."""
        return self.encoder_output - 2 * self.decoder_margin

    @property
    def label_values(self) -> tuple[int, int, int]:
        return (self.label_correct, self.label_poor, self.label_wrong)

    # ---- hierarchical labels ----------------------------------------------------------
    def step_edges(self) -> list[tuple[float, ...]]:
        """Class edges (mm) of each conv-LSTM step: step k splits at {theta_1..theta_k}.

        6-3-1 gives (6,), (3, 6), (1, 3, 6): 2, 3 and 4 classes as in the paper.
        """
        thetas = SPLITS[self.split]
        return [tuple(sorted(set(thetas[: k + 1]))) for k in range(len(thetas))]

    def step_num_classes(self) -> list[int]:
        return [len(e) + 1 for e in self.step_edges()]

    def final_class_map(self) -> np.ndarray:
        """For each class of the last step, the final class index (0 correct, 1 poor, 2 wrong).

        An interval [a, b) is given the class of its lower edge a, which merges the auxiliary
        classes ([0,1) and [1,3) for 6-3-1; [6,12) and [12,inf) for 12-6-3).
        """
        lower = (0.0,) + self.step_edges()[-1]
        return np.array([self.classify_mm(np.array([a]))[0] for a in lower], dtype=np.int64)

    def classify_mm(self, magnitude_mm: np.ndarray) -> np.ndarray:
        """Final class index (0 correct, 1 poor, 2 wrong) of residual magnitudes in mm."""
        return np.searchsorted(np.asarray(self.thresholds_mm), magnitude_mm, side="right")

    def step_labels(self, magnitude_mm: np.ndarray) -> list[np.ndarray]:
        """Per-step class indices of |DVF| (the hierarchical ground truth)."""
        return [np.searchsorted(np.asarray(e), magnitude_mm, side="right") for e in self.step_edges()]

    # ---- serialisation (model cards) --------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MisalignmentConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: (tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v)
                  for k, v in values.items() if k in known}
        return cls(**kwargs)

    def replace(self, **changes) -> "MisalignmentConfig":
        return dataclasses.replace(self, **changes)


def round_up_encoder_output(n: int, stride: int = 4) -> int:
    """Smallest encoder output side >= n that the encoder can produce (1 mod ``stride``)."""
    return n + (1 - n) % stride


DEFAULT_CONFIG = MisalignmentConfig()

__all__ = ["MisalignmentConfig", "DEFAULT_CONFIG", "SPLITS", "CLASS_NAMES", "PRECISIONS", "round_up_encoder_output"]
