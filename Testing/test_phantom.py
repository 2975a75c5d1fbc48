"""The procedural chest phantom: realistic HU per tissue, reproducible, fast, and a lung mask that finds both lungs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from RegistrationMisalignmentLib.synthetic.phantom import _rasterise_tubes, lung_mask, make_chest_phantom

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZE_MM = (96.0, 80.0, 80.0)
SPACING_MM = 1.0


@pytest.fixture(scope="module")
def phantom() -> sitk.Image:
    return make_chest_phantom(SIZE_MM, SPACING_MM, seed=0)


def test_geometry(phantom):
    assert phantom.GetSize() == (96, 80, 80)
    assert phantom.GetSpacing() == (1.0, 1.0, 1.0)
    assert phantom.GetOrigin() == (0.0, 0.0, 0.0)
    assert phantom.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert phantom.GetPixelID() == sitk.sitkFloat32


def test_tissue_hu_ranges_are_present(phantom):
    hu = sitk.GetArrayFromImage(phantom)
    lungs = sitk.GetArrayFromImage(lung_mask(phantom)).astype(bool)
    assert -900 < np.median(hu[lungs]) < -800
    assert np.median(hu[hu < -950]) == pytest.approx(-1000, abs=5)  # outside air
    soft = (hu > -150) & (hu < 100)  # fat, muscle, heart, liver, vessels
    assert soft.mean() > 0.2
    assert (hu > 300).sum() > 1000  # ribs and spine
    assert (hu > 600).sum() > 100  # ribs are the densest bone


def test_lungs_hold_bright_vessels(phantom):
    """Vessels are holes (> -300 HU) in the lung mask when each axial slice is filled."""
    hu = sitk.GetArrayFromImage(phantom)
    lungs = sitk.GetArrayFromImage(lung_mask(phantom)).astype(bool)
    filled = np.stack([ndimage.binary_fill_holes(s) for s in lungs])
    vessels = filled & ~lungs & (hu > -300)
    assert vessels.sum() > 200


def test_lung_base_sits_on_the_diaphragm(phantom):
    """Array index 0 along z is the feet end: the lungs start above it and the liver below."""
    lungs = sitk.GetArrayFromImage(lung_mask(phantom)).astype(bool)
    occupied = np.nonzero(lungs.any(axis=(1, 2)))[0]
    assert occupied[0] > 0.1 * lungs.shape[0]
    assert not lungs[: occupied[0]].any()


def test_reproducible_and_seeded():
    a = sitk.GetArrayFromImage(make_chest_phantom((48.0, 40.0, 40.0), 2.0, seed=3))
    b = sitk.GetArrayFromImage(make_chest_phantom((48.0, 40.0, 40.0), 2.0, seed=3))
    c = sitk.GetArrayFromImage(make_chest_phantom((48.0, 40.0, 40.0), 2.0, seed=4))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_default_phantom_builds_in_under_two_seconds():
    start = time.process_time()  # CPU time: other work on a shared machine does not count
    image = make_chest_phantom()
    assert time.process_time() - start < 2.0
    assert image.GetSize() == (160, 128, 128)


def test_lung_mask_finds_two_lungs(phantom):
    mask = lung_mask(phantom)
    assert mask.GetSize() == phantom.GetSize() and mask.GetOrigin() == phantom.GetOrigin()
    values = sitk.GetArrayFromImage(mask)
    labels, count = ndimage.label(values)
    assert count == 2
    sizes = np.bincount(labels.ravel())[1:]
    assert sizes.min() > 0.3 * sizes.max()  # two lungs of similar size, not a lung and a speck
    assert (sitk.GetArrayFromImage(phantom)[values > 0] < -400).all()


def test_lung_mask_ignores_outside_air_and_small_gas():
    hu = np.full((30, 40, 40), -1000.0, dtype=np.float32)
    hu[:, 5:35, 5:35] = 40.0  # body
    hu[5:25, 10:30, 8:18] = -850.0  # right lung
    hu[5:25, 10:30, 22:32] = -850.0  # left lung
    hu[27:29, 20:22, 20:22] = -1000.0  # a pocket of bowel gas, far smaller than a lung
    values = sitk.GetArrayFromImage(lung_mask(sitk.GetImageFromArray(hu)))
    assert ndimage.label(values)[1] == 2
    assert values.sum() == 2 * 20 * 20 * 10
    hu[20:24, 18:20, 18:22] = -1000.0  # airways join the lungs: one component, and the gas is still no lung
    values = sitk.GetArrayFromImage(lung_mask(sitk.GetImageFromArray(hu)))
    assert ndimage.label(values)[1] == 1
    assert values[27:29, 20:22, 20:22].sum() == 0


def test_rasterised_tube_has_the_right_radius():
    fraction = _rasterise_tubes((20, 20, 40), 1.0, [(np.array([5.0, 10.0, 10.0]), np.array([35.0, 10.0, 10.0]), 3.0)])
    assert fraction[10, 10, 20] == 1.0 and fraction[10, 12, 20] == 1.0  # centre line and 2 mm off it
    assert fraction[10, 14, 20] == 0.0  # 4 mm off the axis
    assert fraction[:, :, 10:30].sum() == pytest.approx(np.pi * 9 * 20, rel=0.1)  # pi r^2 L


@pytest.mark.skipif(not (DATA / "chest_ct_1.5mm.nii.gz").exists(), reason="shared chest CT not present")
def test_lung_mask_on_real_chest_ct():
    """A cropped field of view cuts the lungs at the image's sides; they must still be found."""
    image = sitk.ReadImage(str(DATA / "chest_ct_1.5mm.nii.gz"))
    values = sitk.GetArrayFromImage(lung_mask(image)).astype(bool)
    hu = sitk.GetArrayFromImage(image)
    assert 0.1 < values.mean() < 0.6
    assert -950 < hu[values].mean() < -700
