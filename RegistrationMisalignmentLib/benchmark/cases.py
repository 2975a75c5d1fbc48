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

The chest-CT study (``chest_ct_cases``) is the nearest thing here to DIR-Lab 4DCT: the whole held-out
chest CT (POPI phase 00, cut to its lungs' box plus a margin) against itself moved by a physiological
breathing field with sliding at the lung surface (``synthetic.breathing``: the moving image is the
exhale of the inhale fixed image, DIR-Lab's pairing), and 300 landmarks on distinct points of the
lungs (``benchmark.landmark_detection``: Förstner points, spread over both lungs).

Seeds are disjoint from training, which used seeds below 100 000 for phantoms and validation and
random pool seeds for its deformations: case i of a phantom study draws its phantom from 7 000 000 + i,
its DVF from 7 010 000 + i and its landmarks from 7 020 000 + i; case i of the chest-CT study its
breathing field from 7 030 000 + i, i < 1000 (its landmark detector breaks ties with 7 020 000). The
trainer's registration judge breathes the same scan with 7 031 000 (``trainer.registration_judge``).
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

SHARED_CHEST = SHARED_DATA / "popi_00_chest_ct.nii.gz"
"""The held-out whole chest CT of the chest-CT study: POPI-model phase 00. The canonical training run
holds it out (trainer/configs/canonical.toml, ``holdout``); no shipped model has seen it."""

STUDY_SEED = 7_000_000
DVF_SEED = STUDY_SEED + 10_000
LANDMARK_SEED = STUDY_SEED + 20_000
PHANTOM_SIZE_MM = (160.0, 128.0, 128.0)
"""The phantom size training used (``TrainConfig.phantom_size_mm``)."""
CHEST_SEED = STUDY_SEED + 30_000
"""Case i of the chest-CT study moves the held-out scan by the breathing field of seed CHEST_SEED + i."""
MAX_CHEST_CASES = 1_000
"""Breathing seeds CHEST_SEED + i for i < this are the chest-CT study's cases."""
CHEST_MARGIN_MM = 15.0
"""The chest-CT case box: the lungs' bounding box grown by this (and cut at the scan's edges)."""
TINY_SIZE_MM = (32.0, 32.0, 32.0)
"""--tiny: every synthetic image is this small (x, y, z mm at 1 mm): a phantom of this size, or a
box of the held-out chest CT at the centre of its right lung."""
DVF_KIND = "respiratory"
STUDY_DVF = {"max_displacement_mm": 20.0, "respiratory_expansion_mm": (6.0, 16.0), "diaphragm_shift_mm": (10.0, 20.0)}
"""The trainer's respiratory generator with its amplitudes doubled (training: 10 mm, 3-8 mm, 5-10 mm; 20 mm is
the largest of the authors' presets), for the phantom study. With the training amplitudes lung landmarks move
only 1-3 mm on average, before any registration; doubled, they move about 4-8 mm (up to 20 mm) in the phantoms.
The chest-CT study uses a physiological breathing field instead (``synthetic.breathing``)."""


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


@dataclass
class ChestScan:
    """The held-out whole chest CT on the 1 mm grid, its anatomy, the case box and the box's landmarks."""

    hu: np.ndarray
    """(D, H, W) HU of the whole scan."""
    anatomy: object
    """``synthetic.breathing.ChestAnatomy`` of the whole scan."""
    box: object
    """The same anatomy cropped to the case box."""
    fixed: sitk.Image
    """The case box's image (HU, float32) at its place in the scan's physical space."""
    landmarks: Landmarks


def _chest_box(anatomy, tiny: bool) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The lungs' bounding box plus ``CHEST_MARGIN_MM``; --tiny: a ``TINY_SIZE_MM`` box at the centre of the
    right lung (the patient's right: smaller x)."""
    if not tiny:
        return anatomy.lung_box(CHEST_MARGIN_MM)
    index = np.argwhere(anatomy.lung)
    right = index[index[:, 2] < (index[:, 2].min() + index[:, 2].max()) / 2]
    centre = right[np.argmin(((right - right.mean(axis=0)) ** 2).sum(axis=1))]  # the lung voxel nearest its centroid
    size = [int(round(s / DEFAULT_CONFIG.spacing_mm)) for s in TINY_SIZE_MM[::-1]]
    start = [int(np.clip(c - n // 2, 0, max(m - n, 0))) for c, n, m in zip(centre, size, anatomy.lung.shape)]
    return tuple(start), tuple(min(a + n, m) for a, n, m in zip(start, size, anatomy.lung.shape))


def load_chest_scan(landmarks: int, tiny: bool) -> ChestScan:
    """Read the held-out chest CT, find its lungs, cut the case box and place the landmarks on it."""
    from RegistrationMisalignmentLib.preprocess import isotropic_reference
    from RegistrationMisalignmentLib.synthetic.breathing import chest_anatomy
    from RegistrationMisalignmentLib.synthetic.images import to_training_image
    from RegistrationMisalignmentLib.benchmark.landmark_detection import detect_landmarks

    scan = sitk.ReadImage(str(SHARED_CHEST))
    hu = to_training_image(scan, SHARED_CHEST.name, DEFAULT_CONFIG).hu
    grid = isotropic_reference(scan, DEFAULT_CONFIG.spacing_mm)
    anatomy = chest_anatomy(hu, (DEFAULT_CONFIG.spacing_mm,) * 3)
    start, stop = _chest_box(anatomy, tiny)
    box = anatomy.crop(start, stop)
    fixed = sitk.GetImageFromArray(np.ascontiguousarray(hu[tuple(slice(a, b) for a, b in zip(start, stop))]))
    fixed.SetSpacing(grid.GetSpacing())
    fixed.SetDirection(grid.GetDirection())
    fixed.SetOrigin(grid.TransformIndexToPhysicalPoint([int(v) for v in start[::-1]]))
    found = detect_landmarks(sitk.GetArrayViewFromImage(fixed), box.lung, landmarks, LANDMARK_SEED,
                             fixed.GetSpacing(), SHARED_CHEST.name)
    points = np.array([fixed.TransformIndexToPhysicalPoint([int(v) for v in kji[::-1]]) for kji in found])
    return ChestScan(hu, anatomy, box, fixed, Landmarks(points, [str(i + 1) for i in range(len(points))]))


def chest_case(scan: ChestScan, index: int, tiny: bool) -> Case:
    """Case ``index``: the scan's box moved by breathing field ``CHEST_SEED + index`` (exhale, as DIR-Lab's
    moving images), with the scan's landmarks and the field as truth."""
    from RegistrationMisalignmentLib.synthetic.breathing import breathe

    seed = CHEST_SEED + index
    moved, field = breathe(sitk.GetArrayViewFromImage(scan.fixed), scan.box, seed,
                           whole=(scan.hu, scan.anatomy.lung))
    moving = sitk.GetImageFromArray(moved)
    moving.CopyInformation(scan.fixed)
    width, height, depth = scan.fixed.GetSize()
    p = field.parameters
    lungs = int(scan.box.lung.sum())
    description = (
        f"{SHARED_CHEST.name} (POPI-model phase 00, a whole chest CT held out of every training run), "
        f"{'a box at the centre of the right lung' if tiny else f'its lungs bounding box + {CHEST_MARGIN_MM:g} mm'}, "
        f"{width} x {height} x {depth} mm at 1 mm ({lungs / 1e6:.2f} L of lung); moving image = the "
        f"{'exhale' if p['phase'] > 0 else 'inhale'} of a breathing field (seed {seed}: cranio-caudal "
        f"{p['cc_mm']:.1f} mm at the dorsal lung base, {100 * (1 - p['ventral_reduction']):.0f} % of it ventrally, "
        f"left/right {1 + p['asymmetry']:.2f}/{1 - p['asymmetry']:.2f}, rise exponent {p['cc_exponent']:.2f}; "
        f"anterior wall {p['ap_mm']:.1f} mm, lateral {p['lateral_mm']:.1f} mm; chest wall and mediastinum "
        f"{100 * p['wall_fraction']:.0f} % of the lung's cranio-caudal motion (sliding); local variation "
        f"{p['local_mm']:.1f} mm on {p['local_knot_mm']:g} mm knots; sponge model in the lungs, 5 HU noise), "
        f"{len(scan.landmarks)} Förstner landmarks in the lungs (ties seed {LANDMARK_SEED})")
    return Case(f"popi00_breathing{seed}", scan.fixed, moving, scan.landmarks,
                SyntheticTruth(field.dvf.numpy(), scan.fixed), description)


def chest_ct_cases(count: int, landmarks: int, tiny: bool) -> Iterator[Case]:
    """The held-out whole chest CT (POPI phase 00), moved by ``count`` different breathing fields.

    A missing scan is reported at once, before any other work; the scan is read and its landmarks
    placed when the first case is asked for, and shared by every case (one fixed image, as the
    breathing fields differ).
    """
    if count > MAX_CHEST_CASES:
        raise InputError(f"--cases {count}: the chest-CT study has at most {MAX_CHEST_CASES} breathing fields (the "
                         "seeds after them are the training run's registration judge)")
    if not SHARED_CHEST.exists():
        raise InputError(f"the held-out chest CT {SHARED_CHEST} is missing; use --phantom, or --dirlab / --pairs "
                         "with your own data")

    def cases() -> Iterator[Case]:
        scan = load_chest_scan(landmarks, tiny)
        for i in range(count):
            yield chest_case(scan, i, tiny)

    return cases()


__all__ = ["Case", "Truth", "LandmarkTruth", "SyntheticTruth", "sample_lung_landmarks", "synthetic_case",
           "phantom_cases", "chest_ct_cases", "load_chest_scan", "chest_case", "ChestScan", "STUDY_SEED", "DVF_SEED",
           "LANDMARK_SEED", "CHEST_SEED", "MAX_CHEST_CASES", "SHARED_CHEST", "TINY_SIZE_MM", "PHANTOM_SIZE_MM"]
