"""The chest-CT study's truth and landmarks: the breathing field (``synthetic.breathing``) on a chest
phantom, and the Förstner landmark detector (``benchmark.landmark_detection``)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from RegistrationMisalignmentLib.benchmark.cases import SyntheticTruth
from RegistrationMisalignmentLib.benchmark.landmark_detection import MIN_HU, detect_landmarks
from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.synthetic.breathing import (
    BreathingSettings, airway_mask, breathe, breathing_field, chest_anatomy, sample_at,
)
from RegistrationMisalignmentLib.synthetic.phantom import lung_mask, make_chest_phantom

SETTINGS = BreathingSettings()


@pytest.fixture(scope="module")
def phantom():
    image = make_chest_phantom((160.0, 128.0, 128.0), 1.0, seed=7_600_000)
    hu = sitk.GetArrayFromImage(image)
    return image, hu, chest_anatomy(hu)


@pytest.fixture(scope="module")
def field(phantom):
    _, _, anatomy = phantom
    return breathing_field(anatomy, torch.Generator().manual_seed(11))


def test_anatomy_finds_the_lungs_of_a_phantom(phantom):
    image, hu, anatomy = phantom
    reference = sitk.GetArrayFromImage(lung_mask(image)).astype(bool)
    overlap = (anatomy.lung & reference).sum() / reference.sum()
    assert overlap > 0.97 and anatomy.lung.sum() < 1.1 * reference.sum()  # vessels inside are added, little else
    z = np.nonzero(anatomy.lung.any(axis=(1, 2)))[0]
    assert abs(anatomy.apex_mm - z[-1]) <= 3 and anatomy.base_mm.min() < z[0] + 15
    assert anatomy.body[hu > -300].all()


def test_airways_are_traced_from_the_top_slice_until_they_join_a_lung():
    body = np.zeros((60, 80, 80), dtype=bool)
    body[:, 5:75, 5:75] = True
    air = np.zeros_like(body)
    air[10:40, 20:60, 10:35] = air[10:40, 20:60, 45:70] = True  # two lungs
    air[30:, 36:44, 36:44] = True  # the trachea, from the top down to the lungs' height
    air[38:40, 36:44, 30:50] = True  # main bronchi joining it to both lungs
    airways = airway_mask(air, body, (1.0, 1.0, 1.0))
    assert airways[40:, 36:44, 36:44].all()  # the trachea, whole
    assert not airways[:38].any() and not airways[:, :, :35].any() and not airways[:, :, 45:].any()
    no_neck = air.copy()
    no_neck[50:] = False  # the scan ends below the neck: nothing to trace
    assert not airway_mask(no_neck, body, (1.0, 1.0, 1.0)).any()


def test_the_field_is_seeded(phantom, field):
    _, _, anatomy = phantom
    again = breathing_field(anatomy, torch.Generator().manual_seed(11))
    assert torch.equal(again.dvf, field.dvf) and again.parameters == field.parameters
    other = breathing_field(anatomy, torch.Generator().manual_seed(12))
    assert (other.dvf - field.dvf).abs().max() > 1.0


def test_amplitudes_are_those_of_4dct_and_largest_at_the_base(phantom, field):
    _, _, anatomy = phantom
    p = field.parameters
    for name in ("cc_mm", "ap_mm", "lateral_mm", "wall_fraction", "local_mm"):
        low, high = getattr(SETTINGS, name)
        assert low <= p[name] <= high, name
    lung = field.lung_side.numpy()
    u = field.dvf.numpy()
    magnitude = np.linalg.norm(u[:, lung], axis=0)
    assert 15.0 < magnitude.max() < 32.0  # DIR-Lab: up to ~25-30 mm
    assert 3.0 < magnitude.mean() < 15.0  # DIR-Lab: 3.9-15 mm per case
    z = np.nonzero(lung)[0]
    low, high = np.percentile(z, [10, 90])
    cc = np.abs(u[2][lung])
    assert cc[z <= low].mean() > 3 * cc[z >= high].mean()  # the base moves, the apex hardly
    assert u[2][lung].mean() < 0  # exhale: the moved image shows at x the tissue from below
    assert (breathing_field(anatomy, torch.Generator().manual_seed(11), phase=-1).dvf[2][field.lung_side].mean() > 0)


def test_the_field_is_continuous_inside_the_lung_and_jumps_at_its_surface(field):
    u, lung = field.dvf.numpy(), field.lung_side.numpy()
    inner = ndimage.binary_erosion(lung, iterations=2)
    for axis in (1, 2, 3):
        step = np.abs(np.diff(u, axis=axis)).max(axis=0)
        both = np.logical_and(*(np.take(inner, range(n, inner.shape[axis - 1] - 1 + n), axis=axis - 1)
                                for n in (0, 1)))
        assert np.percentile(step[both], 99.9) < 0.8, axis  # smooth inside: well under the 1 mm per mm of a fold
    # Across the lungs' lateral surfaces (lung <-> chest wall along x), in their lower half:
    z = np.nonzero(lung)[0]
    lower = np.zeros_like(lung)
    lower[: int(np.median(z))] = True
    cross = (lung[:, :, 1:] != lung[:, :, :-1]) & lower[:, :, 1:]
    jump = np.abs(np.diff(u, axis=3))[:, cross]
    assert np.median(jump[2]) > 3.0  # the cranio-caudal motion slides...
    assert np.median(np.hypot(jump[0], jump[1])) < 1.0  # ...along the surface, which does not open or overlap


def test_the_moved_image_is_made_with_exactly_the_truth_field(phantom):
    _, hu, anatomy = phantom
    quiet = BreathingSettings(noise_sigma_hu=0.0)
    moved, result = breathe(hu, anatomy, seed=5, settings=quiet)
    warped = sample_at(torch.from_numpy(hu), (0, 0, 0), result.dvf, anatomy.spacing).numpy()
    outside = ~result.lung_side.numpy()
    np.testing.assert_array_equal(moved[outside], warped[outside])  # outside the lungs: the warp alone
    # Inside them the sponge model changes the density by the lung's volume ratio (clamped to 0.5-2):
    # at exhale the lung is smaller, so denser.
    inside = ~outside & (hu > -950)
    ratio = (moved[inside] + 1000) / np.maximum(warped[inside] + 1000, 1e-3)
    assert 0.5 - 1e-4 <= ratio.min() and ratio.max() <= 2.0 + 1e-4 and np.median(ratio) > 1.02
    noisy, again = breathe(hu, anatomy, seed=5)
    assert torch.equal(again.dvf, result.dvf) and 4.0 < np.std(noisy - moved) < 6.0  # 5 HU noise, same field
    # The benchmark's truth reads this field: without registration the residual at a voxel is |u| there.
    reference = sitk.GetImageFromArray(hu)
    truth = SyntheticTruth(result.dvf.numpy(), reference)
    kji = np.argwhere(result.lung_side.numpy())[::997]
    points = np.array([reference.TransformIndexToPhysicalPoint([int(v) for v in p[::-1]]) for p in kji])
    np.testing.assert_allclose(truth.residual_mm(points, lambda q: q),
                               np.linalg.norm(result.dvf.numpy()[:, kji[:, 0], kji[:, 1], kji[:, 2]], axis=0),
                               rtol=1e-5)


def test_a_cropped_anatomy_reads_the_scan_around_its_box(phantom):
    _, hu, anatomy = phantom
    start, stop = (20, 10, 30), (90, 100, 120)
    box = anatomy.crop(start, stop)
    assert box.offset == start and box.lung.shape == (70, 90, 90) and box.apex_mm == anatomy.apex_mm
    volume = torch.from_numpy(hu)
    zero = torch.zeros((3, *box.lung.shape))
    np.testing.assert_allclose(sample_at(volume, start, zero, box.spacing).numpy(), hu[20:90, 10:100, 30:120],
                               atol=0.05)  # float32 grid coordinates
    shift = zero.clone()
    shift[2] = -5.0  # 5 mm down: read from below the box, inside the scan
    np.testing.assert_allclose(sample_at(volume, start, shift, box.spacing).numpy(), hu[15:85, 10:100, 30:120],
                               atol=0.05)
    moved, result = breathe(hu[20:90, 10:100, 30:120], box, seed=3, whole=(hu, anatomy.lung))
    assert moved.shape == box.lung.shape and result.dvf.shape == (3, *box.lung.shape)
    # The deterministic parts of the field (all but the local variation) agree with the whole scan's.
    whole = breathing_field(anatomy, torch.Generator().manual_seed(3))
    local_mm = whole.parameters["local_mm"]
    np.testing.assert_allclose(result.dvf[2][box.lung].mean(), whole.dvf[2][20:90, 10:100, 30:120][box.lung].mean(),
                               atol=local_mm)


# ---- landmarks ------------------------------------------------------------------------------
def test_landmarks_sit_on_distinct_structures_inside_the_lungs(phantom):
    _, hu, anatomy = phantom
    points = detect_landmarks(hu, anatomy.lung, 30, seed=1)
    assert points.shape == (30, 3)
    assert anatomy.lung[tuple(points.T)].all()
    assert (hu[tuple(points.T)] > MIN_HU).all()  # on a vessel, not in the parenchyma beside it (-850 HU)
    mean = ndimage.uniform_filter(hu.astype(np.float64), 5)
    variance = ndimage.uniform_filter(hu.astype(np.float64) ** 2, 5) - mean**2
    random = np.argwhere(ndimage.binary_erosion(anatomy.lung, iterations=2))
    random = random[np.random.default_rng(0).choice(len(random), 600, replace=False)]
    assert np.median(variance[tuple(points.T)]) > 4 * np.median(variance[tuple(random.T)])
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1) + 1e9 * np.eye(len(points))
    assert distances.min() >= 5.0  # spread out, never two on one structure
    np.testing.assert_array_equal(detect_landmarks(hu, anatomy.lung, 30, seed=1), points)  # deterministic
    sides = points[:, 2] < hu.shape[2] / 2
    assert 0.3 < sides.mean() < 0.7  # both lungs


def test_too_many_landmarks_for_the_lungs_is_an_input_error(phantom):
    _, hu, anatomy = phantom
    tiny = np.zeros_like(anatomy.lung)
    tiny[60:66, 60:66, 40:46] = anatomy.lung[60:66, 60:66, 40:46]
    with pytest.raises(InputError, match="lower --landmarks"):
        detect_landmarks(hu, tiny, 300, seed=1, name="phantom")
