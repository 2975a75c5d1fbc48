"""The benchmark's input: a chest-CT-sized fixed/moving pair made from the procedural phantom.

Geometry is fixed so numbers from different runs and machines compare: by default 512 x 512 x 130
voxels at 0.97 x 0.97 x 2.5 mm (origin 0, identity direction), the chest CT of issue 7. A scale f
multiplies the voxel count by f and keeps the spacing (each axis grows by f^(1/3)).

Fixed = the phantom (drawn at ``phantom_spacing_mm``, isotropic) resampled onto that grid; moving =
the phantom sampled at x + u(x), u a seeded respiratory DVF from ``trainer.deformations.deform_pair``.
The DVF is drawn on a 4 mm copy of the phantom (it is smooth on that scale: knots 35-50 mm) and
applied at full resolution with SimpleITK, so making a 2x volume never needs the several GB a
full-resolution ``deform_pair`` would. Run times do not depend on the voxel values, only on the
grid; the content only has to look like a chest so that outputs are plausible.

Pairs are cached as uncompressed .mha files keyed by the geometry and seed (loading is not timed).
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import SimpleITK as sitk
import torch

from RegistrationMisalignmentLib.preprocess import isotropic_reference, resample_onto
from trainer.deformations import deform_pair
from trainer.phantom import AIR_HU, make_chest_phantom

CHEST_SHAPE = (512, 512, 130)
"""(x, y, z) voxels of the reference chest CT."""
CHEST_SPACING = (0.97, 0.97, 2.5)
"""(x, y, z) mm of the reference chest CT."""
DVF_SPACING_MM = 4.0
"""Grid on which the respiratory DVF is drawn before it is interpolated onto the fixed grid."""


@dataclass(frozen=True)
class PairGeometry:
    """The fixed grid: size (x, y, z) voxels and spacing (x, y, z) mm; origin 0, identity direction."""

    shape: tuple[int, int, int] = CHEST_SHAPE
    spacing: tuple[float, float, float] = CHEST_SPACING

    def scaled(self, factor: float) -> "PairGeometry":
        """The same spacing with ``factor`` times the voxels (each axis times factor^(1/3), rounded)."""
        side = factor ** (1.0 / 3.0)
        return PairGeometry(tuple(max(1, round(n * side)) for n in self.shape), self.spacing)  # type: ignore[arg-type]

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def extent_mm(self) -> tuple[float, ...]:
        return tuple(n * s for n, s in zip(self.shape, self.spacing))

    def reference(self) -> sitk.Image:
        image = sitk.Image(list(self.shape), sitk.sitkUInt8)
        image.SetSpacing(self.spacing)
        return image

    def grid_1mm_shape(self, spacing_mm: float = 1.0) -> tuple[int, int, int]:
        """(x, y, z) size of the isotropic grid the network runs on (as ``inference.predict`` builds it)."""
        return tuple(isotropic_reference(self.reference(), spacing_mm).GetSize())  # type: ignore[return-value]


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "regmis-benchmark"


def respiratory_field(phantom: sitk.Image, seed: int) -> sitk.Image:
    """A seeded respiratory DVF of ``phantom`` (x, y, z mm, vector float64) on a ``DVF_SPACING_MM`` grid."""
    coarse = resample_onto(phantom, isotropic_reference(phantom, DVF_SPACING_MM), AIR_HU)
    image = torch.from_numpy(sitk.GetArrayFromImage(coarse))
    _, dvf = deform_pair(image, "respiratory", (DVF_SPACING_MM,) * 3, torch.Generator().manual_seed(seed))
    field = sitk.GetImageFromArray(dvf.permute(1, 2, 3, 0).double().numpy(), isVector=True)
    field.CopyInformation(coarse)
    return field


def make_pair(geometry: PairGeometry, seed: int = 0, phantom_spacing_mm: float = 1.0) -> tuple[sitk.Image, sitk.Image]:
    """(fixed, moving) HU images on ``geometry``'s grid; moving(x) = phantom(x + u(x))."""
    # One DVF voxel of margin, so the field covers the fixed grid's last voxels too.
    size_mm = tuple(e + DVF_SPACING_MM for e in geometry.extent_mm)
    phantom = make_chest_phantom(size_mm, phantom_spacing_mm, seed=seed)  # type: ignore[arg-type]
    reference = geometry.reference()
    fixed = resample_onto(phantom, reference, AIR_HU)
    transform = sitk.DisplacementFieldTransform(respiratory_field(phantom, seed))
    moving = sitk.Resample(phantom, reference, transform, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    return fixed, moving


def cached_pair(geometry: PairGeometry, seed: int = 0, phantom_spacing_mm: float = 1.0,
                cache_dir: Path | None = None) -> tuple[Path, Path]:
    """Paths of the (fixed, moving) .mha files for this geometry, generating them on first use."""
    key = json.dumps({**asdict(geometry), "seed": seed, "phantom": phantom_spacing_mm, "v": 1}, sort_keys=True)
    tag = "x".join(map(str, geometry.shape)) + "_" + hashlib.sha1(key.encode()).hexdigest()[:10]
    directory = cache_dir or default_cache_dir()
    fixed_path, moving_path = directory / f"fixed_{tag}.mha", directory / f"moving_{tag}.mha"
    if not (fixed_path.exists() and moving_path.exists()):
        directory.mkdir(parents=True, exist_ok=True)
        fixed, moving = make_pair(geometry, seed, phantom_spacing_mm)
        # Write under a temporary name first so an interrupted run never leaves half a pair in the cache.
        for image, path in ((fixed, fixed_path), (moving, moving_path)):
            partial = path.with_suffix(".partial.mha")
            sitk.WriteImage(image, str(partial), useCompression=False)
            partial.replace(path)
    return fixed_path, moving_path

