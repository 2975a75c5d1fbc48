"""Training pairs as real registrations leave them: every training chest CT moved by breathing fields of its own
and registered back by elastix, the truth the dense residual.

Why: the registration judge (``trainer.registration_judge``) ranks models as the whole-chest protocol does, and on
it the paper's synthetic pairs pulled the run away from the shipped model (epochs 126 and 140 below epoch 115;
``benchmarks/results/training/judge_probe.md``). In those pairs density change and interpolation only come with
misalignment; after a real registration they also come with the breathing it undid, and the residual gathers
where elastix fails (sliding pleura, lung base, small vessels). The bank gives the run such pairs of its
training scans, made as the judge's are (``register_breathing``), never of the held-out scan.

Each case (scan, breathing seed, phase) is registered once with every setting and kept on disk (``folder``, one
file per setting: HU as int16, residual as float16, about 0.2 GB for a lung box of 19 M voxels), named by a
hash of everything it is made from, so that a resumed run reads the same pairs and a larger ``cases`` only
registers the new ones. Each registration's elastix transform is kept too (``transforms``, 0.2-0.5 MB a pair,
committed with the canonical run): a new machine applies it again by transformix instead of registering (the
registration is most of a case's minutes), and gets the very pairs the run trained on.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from RegistrationMisalignmentLib.benchmark.cases import CHEST_MARGIN_MM
from RegistrationMisalignmentLib.benchmark.elastix import ELASTIX_DIR, setting_files
from RegistrationMisalignmentLib.config import MisalignmentConfig
from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.preprocess import build_pyramid
from RegistrationMisalignmentLib.synthetic.breathing import chest_anatomy
from RegistrationMisalignmentLib.synthetic.images import TrainingImage, scan_stem
from trainer.config import BANK_REGIONS
from trainer.dataset import DeformedPair
from trainer.registration_judge import JUDGE_SEED, JUDGE_VERSION, register_breathing, write_whole

BANK_SEED = JUDGE_SEED + 1
"""The bank's breathing seeds are drawn from this, the scan's name and the case number."""
BANK_VERSION = 2
"""Raise it when a change here changes the bank's pairs (it is part of every case's file name). 2: not supervised
where the registered image shows the scan's repeated border."""
MIN_LUNG_SHARE = 0.1
"""Scans whose lungs fill less of the body than this are not chest CTs for the bank: the shared data's chest CTs
hold 19-33 %, its abdomen (bowel gas) 1.5 %, its 40-slice DICOM series 1 %."""


@dataclass(eq=False)
class BankCase:
    """One training scan moved by one breathing field: its files, one per elastix setting."""

    image: TrainingImage
    seed: int
    phase: int
    """1: the moved image at exhale (as the protocol's), -1: at inhale."""
    key: str

    def path(self, folder: Path, setting: str, suffix: str = ".pt") -> Path:
        return folder / f"{self.key}_{setting}{suffix}"


def case_seed(image: TrainingImage, index: int) -> int:
    """Breathing seed of case ``index`` of ``image``: its own per scan, so scans do not share a field's values."""
    return int(np.random.SeedSequence([BANK_SEED, zlib.crc32(scan_stem(image.name).encode()), index])
               .generate_state(1)[0])


def chest_lungs(image: TrainingImage) -> np.ndarray | None:
    """(D, H, W) bool: ``image``'s lungs (``chest_anatomy``) on the box ``register_breathing`` cuts (the lungs'
    box + ``CHEST_MARGIN_MM``), or None when they fill less than ``MIN_LUNG_SHARE`` of its body (not a chest CT)."""
    try:
        anatomy = chest_anatomy(image.hu)
    except ValueError:  # no air inside the body
        return None
    if float(anatomy.lung.sum()) < MIN_LUNG_SHARE * float(anatomy.body.sum()):
        return None
    return np.ascontiguousarray(anatomy.crop(*anatomy.lung_box(CHEST_MARGIN_MM)).lung)


@dataclass(frozen=True)
class Augmentation:
    """How a bank pair is varied before its pyramid is built: with three training scans, more anatomies and
    scanners to learn from than the scans themselves show (each drift of the canonical run after epoch 255 lost
    on the held-out scan what it gained on its training ones; mirroring, the first variation, gave its best epochs).

    The pair's relation is kept: the registered image reads the fixed one at x + r(x) (``pair``), so a variation of
    space maps the residual r with it."""

    mirrored: bool = False
    """Left-right (the x axis; the residual's x component negated): a mirror-image anatomy, the heart on the right."""
    zoom: float = 1.0
    """Isotropic scale of the whole pair (1: none): a larger or smaller patient, the residual in mm scaled with it
    (F'(y) = F(y / s), D'(y) = D(y / s) = F'(y + s r(y / s)), so r'(y) = s r(y / s))."""
    noise_hu: float = 0.0
    """Sigma (HU) of white Gaussian noise added to each image on its own: a noisier scanner than the training
    scans' (a 4-D CT's phase; the paper adds 5 HU to its synthetic moving images)."""
    seed: int = 0
    """Of the noise."""

    @property
    def suffix(self) -> str:
        """What the pair's name gains: "/mirrored", "/zoom1.07", "/noise12.5_seed" (its noise seed)."""
        return ("/mirrored" if self.mirrored else "") + (f"/zoom{self.zoom:g}" if self.zoom != 1.0 else "") + (
            f"/noise{self.noise_hu:g}_{self.seed}" if self.noise_hu else "")

    def apply(self, fixed: torch.Tensor, deformed: torch.Tensor, residual: torch.Tensor,
              supervised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pair varied: ``fixed``, ``deformed`` (D, H, W) HU float32, ``residual`` (3, D, H, W) mm (components
        x, y, z along W, H, D), ``supervised`` (D, H, W) bool, on the 1 mm grid. A zoom resamples all four
        trilinearly with the corner voxels kept (``align_corners``), each axis by exactly (n' - 1) / (n - 1), and
        supervises only voxels whose every neighbour was supervised."""
        if self.mirrored:
            fixed, deformed, supervised = fixed.flip(-1), deformed.flip(-1), supervised.flip(-1)
            residual = residual.flip(-1) * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1, 1)
        if self.zoom != 1.0:
            shape = fixed.shape
            size = [max(2, round(n * self.zoom)) for n in shape]

            def resample(volume: torch.Tensor) -> torch.Tensor:
                return F.interpolate(volume[None], size=size, mode="trilinear", align_corners=True)[0]

            fixed, deformed = resample(torch.stack([fixed, deformed]))
            scale = torch.tensor([(m - 1) / (n - 1) for m, n in zip(size, shape)], dtype=torch.float32)
            residual = resample(residual) * scale.flip(0).view(3, 1, 1, 1)  # (z, y, x) axes -> (x, y, z) components
            supervised = resample(supervised[None].float())[0] > 1.0 - 1e-4
        if self.noise_hu:
            generator = torch.Generator().manual_seed(self.seed)
            fixed = fixed + self.noise_hu * torch.randn(fixed.shape, generator=generator)
            deformed = deformed + self.noise_hu * torch.randn(deformed.shape, generator=generator)
        return fixed.contiguous(), deformed.contiguous(), residual.contiguous(), supervised.contiguous()


class RegistrationBank:
    """``cases`` breathing cases of every training chest CT, registered by elastix with ``settings``, supervised
    on ``region`` (``trainer.config.BANK_REGIONS``). ``transforms``: the folder of the registrations' kept elastix
    transforms (``benchmark.elastix.save_parameters``, one .npz per case and setting); None: not kept.

    Raises ``ValueError`` for another region or grid, ``InputError`` when no image is a chest CT, and what
    ``register_breathing`` raises (a setting without a parameter file, no itk-elastix).
    """

    def __init__(self, images: Sequence[TrainingImage], settings: Sequence[str], cases: int, folder: Path,
                 config: MisalignmentConfig, threads: int | None = None, log: Callable[[str], None] = print,
                 region: str = "body", transforms: Path | None = None):
        if config.spacing_mm != 1.0:
            raise ValueError(f"the registration bank works on the 1 mm grid, not {config.spacing_mm} mm")
        if region not in BANK_REGIONS:
            raise ValueError(f"bank region {region!r}: give one of {', '.join(BANK_REGIONS)}")
        self.settings, self.folder, self.config, self.threads, self.log = tuple(settings), folder, config, threads, log
        self.region, self.transforms = region, transforms
        self.lungs = {image.name: lungs for image in images if (lungs := chest_lungs(image)) is not None}
        chest = [image for image in images if image.name in self.lungs]
        if not chest:
            raise InputError(f"the registration bank needs a chest CT among the training scans (lungs at least "
                             f"{MIN_LUNG_SHARE:.0%} of the body; none in {', '.join(i.name for i in images) or 'none'}): "
                             "add one to the data folder or set bank_pairs = 0")
        files = b"".join((ELASTIX_DIR / name).read_bytes() for s in self.settings for name in setting_files(s))
        self.cases = []
        for image in chest:
            scan = hashlib.sha256(memoryview(np.ascontiguousarray(image.hu, dtype=np.float32)).cast("B")).hexdigest()
            for index in range(cases):
                seed, phase = case_seed(image, index), 1 if index % 2 == 0 else -1
                key = hashlib.sha256(json.dumps([BANK_VERSION, JUDGE_VERSION, scan, image.hu.shape, seed, phase,
                                                 self.settings]).encode() + files)
                self.cases.append(BankCase(image, seed, phase, f"{scan_stem(image.name)}_{key.hexdigest()[:12]}"))

    @property
    def entries(self) -> list[tuple[BankCase, str]]:
        """Every (case, setting): the bank's pairs."""
        return [(case, setting) for case in self.cases for setting in self.settings]

    def build(self) -> None:
        """Make every case whose files are missing, saving them as it goes: applied from its kept transforms
        when ``transforms`` holds them all, else registered (on 2 cores 1.5-3.5 minutes a case of the 1.5 mm crop
        with AVX-512, 6-10 without it; 11.5 a LIDC case without it, up to 32 beside other work) and its
        transforms kept."""
        missing = [case for case in self.cases if not all(case.path(self.folder, s).exists() for s in self.settings)]
        self.folder.mkdir(parents=True, exist_ok=True)
        for number, case in enumerate(missing, 1):
            started = time.perf_counter()
            transforms = self.transform_files(case)
            how = "applied from its kept elastix transforms" if self.has_kept_transforms(case) else "registered"
            made = register_breathing(case.image, self.settings, case.seed, self.threads, phase=case.phase,
                                      transforms=transforms)
            fixed = torch.from_numpy(np.rint(sitk.GetArrayFromImage(made.fixed)).astype(np.int16))
            box = ((0, 0, 0), tuple(n - 1 for n in made.body.shape))
            for setting in self.settings:
                registration = made.registrations[setting]
                displacement = registration.displacement(made.moving)
                residual = made.residual(setting, displacement)
                supervised = made.body & shown(displacement, box) & shown(residual.numpy(), made.scan_box)
                deformed = np.rint(sitk.GetArrayFromImage(registration.deformed)).astype(np.int16)
                entry = {"fixed": fixed, "deformed": torch.from_numpy(deformed), "residual": residual.half(),
                         "supervised": torch.from_numpy(supervised), "seed": case.seed, "phase": case.phase}
                write_whole(case.path(self.folder, setting), lambda part: torch.save(entry, part))
            self.log(f"registration bank: case {number}/{len(missing)} ({case.image.name}, breathing {case.seed}, "
                     f"{'exhale' if case.phase > 0 else 'inhale'}) {how} in {time.perf_counter() - started:.0f} s")

    def transform_files(self, case: BankCase) -> dict[str, Path] | None:
        """Where ``case``'s elastix transforms are kept, a file per setting (kept or yet to be); None without
        ``transforms``."""
        if self.transforms is None:
            return None
        return {setting: case.path(self.transforms, setting, ".npz") for setting in self.settings}

    def has_kept_transforms(self, case: BankCase) -> bool:
        """Whether every setting's transform of ``case`` is kept (``build`` then applies them)."""
        transforms = self.transform_files(case)
        return transforms is not None and all(path.exists() for path in transforms.values())

    def pair(self, case: BankCase, setting: str, device: str | torch.device = "cpu",
             augmentation: Augmentation = Augmentation()) -> DeformedPair:
        """The pair of ``case`` registered with ``setting``: fixed = the lungs' box, moving = the registered image,
        DVF = the residual (3, D, H, W) mm, supervised = the body where the registered image shows real anatomy
        (``shown``), and with region "lungs" only its lungs (where the judge and the protocol score), varied by
        ``augmentation`` (``Augmentation``) before its pyramid is built."""
        entry = torch.load(case.path(self.folder, setting), weights_only=True)
        fixed, deformed = entry["fixed"].float(), entry["deformed"].float()
        residual, supervised = entry["residual"].float(), entry["supervised"]
        if self.region == "lungs":
            supervised = supervised & torch.from_numpy(self.lungs[case.image.name])
        fixed, deformed, residual, supervised = augmentation.apply(fixed, deformed, residual, supervised)
        pyramid = build_pyramid(fixed.numpy(), deformed.numpy(), self.config, device)
        name = f"{case.image.name}/breathing{case.seed}/{setting}{augmentation.suffix}"
        return DeformedPair.of(name, pyramid, residual, supervised.numpy(), registered=True, registration=setting)

    def draw(self, count: int, rng: np.random.Generator, device: str | torch.device = "cpu",
             weights: Sequence[float] = (), mirror_share: float = 0.0, zoom: float = 0.0,
             noise_hu: float = 0.0) -> list[DeformedPair]:
        """``count`` different pairs of the bank, their pyramids on ``device`` (with the synthetic pairs'); builds
        what is missing first. ``weights``: relative chance of each setting (one per ``settings``); empty: uniform.
        Each pair's ``Augmentation``: mirrored at the chance ``mirror_share``, scaled by a factor drawn uniformly
        from [1 - ``zoom``, 1 + ``zoom``], noise of a sigma drawn uniformly from [0, ``noise_hu``] HU (what is 0
        draws nothing from ``rng``, so that runs without it draw as before).

        Raises ``InputError`` when ``count`` exceeds the bank, ``ValueError`` for weights that do not fit."""
        self.build()
        entries = self.entries
        if count > len(entries):
            raise InputError(f"bank_pairs {count} exceeds the registration bank's {len(entries)} pairs: "
                             "give fewer or raise bank_cases")
        chance = None
        if len(weights):
            if len(weights) != len(self.settings) or min(weights) <= 0:
                raise ValueError(f"bank weights {list(weights)}: give one positive weight per setting "
                                 f"({', '.join(self.settings)})")
            of_setting = dict(zip(self.settings, weights))
            chance = np.array([of_setting[setting] for _, setting in entries], dtype=float)
            chance /= chance.sum()
        drawn = rng.choice(len(entries), size=count, replace=False, p=chance)
        mirrored = rng.random(count) < mirror_share if mirror_share else np.zeros(count, dtype=bool)
        zooms = 1.0 + rng.uniform(-zoom, zoom, count) if zoom else np.ones(count)
        sigmas = rng.uniform(0.0, noise_hu, count) if noise_hu else np.zeros(count)
        seeds = rng.integers(2**31, size=count) if noise_hu else np.zeros(count, dtype=int)
        augmentations = [Augmentation(bool(m), round(float(z), 3), round(float(n), 1), int(s))
                         for m, z, n, s in zip(mirrored, zooms, sigmas, seeds)]
        return [self.pair(*entries[int(i)], device, a) for i, a in zip(drawn, augmentations)]


def shown(displacement: np.ndarray, bounds: tuple[tuple[int, int, int], tuple[int, int, int]]) -> np.ndarray:
    """(D, H, W) bool: voxels x whose x + d(x) (``displacement`` (3, D, H, W) mm on a 1 mm grid from 0, components
    x, y, z along W, H, D) falls within ``bounds``, the (first, last) voxel (z, y, x) of an image. The registered
    image shows the moving one where x + t(x) lies in it (elsewhere elastix fills its default value), and real
    anatomy where x + r(x) lies in the whole scan (beyond it the moved image repeats the scan's border)."""
    inside = np.ones(displacement.shape[1:], dtype=bool)
    for component, axis in zip(range(3), (2, 1, 0)):
        position = np.arange(displacement.shape[1 + axis], dtype=np.float32).reshape(
            [-1 if a == axis else 1 for a in range(3)])
        target = position + displacement[component]
        inside &= (target >= bounds[0][axis]) & (target <= bounds[1][axis])
    return inside


__all__ = ["BANK_SEED", "BANK_VERSION", "MIN_LUNG_SHARE", "Augmentation", "BankCase", "RegistrationBank", "case_seed",
           "chest_lungs", "shown"]
