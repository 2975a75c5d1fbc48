"""Reading, checking, aligning and writing images: every user mistake is an InputError that says what is wrong."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.io import (
    physical_bounds,
    prepare_mask,
    prepare_pair,
    read_image,
    same_geometry,
    validate_image,
    write_image,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _ct(size=(24, 24, 24), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), seed: int = 0) -> sitk.Image:
    """A small random 'CT' in HU, int16 like real scans."""
    values = np.random.default_rng(seed).integers(-1000, 1000, size=size[::-1]).astype(np.int16)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _ramp(size, spacing, origin) -> sitk.Image:
    """Float image whose value is x + 2y - z of the voxel centre (mm): linear, so interpolation is exact."""
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    z, y, x = np.indices(size[::-1], dtype=np.float64)
    x, y, z = (origin[0] + x * spacing[0], origin[1] + y * spacing[1], origin[2] + z * spacing[2])
    ramp = sitk.GetImageFromArray((x + 2 * y - z).astype(np.float32))
    ramp.CopyInformation(image)
    return ramp


# --- read_image ---------------------------------------------------------------------------------


def test_read_missing_path_names_it(tmp_path):
    with pytest.raises(InputError, match="fixed image.*not found"):
        read_image(tmp_path / "nope.nii.gz", "fixed image")


def test_read_unreadable_file(tmp_path):
    bad = tmp_path / "notes.nii.gz"
    bad.write_text("not an image", encoding="utf-8")
    with pytest.raises(InputError, match="could not be read"):
        read_image(bad)


def test_read_folder_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(tmp_path, "moving image")


@pytest.mark.skipif(not (DATA / "ct_dicom_series").is_dir(), reason="shared DICOM series not available")
def test_read_dicom_series_folder():
    image = read_image(DATA / "ct_dicom_series")
    assert image.GetSize() == (512, 512, 20)
    assert np.allclose(image.GetSpacing(), (0.977, 0.977, 2.0), atol=0.01)
    validate_image(image, "DICOM series")


# --- validate_image -----------------------------------------------------------------------------


def test_valid_image_passes():
    validate_image(_ct(), "fixed image")


@pytest.mark.parametrize("size, found", [((32, 32), "2-D.*3-D"),
                                         ((20, 20, 20, 3), r"4-D with 3 volumes .*3-D .*image\[:, :, :, k\] for k in 0..2")])
def test_not_3d(size, found):
    with pytest.raises(InputError, match=f"fixed image is {found}"):
        validate_image(sitk.Image(list(size), sitk.sitkInt16), "fixed image")


def test_vector_image():
    image = sitk.Image([24, 24, 24], sitk.sitkVectorFloat32, 3)
    with pytest.raises(InputError, match="3-component"):
        validate_image(image, "moving image")


def test_empty_image():
    with pytest.raises(InputError, match="empty"):
        validate_image(sitk.Image([0, 0, 0], sitk.sitkFloat32), "fixed image")


def test_constant_image():
    image = sitk.Image([24, 24, 24], sitk.sitkInt16) - 1000
    with pytest.raises(InputError, match="constant.*-1000"):
        validate_image(image, "fixed image")


@pytest.mark.parametrize("bad, word", [(np.nan, "3 NaN"), (np.inf, "3 Inf")])
def test_nan_and_inf_are_counted(bad, word):
    values = sitk.GetArrayFromImage(_ct()).astype(np.float32)
    values[1, 2, 3:6] = bad
    with pytest.raises(InputError, match=word):
        validate_image(sitk.GetImageFromArray(values), "moving image")


@pytest.mark.parametrize("spacing, shown", [((1.0, 1.0, 0.001), "0.001"), ((1.0, 25.0, 1.0), "25")])
def test_absurd_spacing(spacing, shown):
    with pytest.raises(InputError, match=f"spacing {shown} mm"):
        validate_image(_ct(spacing=spacing), "fixed image")


def test_too_small_for_a_patch():
    with pytest.raises(InputError, match="too small for one patch"):
        validate_image(_ct(size=(24, 24, 5), spacing=(1.0, 1.0, 2.0)), "fixed image")


# --- geometry -----------------------------------------------------------------------------------


def test_same_geometry():
    a = _ct(origin=(-100.0, 20.0, 5.0))
    b = _ct(origin=(-100.000001, 20.0, 5.0), seed=1)
    assert same_geometry(a, b)
    assert not same_geometry(a, _ct(spacing=(1.0, 1.0, 1.5)))
    assert not same_geometry(a, _ct(size=(24, 24, 25), origin=a.GetOrigin()))
    flipped = sitk.Image(b)
    flipped.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert not same_geometry(a, flipped)


def test_physical_bounds_cover_voxel_corners():
    image = _ct(size=(4, 5, 6), spacing=(2.0, 1.0, 1.0), origin=(10.0, 0.0, -3.0))
    low, high = physical_bounds(image)
    np.testing.assert_allclose(low, (9.0, -0.5, -3.5))
    np.testing.assert_allclose(high, (17.0, 4.5, 2.5))
    image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    low, high = physical_bounds(image)
    np.testing.assert_allclose((low[0], high[0]), (3.0, 11.0))


# --- prepare_pair -------------------------------------------------------------------------------


def test_pair_on_identical_grids_is_untouched():
    fixed, moving = _ct(), _ct(seed=1)
    messages: list[str] = []
    fixed_f, moving_f = prepare_pair(fixed, moving, log=messages.append)
    assert messages == []
    assert fixed_f.GetPixelID() == moving_f.GetPixelID() == sitk.sitkFloat32
    assert same_geometry(moving_f, fixed)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(moving_f), sitk.GetArrayViewFromImage(moving))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(fixed_f), sitk.GetArrayViewFromImage(fixed))


def test_pair_resamples_moving_onto_fixed_grid():
    fixed = _ct(size=(20, 20, 20), spacing=(1.5, 1.5, 1.5), origin=(0.0, 0.0, 0.0))
    moving = _ramp(size=(16, 16, 16), spacing=(2.0, 2.0, 2.0), origin=(3.0, 1.0, 0.5))
    messages: list[str] = []
    # the ramp is no CT: an HU offset of -1000 for the moving image only makes it air-like
    fixed_f, moving_f = prepare_pair(fixed, moving, log=messages.append, hu_offset=(0.0, -1000.0))
    assert len(messages) == 2 and "-1000 to the moving image" in messages[0]
    assert "moving image resampled onto the fixed image grid" in messages[1] and "spacing" in messages[1]
    assert same_geometry(moving_f, fixed) and moving_f.GetPixelID() == sitk.sitkFloat32
    # Fixed voxel (5, 6, 7) sits at (7.5, 9, 10.5) mm, between moving voxel centres.
    assert moving_f[5, 6, 7] == pytest.approx(7.5 + 2 * 9.0 - 10.5 - 1000.0, abs=1e-3)
    # Fixed voxel (0, 0, 0) lies outside the moving image: air.
    assert moving_f[0, 0, 0] == -1000.0


def test_pair_without_overlap_gives_both_boxes():
    fixed = _ct()
    moving = _ct(origin=(500.0, 0.0, 0.0))
    with pytest.raises(InputError, match="do not overlap") as info:
        prepare_pair(fixed, moving)
    assert "fixed image box" in str(info.value) and "moving image box" in str(info.value)
    assert "(499.5, -0.5, -0.5)" in str(info.value)


def test_pair_with_small_overlap():
    with pytest.raises(InputError, match=r"overlap in only 4\.2%"):
        prepare_pair(_ct(), _ct(origin=(23.0, 0.0, 0.0)))


def test_pair_names_the_bad_input():
    with pytest.raises(InputError, match="moving image is 2-D"):
        prepare_pair(_ct(), sitk.Image([32, 32], sitk.sitkInt16))
    with pytest.raises(InputError, match="fixed image has voxel spacing"):
        prepare_pair(_ct(spacing=(0.01, 1.0, 1.0)), _ct())


# --- prepare_mask -------------------------------------------------------------------------------


def test_mask_is_nearest_resampled_to_binary():
    fixed = _ct(size=(24, 24, 24))
    labels = np.zeros((12, 12, 12), dtype=np.float32)
    labels[2:6, 3:8, 4:9] = 7.0
    labels[8, 8, 8] = 0.3  # any non-zero label counts as inside
    mask = sitk.GetImageFromArray(labels)
    mask.SetSpacing((2.0, 2.0, 2.0))
    mask.SetOrigin((0.3, 0.3, 0.3))  # no fixed voxel centre falls halfway between mask voxels
    messages: list[str] = []
    result = prepare_mask(mask, fixed, name="lung mask", log=messages.append)
    assert result.GetPixelID() == sitk.sitkUInt8 and same_geometry(result, fixed)
    assert len(messages) == 1 and "lung mask resampled" in messages[0]
    # Nearest neighbour: each fixed voxel centre takes the label of the closest mask voxel centre.
    centre = np.arange(24, dtype=np.float64)  # fixed voxel centres (mm), all inside the mask box
    nearest = np.clip(np.rint((centre - 0.3) / 2.0).astype(int), 0, 11)
    expected = (labels[np.ix_(nearest, nearest, nearest)] != 0).astype(np.uint8)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result), expected)


def test_mask_on_fixed_grid_is_only_binarised():
    fixed = _ct()
    labels = np.zeros((24, 24, 24), dtype=np.int32)
    labels[4:10, 4:10, 4:10] = 3
    mask = sitk.GetImageFromArray(labels)
    messages: list[str] = []
    result = prepare_mask(mask, fixed, log=messages.append)
    assert messages == []
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result), labels != 0)


def test_mask_errors():
    fixed = _ct()
    with pytest.raises(InputError, match="lung mask is 2-D.*3-D"):
        prepare_mask(sitk.Image([24, 24], sitk.sitkUInt8) + 1, fixed, name="lung mask")
    far_away = sitk.Image([8, 8, 8], sitk.sitkUInt8) + 1
    far_away.SetOrigin((300.0, 0.0, 0.0))
    with pytest.raises(InputError, match="no voxel inside after resampling"):
        prepare_mask(far_away, fixed)
    with pytest.raises(InputError, match="mask has no voxel inside"):
        prepare_mask(sitk.Image([24, 24, 24], sitk.sitkUInt8), fixed)


def test_a_ct_given_as_the_mask_is_refused_and_probabilities_are_not():
    fixed = _ct()
    with pytest.raises(InputError, match="lung mask holds values from -1000 .*not a label image"):
        prepare_mask(fixed, fixed, name="lung mask")  # a CT in HU
    raw = sitk.GetImageFromArray(np.arange(24**3, dtype=np.uint16).reshape(24, 24, 24) % 4000)
    with pytest.raises(InputError, match="4000 distinct"):  # stored values without the HU rescale: no negatives
        prepare_mask(raw, fixed)
    probabilities = np.random.default_rng(0).uniform(1e-4, 0.49, (24, 24, 24)).astype(np.float32)  # no exact 0
    probabilities[4:16, 4:16, 4:16] = np.random.default_rng(1).uniform(0.5, 1.0, (12, 12, 12))  # 13,824 distinct
    probabilities[0, 0, :2] = (-0.0015, 1.02)  # smoothing's overshoot
    notes = []
    inside = prepare_mask(sitk.GetImageFromArray(probabilities), fixed, name="lung mask", log=notes.append)
    assert sitk.GetArrayViewFromImage(inside).sum() == 12**3 + 1  # at least 0.5, not every non-zero voxel
    assert notes == ["lung mask holds probabilities (values from -0.0015 to 1.02): inside where at least 0.5"]


def test_probabilities_scaled_to_unsigned_integers_count_from_one_half():
    """MONAI's SaveImage(scale=255 | 65535) stores a soft segmentation as uint8 / uint16: read as labels, every
    voxel of its faint halo would count as inside."""
    fixed = _ct()
    z, y, x = np.indices((24, 24, 24), dtype=np.float64)
    radius = np.sqrt(((z - 11.3) / 1.1) ** 2 + ((y - 11.7) / 0.9) ** 2 + (x - 11.1) ** 2)
    soft = 1 / (1 + np.exp((radius - 7) * 5))  # an ellipsoid, its border 2 voxels wide
    for dtype, scale in ((np.uint8, 255), (np.uint16, 65535)):
        stored = np.rint(soft * scale).astype(dtype)
        notes: list[str] = []
        inside = sitk.GetArrayFromImage(prepare_mask(sitk.GetImageFromArray(stored), fixed, log=notes.append))
        np.testing.assert_array_equal(inside, stored >= scale / 2)
        assert np.count_nonzero(stored) > inside.sum() + 100  # the halo is not inside
        assert notes == [f"mask holds probabilities scaled to 0..{scale} (values from 0 to {scale}): inside where "
                         f"at least 0.5 (a stored value of at least {scale / 2:g})"]


def test_labels_with_an_ignore_label_and_cts_stored_unsigned_are_no_scaled_probabilities():
    fixed = _ct()
    rng = np.random.default_rng(4)
    labels = np.zeros((24, 24, 24), dtype=np.uint8)
    labels[:2] = 255  # an "ignore" label on 8 % of the voxels
    for label in range(1, 71):  # 70 small structures
        z, y, x = rng.integers(4, 22, 3)
        labels[z, y, x : x + 2] = label
    inside = sitk.GetArrayFromImage(prepare_mask(sitk.GetImageFromArray(labels), fixed))
    np.testing.assert_array_equal(inside, labels != 0)  # every label, not only the ignore label's voxels
    hu = sitk.GetArrayFromImage(_ct())
    raw = np.clip(hu + 1024, 0, 4095).astype(np.uint16)  # stored values without the HU rescale
    raw[:, :, :1] = 0
    raw[:1, :1] = 65535  # a saturated corner
    wrapped = np.rint(hu).astype(np.int16).astype(np.uint16)  # negative HU wrapped to 64536..65535
    wrapped[0, 0, :2] = (0, 65535)
    for image in (raw, wrapped):
        with pytest.raises(InputError, match="not a label image"):
            prepare_mask(sitk.GetImageFromArray(image), fixed)


# --- write_image --------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_write_read_round_trip(tmp_path, suffix):
    image = _ct(size=(20, 18, 16), spacing=(0.8, 0.8, 2.5), origin=(-120.5, 33.0, 7.25))
    image.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    target = tmp_path / "sub" / "dir" / f"out{suffix}"
    assert write_image(image, target) == target
    back = read_image(target)
    assert same_geometry(back, image)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize(
    "file_name, message", [("out.xyz", "unknown extension"), ("out.jpg", "could not be written")]
)
def test_failed_write_leaves_nothing(tmp_path, file_name, message):
    with pytest.raises(InputError, match=f"label map.*{message}"):
        write_image(_ct(), tmp_path / file_name, "label map")
    assert list(tmp_path.iterdir()) == []


def test_write_into_unusable_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match="cannot create or write the folder"):
        write_image(_ct(), blocker / "out.nii.gz")
    with pytest.raises(InputError, match="is a folder"):
        write_image(_ct(), tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_write_without_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(InputError, match="cannot create or write the folder"):
            write_image(_ct(), locked / "out.nii.gz")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)
