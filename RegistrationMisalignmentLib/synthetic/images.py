"""A CT on the 1 mm grid the network works on, in HU: from any image or the phantom.

Every image is resampled once, with the Lib's own resampling, to the isotropic grid; training, the
demo and the benchmark then deform these arrays in memory (``synthetic.deform``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from RegistrationMisalignmentLib.config import MisalignmentConfig
from RegistrationMisalignmentLib.io import validate_image
from RegistrationMisalignmentLib.preprocess import isotropic_reference, resample_onto
from RegistrationMisalignmentLib.synthetic.phantom import make_chest_phantom

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
BODY_HU = -950.0
"""Voxels denser than this are body (lung parenchyma is about -850 HU, air outside the body -1000)."""


def scan_stem(name: str) -> str:
    """A scan's name without its image extension (``holdout`` names a scan whatever its format)."""
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class TrainingImage:
    """One CT on the 1 mm grid: (D, H, W) HU array plus where it came from."""

    name: str
    hu: np.ndarray = field(repr=False)

    @cached_property
    def body(self) -> np.ndarray:
        """(D, H, W) bool: voxels above ``BODY_HU``, grown by one voxel (what training supervises)."""
        dense = torch.from_numpy(self.hu > BODY_HU)[None, None].float()
        return F.max_pool3d(dense, 3, stride=1, padding=1)[0, 0].numpy() > 0

    def crop_z(self, start: int, stop: int) -> "TrainingImage":
        """A slab of axial slices [start, stop) — how a held-out region of one scan is kept apart."""
        return TrainingImage(f"{self.name}[z{start}:{stop}]", self.hu[start:stop].copy())


def to_training_image(image: sitk.Image, name: str, config: MisalignmentConfig) -> TrainingImage:
    """The image on the 1 mm grid in HU."""
    validate_image(image, name)
    grid = isotropic_reference(image, config.spacing_mm)
    hu = sitk.GetArrayFromImage(resample_onto(image, grid, config.background_hu))
    return TrainingImage(name, hu.astype(np.float32))


def phantom_images(count: int, size_mm: tuple[float, float, float], seed: int,
                   config: MisalignmentConfig) -> list[TrainingImage]:
    return [to_training_image(make_chest_phantom(size_mm, config.spacing_mm, seed + i), f"phantom{seed + i}", config)
            for i in range(count)]
