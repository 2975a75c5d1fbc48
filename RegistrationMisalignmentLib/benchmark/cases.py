"""Benchmark cases: a fixed and a moving image, landmarks on the fixed image, and the truth at them.

The truth is what a registration leaves at each fixed landmark x, given T (fixed -> moving points):

* Landmark pairs (DIR-Lab, COPDgene, any files): TRE = ||T(x_F) - x_M||, the paper's definition and
  ``landmarks.residual_tre``'s formula.
* Synthetic pairs with a known DVF u (the always-run studies): the moving image is M(y) = I(y + u(y))
  against the fixed F = I (``synthetic.deform.deform_pair``). elastix finds T with M(T(x)) ~ F(x),
  and the deformed moving image is D(x) = M(T(x)) = I(T(x) + u(T(x))). So D shows at x the point
  T(x) + u(T(x)) of I, which F shows at x itself: the residual misalignment of D against F is
  ``|| T(x) + u(T(x)) - x ||``. That is exactly the label the network is trained on (|u| of
  D(x) = I(x + u(x))), measured in the fixed image's space. (DIR-Lab's TRE is measured in the moving
  image's space; the two differ by the local Jacobian of u.)

Seeds are disjoint from training, which used seeds below 100 000 for phantoms and validation and
random pool seeds for its deformations: case i of a study draws its phantom from 7 000 000 + i,
its DVF from 7 010 000 + i and its landmarks from 7 020 000 + i.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
from RegistrationMisalignmentLib.demo import SHARED_DATA
from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.landmarks import Landmarks

SHARED_CHEST = SHARED_DATA / "chest_ct_1.5mm.nii.gz"
"""The real chest CT crop whose lowest-z slab this study holds out."""

STUDY_SEED = 7_000_000
DVF_SEED = STUDY_SEED + 10_000
LANDMARK_SEED = STUDY_SEED + 20_000
PHANTOM_SIZE_MM = (160.0, 128.0, 128.0)
"""The phantom size training used (``TrainConfig.phantom_size_mm``)."""
TINY_SIZE_MM = (32.0, 32.0, 32.0)
"""--tiny: every synthetic image is this small (x, y, z mm at 1 mm): a phantom of this size, or a
crop of the held-out CT slab centred on its lungs."""
HOLDOUT_FRACTION = 0.25
"""The lowest-z quarter of the shared chest CT's slices, held out of training (``demo.py``)."""
DVF_KIND = "respiratory"
STUDY_DVF = {"max_displacement_mm": 20.0, "respiratory_expansion_mm": (6.0, 16.0), "diaphragm_shift_mm": (10.0, 20.0)}
"""The trainer's respiratory generator with its amplitudes doubled (training: 10 mm, 3-8 mm, 5-10 mm; 20 mm is
the largest of the authors' presets). With the training amplitudes the lung landmarks of the CT slab move only
1-3 mm on average, before any registration; doubled, they move about 3-8 mm (phantom: 4-8 mm, up to 20 mm),
like DIR-Lab 4DCT's inhale/exhale pairs (mean 3.9 to 15 mm per case). The methods only ever see what the
registration leaves, the residual they are trained to class."""


class Truth(Protocol):
    def residual_mm(self, points_lps: np.ndarray, transform_points) -> np.ndarray:
        """Residual misalignment (mm) at fixed landmarks after a registration with point map T."""


@dataclass
class LandmarkTruth:
    """Corresponding moving landmarks: TRE = ||T(x_F) - x_M||."""

    moving: Landmarks

    def residual_mm(self, points_lps: np.ndarray, transform_points) -> np.ndarray:
        return np.linalg.norm(transform_points(points_lps) - self.moving.points_lps, axis=1)


@dataclass
class SyntheticTruth:
    """A known DVF u of M(y) = I(y + u(y)): residual = ||T(x) + u(T(x)) - x|| (see the module doc)."""

    dvf: np.ndarray
    """(3, D, H, W) mm, components along the image's i, j, k axes (the trainer's convention)."""
    reference: sitk.Image
    """The grid u lives on (the fixed image)."""

    def displacement_at(self, points_lps: np.ndarray) -> np.ndarray:
        """u at physical points, trilinear, edges replicated (as ``spatial.compose``), in LPS mm."""
        points = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
        origin = np.array(self.reference.GetOrigin())
        direction = np.array(self.reference.GetDirection()).reshape(3, 3)
        index = np.linalg.solve(direction * np.array(self.reference.GetSpacing()), (points - origin).T)  # (i,j,k) x N
        coords = index[::-1]  # the array is (k, j, i)
        along_axes = np.stack([ndimage.map_coordinates(c, coords, order=1, mode="nearest") for c in self.dvf], axis=1)
        return along_axes @ direction.T

    def residual_mm(self, points_lps: np.ndarray, transform_points) -> np.ndarray:
        mapped = transform_points(points_lps)
        return np.linalg.norm(mapped + self.displacement_at(mapped) - points_lps, axis=1)


@dataclass
class Case:
    """One pair of the benchmark with its landmarks and truth."""

    name: str
    fixed: sitk.Image
    moving: sitk.Image
    landmarks: Landmarks
    """Fixed-image landmarks, LPS mm."""
    truth: Truth
    description: str


def sample_lung_landmarks(fixed: sitk.Image, count: int, seed: int, name: str) -> Landmarks:
    """``count`` voxel centres drawn uniformly from the lungs (eroded by one voxel) of ``fixed``."""
    from RegistrationMisalignmentLib.synthetic.phantom import lung_mask

    lungs = ndimage.binary_erosion(sitk.GetArrayFromImage(lung_mask(fixed)).astype(bool))
    candidates = np.argwhere(lungs)  # (k, j, i)
    if len(candidates) < count:
        raise InputError(f"{name}: only {len(candidates)} lung voxels for {count} landmarks; lower --landmarks")
    chosen = candidates[np.random.default_rng(seed).choice(len(candidates), count, replace=False)]
    points = [fixed.TransformIndexToPhysicalPoint([int(v) for v in kji[::-1]]) for kji in chosen]
    return Landmarks(np.array(points), [str(i + 1) for i in range(count)])


def synthetic_case(hu: np.ndarray, name: str, index: int, landmarks: int, origin_note: str) -> Case:
    """Deform ``hu`` (a 1 mm (D, H, W) HU array) by a respiratory DVF of the case's seed."""
    import torch

    from RegistrationMisalignmentLib.synthetic.deform import deform_pair
    from RegistrationMisalignmentLib.synthetic.dvf import DVFSettings

    fixed = sitk.GetImageFromArray(hu.astype(np.float32))
    fixed.SetSpacing((DEFAULT_CONFIG.spacing_mm,) * 3)
    seed = DVF_SEED + index
    moving_hu, dvf = deform_pair(torch.from_numpy(hu.astype(np.float32)), DVF_KIND, fixed.GetSpacing(),
                                 torch.Generator().manual_seed(seed), DVFSettings(**STUDY_DVF))
    moving = sitk.GetImageFromArray(moving_hu.numpy())
    moving.CopyInformation(fixed)
    points = sample_lung_landmarks(fixed, landmarks, LANDMARK_SEED + index, name)
    return Case(name, fixed, moving, points, SyntheticTruth(dvf.numpy(), fixed),
                f"{origin_note}, deformed by a {DVF_KIND} DVF of doubled amplitude (seed {seed}), "
                f"{landmarks} lung landmarks (seed {LANDMARK_SEED + index})")


def phantom_cases(count: int, landmarks: int, tiny: bool) -> Iterator[Case]:
    """Procedural chest phantoms of seeds 7 000 000 + i (training used seeds below 100 000)."""
    from RegistrationMisalignmentLib.synthetic.phantom import make_chest_phantom

    size = TINY_SIZE_MM if tiny else PHANTOM_SIZE_MM
    for i in range(count):
        image = make_chest_phantom(size, DEFAULT_CONFIG.spacing_mm, STUDY_SEED + i)
        yield synthetic_case(sitk.GetArrayFromImage(image), f"phantom{STUDY_SEED + i}", i, landmarks,
                             f"chest phantom of seed {STUDY_SEED + i}, {size[0]:g} x {size[1]:g} x {size[2]:g} mm")


def held_out_slab() -> np.ndarray:
    """The lowest-z quarter of the shared chest CT on the 1 mm grid (HU), never used in training."""
    from RegistrationMisalignmentLib.synthetic.images import to_training_image

    if not SHARED_CHEST.exists():
        raise InputError(f"the real chest CT {SHARED_CHEST} is missing; use --phantom, or --dirlab / --pairs "
                         "with your own data")
    image = to_training_image(sitk.ReadImage(str(SHARED_CHEST)), SHARED_CHEST.name, DEFAULT_CONFIG)
    return image.crop_z(0, int(round(HOLDOUT_FRACTION * image.hu.shape[0]))).hu


def crop_around_lungs(hu: np.ndarray, size_mm: tuple[float, float, float]) -> np.ndarray:
    """A (z, y, x) box of ``size_mm`` (x, y, z) centred on the lungs' centroid, kept inside the image."""
    from RegistrationMisalignmentLib.synthetic.phantom import lung_mask

    centre = np.argwhere(sitk.GetArrayFromImage(lung_mask(sitk.GetImageFromArray(hu)))).mean(axis=0)
    box = [int(round(s / DEFAULT_CONFIG.spacing_mm)) for s in size_mm[::-1]]
    starts = [int(np.clip(round(c - b / 2), 0, max(n - b, 0))) for c, b, n in zip(centre, box, hu.shape)]
    return hu[tuple(slice(s, s + b) for s, b in zip(starts, box))].copy()


def real_ct_cases(count: int, landmarks: int, tiny: bool) -> Iterator[Case]:
    """The held-out slab of the shared chest CT, deformed by ``count`` different respiratory DVFs.

    The slab is read at once, so a missing CT is reported before any other work.
    """
    slab = held_out_slab()
    if tiny:
        slab = crop_around_lungs(slab, TINY_SIZE_MM)
    depth, height, width = slab.shape
    note = (f"{SHARED_CHEST.name}, lowest-z {HOLDOUT_FRACTION:.0%} of its slices (held out of training: "
            f"validation-loss monitoring only){', lung-centred crop' if tiny else ''}, {width} x {height} x {depth} mm")
    return (synthetic_case(slab, f"chest_ct_slab_dvf{DVF_SEED + i}", i, landmarks, note) for i in range(count))


__all__ = ["Case", "Truth", "LandmarkTruth", "SyntheticTruth", "sample_lung_landmarks", "synthetic_case",
           "phantom_cases", "real_ct_cases", "held_out_slab", "STUDY_SEED", "DVF_SEED", "LANDMARK_SEED",
           "TINY_SIZE_MM", "PHANTOM_SIZE_MM"]
