"""The registration checks against cases with a known answer (RegistrationMisalignmentLib.checks).

Jacobian: an affine transform (det(I + A) everywhere, on an oblique anisotropic grid too), a local folding
field with an analytic determinant, SimpleITK's own filter where it applies. Inverse consistency: a
transform and its exact inverse (0), a wrong inverse (its known error), a displacement field and its ITK
inverse. Confidence / entropy of known probabilities; intensity difference of a known shift; the summary's
shares, folding counts and landmark table; the re-registration of a real CT crop shifted by a known amount.
"""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from RegistrationMisalignmentLib.checks.confidence import MAX_ENTROPY_BITS, confidence_maps
from RegistrationMisalignmentLib.checks.fields import as_transform
from RegistrationMisalignmentLib.checks.intensity import intensity_difference
from RegistrationMisalignmentLib.checks.inverse_consistency import inverse_consistency
from RegistrationMisalignmentLib.checks.jacobian import jacobian_determinant, jacobian_stats
from RegistrationMisalignmentLib.checks.maps import MAPS
from RegistrationMisalignmentLib.progress import Reporter
from RegistrationMisalignmentLib.checks.run import default_checks, parse_checks, run_checks
from RegistrationMisalignmentLib.checks.summary import summarize
from RegistrationMisalignmentLib.errors import InputError, PredictionCancelled
from RegistrationMisalignmentLib.landmarks import Landmarks, invert_displacement_field, pair_landmarks
from conftest import SHARED_DATA

CHEST = SHARED_DATA / "chest_ct_1.5mm.nii.gz"


def grid(size=(18, 16, 12), spacing=(1.2, 1.0, 1.5), angle: float = 0.0, origin=(-10.0, 5.0, 20.0)) -> sitk.Image:
    """An empty uint8 image: only its grid is used. ``angle`` rotates it about z and x (an oblique grid)."""
    image = sitk.Image(list(size), sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    c, s = math.cos(angle), math.sin(angle)
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    rx = np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])
    image.SetDirection((rz @ rx).ravel().tolist())
    return image


def affine(matrix, translation=(0.0, 0.0, 0.0), center=(0.0, 0.0, 0.0)) -> sitk.AffineTransform:
    t = sitk.AffineTransform(3)
    t.SetMatrix(np.asarray(matrix, dtype=float).ravel().tolist())
    t.SetTranslation(translation)
    t.SetCenter(center)
    return t


A = np.array([[0.10, 0.05, -0.02], [0.02, -0.20, 0.03], [0.01, 0.04, 0.15]])


def physical_points(image: sitk.Image) -> np.ndarray:
    """(z, y, x, 3) LPS positions of every voxel centre."""
    size = image.GetSize()
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in size[::-1]), indexing="ij")
    index = np.stack([i, j, k], axis=-1)
    matrix = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    return index @ matrix.T + np.array(image.GetOrigin())


# ---- Jacobian ------------------------------------------------------------------------------
@pytest.mark.parametrize("angle", [0.0, 0.6])
def test_jacobian_of_an_affine_transform_is_det_of_its_matrix_on_any_grid(angle):
    reference = grid(angle=angle)
    det = sitk.GetArrayFromImage(jacobian_determinant(affine(np.eye(3) + A, (3.0, -2.0, 1.0), (5, 5, 5)), reference))
    np.testing.assert_allclose(det, np.linalg.det(np.eye(3) + A), rtol=1e-6)
    assert det.shape == reference.GetSize()[::-1]


def test_jacobian_agrees_with_simpleitks_filter_on_an_axis_aligned_grid_and_not_on_an_oblique_one():
    transform = sitk.BSplineTransform(3, 3)
    transform.SetTransformDomainOrigin((-12.0, 3.0, 18.0))
    transform.SetTransformDomainPhysicalDimensions((26.0, 20.0, 22.0))
    transform.SetTransformDomainMeshSize((3, 3, 3))
    rng = np.random.default_rng(0)
    transform.SetParameters(rng.normal(0.0, 1.5, len(transform.GetParameters())).tolist())
    for angle, agree in ((0.0, True), (0.6, False)):
        reference = grid(angle=angle)
        ours = sitk.GetArrayFromImage(jacobian_determinant(transform, reference))[1:-1, 1:-1, 1:-1]
        field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, reference.GetSize(),
                                                  reference.GetOrigin(), reference.GetSpacing(), reference.GetDirection())
        theirs = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))[1:-1, 1:-1, 1:-1]
        assert np.allclose(ours, theirs, atol=1e-6) == agree
    # On the oblique grid ours is still the affine answer (the previous test); here: a rotated grid of the
    # same field gives the same determinant at the same physical points, up to finite differences.


def test_jacobian_of_a_folding_field_matches_its_analytic_determinant():
    # u_x = -k (x - c) g(r), g a Gaussian: det J = 1 + du_x/dx = 1 - k g (1 - (x - c)^2 / sigma^2).
    reference = grid(size=(41, 31, 31), spacing=(0.5, 1.0, 1.0), origin=(-10.0, -15.0, -15.0))
    points = physical_points(reference)
    k, sigma = 3.0, 4.0
    r2 = np.sum(points**2, axis=-1)
    g = np.exp(-r2 / (2 * sigma**2))
    u = np.zeros(points.shape)
    u[..., 0] = -k * points[..., 0] * g
    field = sitk.GetImageFromArray(u, isVector=True)
    field.CopyInformation(reference)
    analytic = 1.0 - k * g * (1.0 - points[..., 0] ** 2 / sigma**2)

    det = jacobian_determinant(field, reference)
    values = sitk.GetArrayFromImage(det)
    np.testing.assert_allclose(values[1:-1, 1:-1, 1:-1], analytic[1:-1, 1:-1, 1:-1], atol=0.05)
    assert values[15, 15, 20] == pytest.approx(1.0 - k, abs=0.05)  # the centre folds: det = 1 - k = -2
    stats = jacobian_stats(det)
    expected = int(np.count_nonzero(analytic <= 0))
    assert expected > 100 and abs(stats.folding - expected) <= 0.05 * expected
    assert stats.folding_share == pytest.approx(stats.folding / values.size)
    assert stats.outside_range >= stats.folding


def test_jacobian_reads_transform_files_and_refuses_bad_input(tmp_path):
    path = tmp_path / "registration.tfm"
    sitk.WriteTransform(affine(np.eye(3) * 1.1), str(path))
    det = sitk.GetArrayFromImage(jacobian_determinant(path, grid()))
    np.testing.assert_allclose(det, 1.1**3, rtol=1e-6)
    with pytest.raises(InputError, match="3-component"):
        as_transform(sitk.Image([4, 4, 4], sitk.sitkFloat32))
    with pytest.raises(InputError, match="not found"):
        jacobian_determinant(tmp_path / "missing.tfm", grid())


# ---- inverse consistency -------------------------------------------------------------------
def test_inverse_consistency_of_a_transform_and_its_exact_inverse_is_zero():
    reference = grid(angle=0.4)
    forward = affine(np.eye(3) + A, (3.0, -2.0, 1.0), (4.0, 1.0, 2.0))
    backward = forward.GetInverse()
    error = sitk.GetArrayFromImage(inverse_consistency(forward, backward, reference))
    assert error.max() < 1e-6


def test_inverse_consistency_of_a_wrong_inverse_is_its_known_error():
    reference = grid()
    forward = sitk.TranslationTransform(3, (3.0, 0.0, -1.0))
    backward = sitk.TranslationTransform(3, (-1.0, 0.0, 1.0))  # undoes only 1 of the 3 mm in x
    np.testing.assert_allclose(sitk.GetArrayFromImage(inverse_consistency(forward, backward, reference)), 2.0, atol=1e-6)
    # A rotation about the grid centre and no inverse: |R x - x| = 2 |x - c| sin(theta / 2) off the axis.
    center = np.array(reference.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in reference.GetSize()]))
    rotation = sitk.Euler3DTransform(center.tolist(), 0.0, 0.0, 0.2)
    error = sitk.GetArrayFromImage(inverse_consistency(rotation, sitk.Transform(3, sitk.sitkIdentity), reference))
    radius = np.linalg.norm((physical_points(reference) - center)[..., :2], axis=-1)
    np.testing.assert_allclose(error, 2 * radius * math.sin(0.1), atol=1e-5)


def test_inverse_consistency_of_a_displacement_field_and_its_itk_inverse_is_small(tmp_path):
    reference = grid(size=(24, 24, 20), spacing=(2.0, 2.0, 2.0))
    points = physical_points(reference)
    centre = points.reshape(-1, 3).mean(axis=0)
    u = np.zeros(points.shape)
    u[..., 0] = 2.5 * np.exp(-np.sum((points - centre) ** 2, axis=-1) / (2 * 10.0**2))
    field = sitk.GetImageFromArray(u, isVector=True)
    field.CopyInformation(reference)
    inverse = invert_displacement_field(field)
    sitk.WriteImage(field, str(tmp_path / "forward.nii.gz"))  # the files go through landmarks.read_transform
    sitk.WriteImage(inverse, str(tmp_path / "backward.nii.gz"))
    error = sitk.GetArrayFromImage(inverse_consistency(tmp_path / "forward.nii.gz", tmp_path / "backward.nii.gz",
                                                       reference))
    assert error[2:-2, 2:-2, 2:-2].max() < 0.1
    wrong = sitk.GetArrayFromImage(inverse_consistency(field, field, reference))  # the field twice: 2 |u| where it is flat
    assert wrong.max() == pytest.approx(2 * 2.5, abs=0.2)


# ---- confidence ----------------------------------------------------------------------------
def test_confidence_and_entropy_of_known_probabilities():
    probabilities = np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0], [2.0, 1.0, 1.0],
                              [0.0, 0.0, 0.0], [0.2, 0.3, 0.5]], dtype=np.float32).reshape(1, 1, 6, 3)
    image = sitk.GetImageFromArray(probabilities, isVector=True)
    image.SetSpacing((1.5, 1.5, 2.0))
    confidence, entropy = confidence_maps(image)
    np.testing.assert_allclose(sitk.GetArrayFromImage(confidence)[0, 0], [1.0, 1 / 3, 0.5, 0.5, 0.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(sitk.GetArrayFromImage(entropy)[0, 0],
                               [0.0, MAX_ENTROPY_BITS, 1.0, 1.5, 0.0,
                                -(0.2 * math.log2(0.2) + 0.3 * math.log2(0.3) + 0.5 * math.log2(0.5))], atol=1e-6)
    assert confidence.GetSpacing() == image.GetSpacing()
    mask = sitk.GetImageFromArray(np.array([[[1, 1, 0, 1, 1, 1]]], dtype=np.uint8))
    mask.CopyInformation(confidence)
    masked, _ = confidence_maps(image, mask)
    assert sitk.GetArrayFromImage(masked)[0, 0, 2] == 0.0
    with pytest.raises(InputError, match="vector image"):
        confidence_maps(sitk.Image([3, 3, 3], sitk.sitkFloat32))


# ---- intensity -----------------------------------------------------------------------------
def test_intensity_difference_of_a_known_shift():
    reference = grid(size=(30, 18, 18), spacing=(1.0, 1.0, 1.0))
    x = physical_points(reference)[..., 0]
    fixed = sitk.GetImageFromArray((40.0 * x - 900.0).astype(np.float32))  # a ramp, 40 HU/mm along x, air to tissue
    fixed.CopyInformation(reference)
    deformed = sitk.GetImageFromArray((40.0 * (x + 1.5) - 900.0).astype(np.float32))  # shifted 1.5 mm
    deformed.CopyInformation(reference)
    np.testing.assert_allclose(sitk.GetArrayFromImage(intensity_difference(fixed, deformed)), 60.0, atol=1e-3)
    with pytest.raises(InputError, match="moving image"):
        intensity_difference(fixed, sitk.Image([30, 12], sitk.sitkFloat32))


# ---- summary -------------------------------------------------------------------------------
def test_summary_shares_statistics_folding_and_landmarks():
    reference = grid(size=(10, 4, 5), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    labels = np.zeros((5, 4, 10), np.uint8)
    labels[:, :, :5], labels[:, :, 5:8], labels[:, :, 8:] = 1, 2, 3
    learned = sitk.GetImageFromArray(labels)
    learned.CopyInformation(reference)
    det = np.ones((5, 4, 10), np.float32)
    det[0, 0, :2] = -0.5  # 2 folding voxels
    det[1, 0, 0] = 3.0  # and one more outside 0.5-2
    jacobian = sitk.GetImageFromArray(det)
    jacobian.CopyInformation(reference)
    ramp = sitk.GetImageFromArray(np.broadcast_to(np.arange(10, dtype=np.float32), (5, 4, 10)).copy())
    ramp.CopyInformation(reference)
    region = sitk.GetImageFromArray(np.ones((5, 4, 10), np.uint8))
    region.CopyInformation(reference)

    fixed = Landmarks(np.array([[1.0, 1.0, 1.0], [6.0, 1.0, 1.0], [9.0, 2.0, 2.0], [4.0, 3.0, 4.0]]), list("abcd"))
    moving = Landmarks(fixed.points_lps + np.array([[1.0, 0, 0], [0, 4.0, 0], [0, 0, 7.0], [0, 0, 5.0]]), list("abcd"))
    summary = summarize({"learned": learned, "jacobian": jacobian, "intensity": ramp}, region, "mask",
                        pairs=pair_landmarks(fixed, moving))

    rows = {m.key: m for m in summary.maps}
    assert summary.region_voxels == 200 and list(rows) == ["learned", "jacobian", "intensity"]
    np.testing.assert_allclose(rows["learned"].class_shares, (0.5, 0.3, 0.2))
    assert (rows["jacobian"].jacobian.folding, rows["jacobian"].jacobian.outside_range) == (2, 3)
    assert rows["jacobian"].jacobian.folding_share == pytest.approx(0.01)
    assert rows["intensity"].mean == pytest.approx(4.5) and rows["intensity"].maximum == 9.0
    assert rows["intensity"].p95 == pytest.approx(np.percentile(sitk.GetArrayFromImage(ramp), 95))
    marks = summary.landmarks
    np.testing.assert_allclose(marks.tre_mm, [1.0, 4.0, 7.0, 5.0])
    assert marks.true_class.tolist() == [0, 1, 2, 1]
    assert marks.values["learned"].tolist() == [0, 1, 2, 0]  # the map's class at each fixed landmark
    np.testing.assert_allclose(marks.values["intensity"], [1.0, 6.0, 9.0, 4.0])  # the ramp, interpolated
    assert marks.reports["learned"].accuracy == pytest.approx(0.75)
    assert marks.correlations["intensity"] == pytest.approx(0.8)
    document = summary.to_dict()
    assert document["maps"]["jacobian"]["folding"] == 2 and document["landmarks"]["n"] == 4
    table = summary.format_table()
    assert "folding (det <= 0): 2 voxels (1.0 %)" in table and "learned misalignment" in table


def test_check_names_and_defaults():
    assert parse_checks("intensity,jacobian") == ("jacobian", "intensity")
    assert default_checks(False, False) == ("learned", "confidence", "intensity")
    assert default_checks(True, True) == ("learned", "confidence", "jacobian", "inverse-consistency", "intensity")
    with pytest.raises(InputError, match="choose a comma-separated subset"):
        parse_checks("jacobian,folding")
    assert set(MAPS) >= {"learned", "confidence", "entropy", "jacobian", "inverse_consistency", "intensity",
                         "residual", "reregistration"}
    assert MAPS["confidence"].colormap(5).shape == (5, 3)


def test_run_checks_refuses_a_check_without_its_input_before_any_work():
    image = sitk.Image([8, 8, 8], sitk.sitkFloat32) - 500.0
    with pytest.raises(InputError, match="Jacobian check needs the registration transform"):
        run_checks(image, image, ["jacobian"])
    with pytest.raises(InputError, match="both directions"):
        run_checks(image, image, ["inverse-consistency"], transform=sitk.TranslationTransform(3))


# ---- a real CT crop ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chest_crop() -> sitk.Image:
    if not CHEST.is_file():
        pytest.skip(f"{CHEST} not available")
    return sitk.Cast(sitk.ReadImage(str(CHEST))[8:40, 60:92, 66:98], sitk.sitkFloat32)  # right lung and chest wall


def test_classical_checks_on_a_real_ct_with_a_known_affine(chest_crop):
    # The registered image is the fixed one moved by 2 mm: the intensity difference shows edges only;
    # the transform is a known affine, its inverse exact.
    forward = affine(np.eye(3) + 0.5 * A, (1.0, -2.0, 0.5), chest_crop.TransformContinuousIndexToPhysicalPoint((16, 16, 16)))
    deformed = sitk.Resample(chest_crop, chest_crop, sitk.TranslationTransform(3, (2.0, 0.0, 0.0)), sitk.sitkLinear, -1000.0)
    results = run_checks(chest_crop, deformed, ["jacobian", "inverse-consistency", "intensity"], transform=forward,
                         inverse_transform=forward.GetInverse(), body_only=False)
    assert set(results.maps) == {"jacobian", "inverse_consistency", "intensity"}
    np.testing.assert_allclose(sitk.GetArrayFromImage(results.maps["jacobian"]), np.linalg.det(np.eye(3) + 0.5 * A),
                               rtol=1e-6)
    assert sitk.GetArrayFromImage(results.maps["inverse_consistency"]).max() < 1e-5
    rows = {m.key: m for m in results.summary.maps}
    assert rows["jacobian"].jacobian.folding == 0 and rows["intensity"].p95 > 50.0
    for image in results.maps.values():
        assert image.GetSize() == chest_crop.GetSize() and image.GetDirection() == chest_crop.GetDirection()


def test_a_displacement_field_short_of_the_checked_region_is_refused(chest_crop):
    """Beyond a field's grid ITK applies no displacement: the Jacobian there would be 1, no folding."""
    field = sitk.Image([32, 32, 16], sitk.sitkVectorFloat64, 3)
    field.CopyInformation(chest_crop[:, :, :16])  # the crop's lower half only
    with pytest.raises(InputError, match=r"--transform covers only 5\d\.\d% of the whole image"):
        run_checks(chest_crop, chest_crop, ["jacobian"], transform=field, body_only=False)
    whole = sitk.Image(chest_crop.GetSize(), sitk.sitkVectorFloat64, 3)
    whole.CopyInformation(chest_crop)
    assert "jacobian" in run_checks(chest_crop, chest_crop, ["jacobian"], transform=whole, body_only=False).maps
    # the inverse is read where the forward one maps the region: a moving grid 20 mm further in z
    shift = sitk.TranslationTransform(3, (0.0, 0.0, 20.0))
    on_moving = sitk.Image(whole)
    on_moving.SetOrigin(np.add(chest_crop.GetOrigin(), (0.0, 0.0, 20.0)).tolist())
    assert "inverse_consistency" in run_checks(chest_crop, chest_crop, ["inverse-consistency"], transform=shift,
                                               inverse_transform=on_moving, body_only=False).maps
    with pytest.raises(InputError, match=r"--inverse-transform covers only .*mapped by --transform"):
        run_checks(chest_crop, chest_crop, ["inverse-consistency"], transform=shift, inverse_transform=whole,
                   body_only=False)


# ---- re-registration -----------------------------------------------------------------------
def test_reregistration_finds_a_known_shift_of_a_real_ct(chest_crop):
    pytest.importorskip("itk")
    from RegistrationMisalignmentLib.checks.reregistration import reregistration_residual

    deformed = sitk.Resample(chest_crop, chest_crop, sitk.TranslationTransform(3, (4.0, 0.0, 0.0)), sitk.sitkLinear,
                             -1000.0)  # D(x) = F(x + 4 mm): the second registration has to move 4 mm back
    seen = []
    result = reregistration_residual(chest_crop, deformed, iterations=20, threads=2,
                                     progress=Reporter(lambda f, m: seen.append((f, m))))
    core = sitk.GetArrayFromImage(result.residual_mm)[6:-6, 6:-6, 6:-6]
    assert 3.0 < np.median(core) < 5.0  # 4 mm found: the "poor" class
    assert np.median(sitk.GetArrayFromImage(result.displacement)[6:-6, 6:-6, 6:-6, 0]) < -3.0
    classes = sitk.GetArrayFromImage(result.classes)[6:-6, 6:-6, 6:-6]
    assert np.mean(classes == 2) > 0.5
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("resolution 3/3" in m for _, m in seen)


def test_reregistration_cancel_ends_elastix_and_missing_elastix_says_how_to_install(chest_crop, monkeypatch):
    from RegistrationMisalignmentLib.checks import reregistration

    started = []
    popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(reregistration.subprocess, "Popen", recording_popen)
    with pytest.raises(PredictionCancelled):  # cancelled as soon as elastix runs
        reregistration.reregistration_residual(chest_crop, chest_crop, progress=Reporter(cancel=lambda: bool(started)))
    assert len(started) == 1 and started[0].poll() is not None  # the elastix process is gone

    monkeypatch.setattr(reregistration, "elastix_installed", lambda: False)
    with pytest.raises(InputError, match="pip install itk-elastix"):
        reregistration.reregistration_residual(chest_crop, chest_crop)
    with pytest.raises(InputError, match="pip install itk-elastix"):
        run_checks(chest_crop, chest_crop, ["reregistration"])
