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

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from RegistrationMisalignmentLib.benchmark.cases import CHEST_MARGIN_MM, CHEST_SEED, MAX_CHEST_CASES
from RegistrationMisalignmentLib.benchmark.elastix import (ELASTIX_DIR, ElastixRunner, Registration, load_parameters,
                                                           save_parameters, setting_files)
from RegistrationMisalignmentLib.config import MisalignmentConfig
from RegistrationMisalignmentLib.preprocess import build_pyramid
from RegistrationMisalignmentLib.spatial import compose
from RegistrationMisalignmentLib.synthetic.breathing import BreathingField, breathe, chest_anatomy
from RegistrationMisalignmentLib.synthetic.images import TrainingImage, scan_stem
from trainer.dataset import DeformedPair

JUDGE_SEED = CHEST_SEED + MAX_CHEST_CASES
"""The registration judge's breathing field: after the protocol's (CHEST_SEED + i, i < MAX_CHEST_CASES)."""
JUDGE_VERSION = 1
"""Raise it when a change here changes the judge's pairs: the trainer keeps their blocks under a key that
includes it (``Trainer._judge_cache``)."""

def _image(hu: np.ndarray) -> sitk.Image:
    """A (D, H, W) HU array as a 1 mm image with the identity direction: the trainer's grid, where DVF components
    (x, y, z) lie along the array's (W, H, D) axes."""
    return sitk.GetImageFromArray(np.ascontiguousarray(hu, dtype=np.float32))


@dataclass
class BreathingRegistrations:
    """A chest CT's lungs' box moved by a breathing field and registered back, per elastix setting."""

    fixed: sitk.Image
    """The box (HU, 1 mm, origin 0, identity direction): array axes (D, H, W) = (z, y, x)."""
    moving: sitk.Image
    """The box moved by ``field``: M(y) = I(y + u(y)) with the sponge model and noise (``breathe``)."""
    field: BreathingField
    lung: np.ndarray
    """(D, H, W) bool: the box's lungs."""
    body: np.ndarray
    """(D, H, W) bool: the box's body."""
    registrations: dict[str, Registration]
    scan_box: tuple[tuple[int, int, int], tuple[int, int, int]]
    """The whole scan's voxels (first, last) (z, y, x) in the box's index: where the moved image reads real
    anatomy (beyond them ``breathe`` repeats the scan's border)."""

    def residual(self, setting: str, displacement: np.ndarray | None = None) -> torch.Tensor:
        """r(x) = t(x) + u(x + t(x)) of ``setting``'s registration T(x) = x + t(x): (3, D, H, W) mm; ``displacement``:
        its t when already computed (``Registration.displacement``, a transformix run)."""
        t = self.registrations[setting].displacement(self.moving) if displacement is None else displacement
        return compose(torch.from_numpy(t), self.field.dvf.float(), (1.0, 1.0, 1.0))


def breathing_case(image: TrainingImage, seed: int = JUDGE_SEED, phase: int = 1) -> BreathingRegistrations:
    """``image`` (a chest CT on the 1 mm grid) cut to its lungs' box (+ ``CHEST_MARGIN_MM``) and moved by breathing
    field ``seed`` (read beyond the box; ``phase`` 1: the moved image at exhale, as the protocol's, -1: at
    inhale), not registered yet (``registrations`` empty)."""
    anatomy = chest_anatomy(image.hu, (1.0, 1.0, 1.0))
    start, stop = anatomy.lung_box(CHEST_MARGIN_MM)
    box = anatomy.crop(start, stop)
    fixed_hu = np.ascontiguousarray(image.hu[tuple(slice(a, b) for a, b in zip(start, stop))], dtype=np.float32)
    moved, field = breathe(fixed_hu, box, seed, phase=phase, whole=(image.hu, anatomy.lung))
    scan_box = (tuple(-a for a in start), tuple(n - 1 - a for n, a in zip(image.hu.shape, start)))
    return BreathingRegistrations(_image(fixed_hu), _image(moved), field, np.asarray(box.lung, dtype=bool),
                                  np.asarray(box.body, dtype=bool), {}, scan_box)


def register_breathing(image: TrainingImage, settings: Sequence[str], seed: int = JUDGE_SEED,
                       threads: int | None = None, tiny: bool = False, phase: int = 1,
                       transforms: Mapping[str, Path] | None = None, dtype: type = np.float32) -> BreathingRegistrations:
    """``breathing_case`` registered back by elastix with ``settings`` (``benchmark.elastix.SETTINGS``); ``tiny``:
    with the protocol's --tiny changes (tests). ``transforms``: a file per setting for its elastix transform
    (``save_parameters``, parameters as ``dtype``): when all exist they are applied by transformix instead of
    registering (the same registration, on any machine, in a fraction of the time), else they are written.

    Raises ``InputError`` for a setting without a parameter file in ``benchmarks/elastix`` or without
    itk-elastix (``ElastixRunner``).
    """
    case = breathing_case(image, seed, phase)
    runner = ElastixRunner(tiny=tiny, threads=threads)
    if transforms is not None and all(transforms[s].exists() for s in settings):
        case.registrations.update({s: runner.apply(case.fixed, case.moving, load_parameters(transforms[s]))
                                   for s in settings})
        return case
    case.registrations.update(runner.run_settings(case.fixed, case.moving, settings))
    for setting, path in (transforms or {}).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, lambda part: save_parameters(case.registrations[setting].parameters, part, dtype))
    return case


def write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a part file beside ``path``, then rename: whole files only, whoever writes them (a run stopped
    mid-write, or two runs sharing a folder, never leave a torn file that a later run would read)."""
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    write(part)
    os.replace(part, path)


def kept_transforms(image: TrainingImage, settings: Sequence[str], seed: int, folder: Path, phase: int = 1,
                    tiny: bool = False) -> dict[str, Path]:
    """Where ``register_breathing`` keeps the transforms of ``image`` moved by breathing ``seed``: ``folder``, one
    file per setting, named by a hash of everything the registration is made from (the scan's voxels, the seed,
    the phase, the elastix parameter files), so that a changed input never meets an old transform."""
    files = b"".join((ELASTIX_DIR / name).read_bytes() for s in settings for name in setting_files(s))
    scan = hashlib.sha256(memoryview(np.ascontiguousarray(image.hu, dtype=np.float32)).cast("B")).hexdigest()
    key = hashlib.sha256(json.dumps([JUDGE_VERSION, scan, image.hu.shape, seed, phase, tiny]).encode() + files)
    return {s: folder / f"{scan_stem(image.name)}_{key.hexdigest()[:12]}_{s}.npz" for s in settings}


def registration_pairs(image: TrainingImage, settings: Sequence[str], config: MisalignmentConfig,
                       seed: int = JUDGE_SEED, threads: int | None = None, tiny: bool = False,
                       transforms: Path | None = None) -> list[DeformedPair]:
    """One pair per elastix setting of ``register_breathing``: fixed = the box, moving = the registered image,
    DVF = the residual (3, D, H, W) mm, supervised voxels = the lungs (every lung voxel; the protocol scores
    landmarks in them). ``transforms``: a folder where the registrations' transforms are kept exactly (float64,
    ``kept_transforms``) and applied again, so that the judge is the same on every machine.

    Raises ``ValueError`` off the 1 mm grid, and what ``register_breathing`` raises.
    """
    if config.spacing_mm != 1.0:
        raise ValueError(f"the registration judge works on the 1 mm grid, not {config.spacing_mm} mm")
    kept = None if transforms is None else kept_transforms(image, settings, seed, transforms, tiny=tiny)
    case = register_breathing(image, settings, seed, threads, tiny, transforms=kept, dtype=np.float64)
    fixed_hu = sitk.GetArrayFromImage(case.fixed)
    pairs = []
    for setting in settings:
        deformed = sitk.GetArrayFromImage(case.registrations[setting].deformed)
        pairs.append(DeformedPair.of(f"{image.name}/breathing{seed}/{setting}", build_pyramid(fixed_hu, deformed, config),
                                     case.residual(setting), case.lung, registered=True, registration=setting))
    return pairs


__all__ = ["JUDGE_SEED", "JUDGE_VERSION", "BreathingRegistrations", "breathing_case", "kept_transforms",
           "register_breathing", "registration_pairs", "write_whole"]
