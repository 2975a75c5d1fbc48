"""Held-out pairs as a real registration leaves them: the held-out chest CT moved by a breathing field and
registered back by elastix with the protocol's parameter files, the truth the dense residual.

Why: the synthetic held-out pairs (the paper's) ranked the run's candidates against the whole-chest protocol:
the epochs they validated best (126, 140: kappa 0.658) scored below the shipped epoch 115 (0.633) there
(protocol kappa 0.385 and 0.382 against 0.415). In the paper's pairs density change only comes with
misalignment; after a registration it comes with the breathing the registration undid. This judge is built
the protocol's way (``benchmark.cases.chest_case``: ``synthetic.breathing.breathe``, then
``benchmark.elastix.ElastixRunner``) from its own breathing seeds (``JUDGE_SEED``), so it never scores the
protocol's cases, and is scored in the lungs, voxel by voxel, where the protocol has landmarks.

Residual of a registration T(x) = x + t(x) of M(y) = I(y + u(y)) (``benchmark.cases``' module doc): the
deformed image D(x) = M(T(x)) shows I at x + t(x) + u(x + t(x)), so its misalignment is
r = t(x) + u(x + t(x)) (``spatial.compose(t, u)``), on the fixed grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from RegistrationMisalignmentLib.benchmark.cases import CHEST_MARGIN_MM, CHEST_SEED
from RegistrationMisalignmentLib.benchmark.elastix import ElastixRunner
from RegistrationMisalignmentLib.config import MisalignmentConfig
from RegistrationMisalignmentLib.preprocess import build_pyramid
from RegistrationMisalignmentLib.spatial import compose
from RegistrationMisalignmentLib.synthetic.breathing import breathe, chest_anatomy
from RegistrationMisalignmentLib.synthetic.images import TrainingImage
from trainer.dataset import CENTRE_STRIDE, DeformedPair

JUDGE_SEED = CHEST_SEED + 1_000
"""Breathing fields of the registration judge: seeds from here (the protocol's cases use CHEST_SEED + i, i < 1000)."""


def _image(hu: np.ndarray) -> sitk.Image:
    """A (D, H, W) HU array as a 1 mm image with the identity direction: the trainer's grid, where DVF components
    (x, y, z) lie along the array's (W, H, D) axes."""
    return sitk.GetImageFromArray(np.ascontiguousarray(hu, dtype=np.float32))


def _displacement(registration, moving: sitk.Image) -> torch.Tensor:
    """t(x) = T(x) - x of an elastix registration on the fixed grid: (3, D, H, W) mm, components (x, y, z)."""
    import itk

    moving_itk = itk.image_from_array(sitk.GetArrayFromImage(moving))
    field = itk.array_from_image(itk.transformix_deformation_field(moving_itk, registration.parameters))
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(field, -1, 0), dtype=np.float32))


def registration_pairs(image: TrainingImage, settings: Sequence[str], config: MisalignmentConfig,
                       seed: int = JUDGE_SEED, threads: int | None = None, tiny: bool = False) -> list[DeformedPair]:
    """One pair per elastix setting (``benchmark.elastix.SETTINGS``) of ``image`` (a chest CT on the 1 mm grid)
    moved by breathing field ``seed``: fixed = the image's lungs' box (+ ``CHEST_MARGIN_MM``), moving = the
    registered image, DVF = the residual r (3, D, H, W) mm, supervised voxels = the lungs. ``tiny``: elastix with
    the protocol's --tiny changes (tests).

    Raises ``ValueError`` off the 1 mm grid, ``InputError`` for a setting without a parameter file in
    ``benchmarks/elastix`` or without itk-elastix (``ElastixRunner``).
    """
    spacing = (config.spacing_mm,) * 3
    if spacing != (1.0, 1.0, 1.0):
        raise ValueError(f"the registration judge works on the 1 mm grid, not {config.spacing_mm} mm")
    anatomy = chest_anatomy(image.hu, spacing)
    start, stop = anatomy.lung_box(CHEST_MARGIN_MM)
    box = anatomy.crop(start, stop)
    fixed_hu = np.ascontiguousarray(image.hu[tuple(slice(a, b) for a, b in zip(start, stop))], dtype=np.float32)
    moved, field = breathe(fixed_hu, box, seed, whole=(image.hu, anatomy.lung))
    fixed, moving = _image(fixed_hu), _image(moved)
    registrations = ElastixRunner(tiny=tiny, threads=threads).run_settings(fixed, moving, settings)
    lung = np.asarray(box.lung, dtype=bool)
    centres = np.argwhere(lung[::CENTRE_STRIDE, ::CENTRE_STRIDE, ::CENTRE_STRIDE]) * CENTRE_STRIDE
    pairs = []
    for setting in settings:
        registration = registrations[setting]
        residual = compose(_displacement(registration, moving), field.dvf.float(), spacing)
        deformed = sitk.GetArrayFromImage(registration.deformed)
        pairs.append(DeformedPair(f"{image.name}/breathing{seed}/{setting}", build_pyramid(fixed_hu, deformed, config),
                                  residual, residual.square().sum(0).sqrt().numpy(), lung, centres, registered=True))
    return pairs


__all__ = ["JUDGE_SEED", "registration_pairs"]
