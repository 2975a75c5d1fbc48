"""Inputs from the field that used to give a silently wrong answer (issue 16), and eight that already did not.

Every input is built here from the shared chest CT: an 80^3 crop (1.5 mm), a "moving" grid or image made
from it, and a known smooth displacement field of up to 14 mm whose inverse is computed independently
(fixed-point iteration on the analytic field). The right numbers come from numpy, never from the code
under test.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from RegistrationMisalignmentLib.cli import build_parser, main
from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
from RegistrationMisalignmentLib.errors import InputError, PredictionCancelled
from RegistrationMisalignmentLib.evaluation import coordinate_warning, none_inside_message, read_rows_csv
from RegistrationMisalignmentLib.inference import predict
from RegistrationMisalignmentLib.io import fill_region, prepare_mask, prepare_pair, read_image
from RegistrationMisalignmentLib.outputs import Output, check_outputs
from RegistrationMisalignmentLib.preprocess import isotropic_reference
from RegistrationMisalignmentLib.landmarks import (
    Landmarks,
    invert_displacement_field,
    pair_landmarks,
    read_landmarks,
    read_transform,
    write_landmarks,
)
from RegistrationMisalignmentLib.weights import load_model
from conftest import SHARED_DATA

CHEST = SHARED_DATA / "chest_ct_1.5mm.nii.gz"
pytestmark = pytest.mark.skipif(not CHEST.is_file(), reason="shared chest CT not available")

AMPLITUDE_MM, SIGMA_MM = 14.0, 25.0
DIRECTION = np.array([0.6, -0.48, 0.64])  # unit vector
UID_ROOT = "1.2.826.0.1.3680043.2.1125.16"


# ---- inputs built from the shared chest CT ------------------------------------------------
@functools.lru_cache(maxsize=None)
def _chest() -> sitk.Image:
    return sitk.ReadImage(str(CHEST))


def chest_crop(z0: int = 40, depth: int = 80) -> sitk.Image:
    """80 x 80 x ``depth`` voxels (1.5 mm) of the chest CT: lungs, heart, spine; int16 HU."""
    return _chest()[20:100, 23:103, z0:z0 + depth]


def centre(image: sitk.Image) -> np.ndarray:
    return np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))


def u_exact(points: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The known fixed -> moving displacement (LPS mm): a Gaussian bump of up to 14 mm around ``c``."""
    d2 = np.sum((points - c) ** 2, axis=-1)
    return AMPLITUDE_MM * np.exp(-d2 / (2 * SIGMA_MM**2))[..., None] * DIRECTION


def field_grid(image: sitk.Image, spacing: float = 3.0, margin: float = 9.0) -> tuple[np.ndarray, sitk.Image]:
    """Points (z, y, x, 3) of a field grid covering ``image`` with a margin, and that grid as an image."""
    lo = np.array(image.GetOrigin()) - margin
    n = int(np.ceil((np.array(image.GetSize()).max() * image.GetSpacing()[0] + 2 * margin) / spacing)) + 1
    z, y, x = np.indices((n, n, n))
    points = np.stack([x, y, z], axis=-1) * spacing + lo
    grid = sitk.Image([n, n, n], sitk.sitkUInt8)
    grid.SetOrigin(tuple(lo))
    grid.SetSpacing((spacing,) * 3)
    return points, grid


def vector_image(values: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(values.astype(np.float64), isVector=True)
    image.CopyInformation(grid)
    return image


def modeling_field(image: sitk.Image) -> tuple[sitk.Image, np.ndarray]:
    """The moving -> fixed field v with y + v(y) = x where y = x + u(x), and u on the same grid.

    v is computed independently of ITK: v(y) = -u(y + v(y)), iterated on the analytic u (a contraction,
    since |grad u| <= 14 / 25 * exp(-1/2) < 1).
    """
    points, grid = field_grid(image)
    c = centre(image)
    v = np.zeros_like(points)
    for _ in range(80):
        v = -u_exact(points + v, c)
    assert np.abs(points + v + u_exact(points + v, c) - points).max() < 1e-9
    return vector_image(v, grid), u_exact(points, c)


def landmark_case(image: sitk.Image, n: int = 30, seed: int = 16):
    """Fixed points inside the crop's core, residual vectors of known length in all three classes."""
    rng = np.random.default_rng(seed)
    size = np.array(image.GetSize()) - 1
    index = rng.uniform(0.2, 0.8, (n, 3)) * size
    fixed = np.array([image.TransformContinuousIndexToPhysicalPoint(i) for i in index])
    lengths = np.concatenate([rng.uniform(0.5, 2.5, n // 3), rng.uniform(3.5, 5.5, n // 3),
                              rng.uniform(6.5, 9.0, n - 2 * (n // 3))])
    directions = rng.normal(size=(n, 3))
    residual = directions / np.linalg.norm(directions, axis=1, keepdims=True) * lengths[:, None]
    labels = [f"P{i + 1:02d}" for i in range(n)]
    return fixed, residual, labels


def labelmap_of(image: sitk.Image) -> sitk.Image:
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + DEFAULT_CONFIG.label_correct
    ones.CopyInformation(image)
    return ones


def evaluate_cli(tmp_path: Path, image: sitk.Image, fixed: Landmarks, moving: Landmarks, *extra: str,
                 names=("f.csv", "m.csv")) -> tuple[int, list]:
    """``regmis evaluate`` with a given labelmap; returns the exit code and the rows it wrote."""
    sitk.WriteImage(labelmap_of(image), str(tmp_path / "map.nii.gz"))
    write_landmarks(fixed, tmp_path / names[0])
    write_landmarks(moving, tmp_path / names[1])
    out = tmp_path / "rows.csv"
    code = main(["evaluate", "--labelmap", str(tmp_path / "map.nii.gz"), "--fixed-landmarks",
                 str(tmp_path / names[0]), "--moving-landmarks", str(tmp_path / names[1]),
                 "--out-csv", str(out), *extra])
    return code, (read_rows_csv(out) if code == 0 else [])


def write_dicom_series(image: sitk.Image, folder: Path, uid: str, description: str, tilt_deg: float = 0.0,
                       skip: tuple[int, ...] = ()) -> None:
    """One file per slice, positions from the image's geometry; a tilt shifts slice k by k dz tan(tilt) in y."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    shift = image.GetSpacing()[2] * np.tan(np.radians(tilt_deg))
    for k in range(image.GetDepth()):
        if k in skip:
            continue
        position = np.array(image.TransformIndexToPhysicalPoint((0, 0, k))) + [0.0, k * shift, 0.0]
        s = image[:, :, k]
        for tag, value in (("0008|0060", "CT"), ("0020|000d", f"{UID_ROOT}.1"), ("0020|000e", uid),
                           ("0008|103e", description), ("0020|0032", "\\".join(f"{v:.6f}" for v in position)),
                           ("0020|0037", orientation), ("0020|0013", str(k + 1)), ("0008|0018", f"{uid}.{k + 1}"),
                           ("0018|1120", f"{tilt_deg:g}")):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{description}_{k:03d}.dcm"))
        writer.Execute(s)


def message_lines(text: str) -> int:
    """Lines of the error message (stderr from ``regmis: error:`` on, past any progress bar)."""
    text = text[text.find("regmis: error:"):] if "regmis: error:" in text else text
    return len([line for line in text.splitlines() if line.strip()])


# ---- 1. displacement field stored "modeling" (moving -> fixed) ----------------------------
def test_modeling_displacement_field_nrrd_is_inverted(tmp_path, capsys):
    image = chest_crop()
    v, u_grid = modeling_field(image)
    # ITK's inverse of the stored field is the known fixed -> moving field, away from the field's edge too
    inverse = sitk.GetArrayFromImage(invert_displacement_field(v))
    assert np.linalg.norm(inverse - u_grid, axis=-1)[2:-2, 2:-2, 2:-2].max() < 0.2

    v.SetMetaData("displacement field type", "modeling")  # Slicer's NRRD field for a "to parent" transform
    sitk.WriteImage(v, str(tmp_path / "field.nrrd"))
    assert b"displacement field type:=modeling" in (tmp_path / "field.nrrd").read_bytes()[:1000]
    points, residual, labels = landmark_case(image)
    moving_points = points + u_exact(points, centre(image)) + residual
    expected = np.linalg.norm(residual, axis=1)

    code, rows = evaluate_cli(tmp_path, image, Landmarks(points, labels), Landmarks(moving_points, labels),
                              "--transform", str(tmp_path / "field.nrrd"))

    assert code == 0
    assert "inverted" in capsys.readouterr().err
    np.testing.assert_allclose([r.tre_mm for r in rows], expected, atol=0.25)
    assert np.mean([r.tre_mm for r in rows]) == pytest.approx(expected.mean(), abs=0.05)
    assert [r.true_class for r in rows] == DEFAULT_CONFIG.classify_mm(expected).tolist()
    # the trap: the same field applied as if it mapped fixed -> moving gives other numbers and classes
    naive = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(tmp_path / "field.nrrd")),
                                                      sitk.sitkVectorFloat64))
    naive_tre = np.linalg.norm([np.array(naive.TransformPoint(tuple(p))) - m for p, m in zip(points, moving_points)],
                               axis=1)
    assert abs(naive_tre.mean() - expected.mean()) > 1.0


def test_slicer_h5_modeling_transform_is_inverted(tmp_path):
    """Slicer saves a grid transform kept "to parent" as InverseDisplacementFieldTransform_double_3_3 (.h5)."""
    slicer = pytest.importorskip("slicer")
    image = chest_crop()
    v, _ = modeling_field(image)
    v.SetMetaData("displacement field type", "modeling")
    sitk.WriteImage(v, str(tmp_path / "field.nrrd"))
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(tmp_path / "field.nrrd"))
    assert storage.ReadData(node)
    storage.SetFileName(str(tmp_path / "registration.h5"))
    assert storage.WriteData(node)
    assert b"InverseDisplacementFieldTransform_double_3_3" in (tmp_path / "registration.h5").read_bytes()
    points, residual, labels = landmark_case(image)
    moving_points = points + u_exact(points, centre(image)) + residual

    code, rows = evaluate_cli(tmp_path, image, Landmarks(points, labels), Landmarks(moving_points, labels),
                              "--transform", str(tmp_path / "registration.h5"))

    assert code == 0
    np.testing.assert_allclose([r.tre_mm for r in rows], np.linalg.norm(residual, axis=1), atol=0.25)


def test_slicer_inverse_transforms_in_text_files_are_inverted_or_refused_in_a_few_lines(tmp_path, capsys):
    # a B-spline kept "to parent": Slicer writes ITK's text format with the Inverse class name
    bspline = sitk.BSplineTransformInitializer(chest_crop(), [4, 4, 4])
    params = np.array(bspline.GetParameters())
    params[:] = np.random.default_rng(0).normal(0, 2.0, params.size)
    bspline.SetParameters(params.tolist())
    sitk.WriteTransform(bspline, str(tmp_path / "plain.tfm"))
    text = (tmp_path / "plain.tfm").read_text(encoding="utf-8")
    (tmp_path / "to_parent.tfm").write_text(text.replace("BSplineTransform_double_3_3",
                                                         "InverseBSplineTransform_double_3_3"), encoding="utf-8")
    inverse = read_transform(tmp_path / "to_parent.tfm")
    image = chest_crop()
    points = landmark_case(image)[0]
    round_trip = np.array([bspline.TransformPoint(inverse.TransformPoint(tuple(p))) for p in points])
    np.testing.assert_allclose(round_trip, points, atol=0.1)

    # what cannot be inverted here stops with a short message naming the file, what it is and the fix
    (tmp_path / "tps.tfm").write_text("#Insight Transform File V1.0\n#Transform 0\n"
                                      "Transform: InverseThinPlateSplineKernelTransform_double_3_3\n"
                                      "Parameters: 0 0 0\nFixedParameters: 0 0 0\n", encoding="utf-8")
    (tmp_path / "odd.tfm").write_text(text.replace("BSplineTransform_double_3_3", "WarpDriveTransform_double_3_3"), encoding="utf-8")
    fixed = Landmarks(points, [str(i) for i in range(len(points))])
    for name, words in (("tps.tfm", ("modeling", "thin-plate-spline", "Invert")),
                        ("odd.tfm", ("not a readable ITK transform", "WarpDriveTransform"))):
        capsys.readouterr()
        code, _ = evaluate_cli(tmp_path, image, fixed, fixed, "--transform", str(tmp_path / name))
        err = capsys.readouterr().err
        assert code == 2 and name in err and all(w in err for w in words), err
        assert message_lines(err) <= 3 and "Currently registered" not in err


# ---- 2. DICOM folders: several series, tilted or uneven slices ----------------------------
def test_dicom_folder_with_two_series_lists_them_and_the_series_option_chooses(tmp_path, model_dir, capsys):
    inhale, exhale = chest_crop(40), chest_crop(46)
    write_dicom_series(inhale, tmp_path / "dicom", f"{UID_ROOT}.2", "inhale")
    write_dicom_series(exhale, tmp_path / "dicom", f"{UID_ROOT}.3", "exhale")

    with pytest.raises(InputError) as info:
        read_image(tmp_path / "dicom", "fixed image")
    for text in (f"{UID_ROOT}.2 'inhale' (80 x 80 x 80)", f"{UID_ROOT}.3 'exhale' (80 x 80 x 80)", "--fixed-series"):
        assert text in str(info.value)
    chosen = read_image(tmp_path / "dicom", "moving image", series=f"{UID_ROOT}.3")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(chosen), sitk.GetArrayFromImage(exhale))
    np.testing.assert_allclose(chosen.GetOrigin(), exhale.GetOrigin(), atol=1e-4)

    out = tmp_path / "map.nii.gz"
    args = ["predict", "--fixed", str(tmp_path / "dicom"), "--moving", str(tmp_path / "dicom"), "--out", str(out),
            "--model", str(model_dir / "test_singlescale.pt"), "--device", "cpu"]
    assert main(args) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert f"{UID_ROOT}.2" in err and f"{UID_ROOT}.3" in err and message_lines(err) <= 3
    assert main([*args, "--fixed-series", f"{UID_ROOT}.2", "--moving-series", f"{UID_ROOT}.9"]) == 2
    assert f"holds no DICOM series '{UID_ROOT}.9'" in capsys.readouterr().err

    # one series beside a scout keeps working as before, and the scout is named, not silently dropped
    write_dicom_series(chest_crop(60, 1), tmp_path / "one", f"{UID_ROOT}.5", "scout")
    write_dicom_series(inhale, tmp_path / "one", f"{UID_ROOT}.4", "inhale")
    notes: list[str] = []
    one = read_image(tmp_path / "one", "fixed image", log=notes.append)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(one), sitk.GetArrayFromImage(inhale))
    assert len(notes) == 1 and "scout" in notes[0]


def test_gantry_tilted_dicom_is_refused_naming_the_tilt(tmp_path):
    image = chest_crop(40, 30)
    write_dicom_series(image, tmp_path / "tilt", f"{UID_ROOT}.6", "tilted", tilt_deg=20.0)
    # what a plain series read makes of it, against where the headers put the slices
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "tilt"))
    plain = sitk.ReadImage(files)
    header = []
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.ReadImageInformation()
        header.append([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
    grid = [plain.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(plain.GetDepth())]
    worst = np.linalg.norm(np.array(header) - np.array(grid), axis=1).max()
    assert worst > 10.0  # the trap: a plain read puts voxels far from their place

    with pytest.raises(InputError) as info:
        read_image(tmp_path / "tilt", "fixed image")
    message = str(info.value)
    assert "tilted by 20.0 deg" in message and f"up to {worst:.1f} mm" in message
    assert "Resample the series" in message and message_lines(message) == 1

    # a missing slice is refused too; the same series written straight reads back exactly
    write_dicom_series(image, tmp_path / "gap", f"{UID_ROOT}.7", "gap", skip=(12,))
    with pytest.raises(InputError, match="slice spacing varies from 1.5 to 3 mm"):
        read_image(tmp_path / "gap", "moving image")
    write_dicom_series(image, tmp_path / "straight", f"{UID_ROOT}.8", "straight")
    straight = read_image(tmp_path / "straight")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(straight), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(straight.GetSpacing(), image.GetSpacing(), atol=1e-5)


# ---- 3. CT values that are not HU --------------------------------------------------------
def test_ct_without_rescale_intercept_is_refused_and_hu_offset_fixes_it(tmp_path, model_dir, capsys):
    hu = chest_crop()
    stored = sitk.GetImageFromArray(np.clip(sitk.GetArrayFromImage(hu).astype(np.int32) + 1024, 0, None)
                                    .astype(np.uint16))  # air at ~0, no rescale intercept
    stored.CopyInformation(hu)
    expected_hu = np.maximum(sitk.GetArrayFromImage(hu), -1024).astype(np.float32)

    with pytest.raises(InputError, match=r"moving image does not look like a CT in Hounsfield units") as info:
        prepare_pair(hu, stored)
    assert "rescale intercept" in str(info.value) and "--hu-offset=0,-1024" in str(info.value)
    fixed_f, moving_f = prepare_pair(stored, stored, hu_offset=-1024)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(moving_f), expected_hu)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fixed_f), expected_hu)
    fixed_f, moving_f = prepare_pair(hu, hu)  # a CT in HU is unaffected
    np.testing.assert_array_equal(sitk.GetArrayFromImage(moving_f), sitk.GetArrayFromImage(hu))

    sitk.WriteImage(stored, str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(stored, str(tmp_path / "moving.nii.gz"))
    out = tmp_path / "map.nii.gz"
    args = ["predict", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz"),
            "--out", str(out), "--model", str(model_dir / "test_singlescale.pt"), "--device", "cpu"]
    assert main(args) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "--hu-offset -1024" in err and "16-bit unsigned" in err and message_lines(err) <= 3
    parser = build_parser()
    assert parser.parse_args([*args, "--hu-offset", "-1024"]).hu_offset == -1024.0
    assert parser.parse_args([*args, "--hu-offset=0,-1024"]).hu_offset == (0.0, -1024.0)

    # predict takes the offset: the check passes and the work starts (then is cancelled)
    model = load_model(model_dir / "test_singlescale.pt")
    calls = []
    with pytest.raises(PredictionCancelled):
        predict(stored, stored, model, device="cpu", hu_offset=-1024, cancel=lambda: calls.append(1) or len(calls) > 1)
    with pytest.raises(InputError, match="fixed image does not look like"):
        predict(stored, hu, model, device="cpu")


def test_exports_that_no_offset_mends_are_named_and_a_crop_without_air_is_hu():
    """An 8-bit display export and an unsigned export that clamped negative HU to 0 used to get the HU + 1024
    advice, which then ran to a map of nothing but "correct" or "wrong"; a crop inside the body (fat, no air) was
    refused with it."""
    hu = chest_crop()
    values = sitk.GetArrayFromImage(hu).astype(np.float64)
    for stored, cause in ((np.clip((values + 1000) / 1400 * 255, 0, 255).astype(np.uint8), "fit in 8 bits"),
                          (np.clip(values, 0, None).astype(np.uint16), "clamped to 0")):
        image = sitk.GetImageFromArray(stored)
        image.CopyInformation(hu)
        with pytest.raises(InputError, match=cause) as info:
            prepare_pair(hu, image)
        assert "--hu-offset" not in str(info.value) and "Give both images in Hounsfield units" in str(info.value)
    abdomen = read_image(SHARED_DATA / "abdomen_ct_3mm.nii.gz")[40:60, 5:25, 0:14]  # liver and fat, no air
    assert sitk.GetArrayViewFromImage(abdomen).min() > -500
    fixed_f, _ = prepare_pair(abdomen, abdomen)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fixed_f), sitk.GetArrayFromImage(abdomen))


def test_normalised_image_is_refused_without_an_offset_to_suggest():
    hu = chest_crop()
    normalised = sitk.Cast(hu, sitk.sitkFloat32) / 3000.0
    with pytest.raises(InputError, match="normalised or windowed image, not HU.*Give both images in Hounsfield"):
        prepare_pair(hu, normalised)


# ---- 4. landmark indices and their grids ------------------------------------------------
def test_dirlab_indices_of_a_moving_image_on_its_own_grid_need_moving_reference(tmp_path, capsys):
    fixed_image = chest_crop()
    moving_source = _chest()[10:110, 30:110, 35:125]  # another crop, then another spacing
    moving_image = sitk.Resample(moving_source, [75, 60, 68], sitk.Transform(), sitk.sitkLinear,
                                 moving_source.GetOrigin(), (2.0, 2.0, 2.0), moving_source.GetDirection(), -1000.0)
    sitk.WriteImage(fixed_image, str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(moving_image, str(tmp_path / "moving.nii.gz"))
    sitk.WriteImage(labelmap_of(fixed_image), str(tmp_path / "map.nii.gz"))
    shift = np.array([4.0, -3.0, 5.0])
    sitk.WriteTransform(sitk.TranslationTransform(3, shift.tolist()), str(tmp_path / "registration.tfm"))
    rng = np.random.default_rng(6)
    fixed_ijk = rng.integers(10, 70, (30, 3))  # 0-based
    fixed_mm = np.array(fixed_image.GetOrigin()) + fixed_ijk * np.array(fixed_image.GetSpacing())
    moving_ijk = np.round((fixed_mm + shift + rng.normal(0, 3.0, (30, 3)) - moving_image.GetOrigin())
                          / moving_image.GetSpacing()).astype(int)
    moving_mm = np.array(moving_image.GetOrigin()) + moving_ijk * np.array(moving_image.GetSpacing())
    expected = np.linalg.norm(fixed_mm + shift - moving_mm, axis=1)
    for name, ijk in (("fixed.txt", fixed_ijk), ("moving.txt", moving_ijk)):
        (tmp_path / name).write_text("".join(f"{i + 1} {j + 1} {k + 1}\n" for i, j, k in ijk), encoding="utf-8")
    args = ["evaluate", "--labelmap", str(tmp_path / "map.nii.gz"), "--fixed-landmarks", str(tmp_path / "fixed.txt"),
            "--moving-landmarks", str(tmp_path / "moving.txt"), "--transform", str(tmp_path / "registration.tfm"),
            "--reference", str(tmp_path / "fixed.nii.gz"), "--out-csv", str(tmp_path / "rows.csv")]

    assert main(args) == 2 and not (tmp_path / "rows.csv").exists()
    err = capsys.readouterr().err
    assert "moving.txt" in err and "--moving-reference" in err and message_lines(err) <= 3

    assert main([*args, "--moving-reference", str(tmp_path / "moving.nii.gz")]) == 0
    rows = read_rows_csv(tmp_path / "rows.csv")
    np.testing.assert_allclose([r.tre_mm for r in rows], expected, atol=1e-4)
    assert np.mean([r.tre_mm for r in rows]) == pytest.approx(expected.mean(), abs=1e-4)


# ---- 5. landmark pairing ------------------------------------------------------------------
def test_landmarks_with_the_same_labels_in_another_order_pair_by_label(tmp_path, capsys):
    image = chest_crop()
    points, residual, labels = landmark_case(image)
    order = np.random.default_rng(3).permutation(len(labels))
    moving = Landmarks((points + residual)[order], [labels[i] for i in order])

    code, rows = evaluate_cli(tmp_path, image, Landmarks(points, labels), moving,
                              names=("f.fcsv", "m.mrk.json"))

    assert code == 0
    assert "30 landmark pairs matched by label" in capsys.readouterr().out
    assert [r.label for r in rows] == labels and [r.moving_label for r in rows] == labels
    expected = np.linalg.norm(residual, axis=1)
    np.testing.assert_allclose([r.tre_mm for r in rows], expected, atol=1e-6)
    assert "moving_label" in (tmp_path / "rows.csv").read_text(encoding="utf-8").splitlines()[0]


def test_landmarks_with_other_labels_pair_by_order_and_a_partial_overlap_is_refused(tmp_path, capsys):
    image = chest_crop()
    points, residual, _ = landmark_case(image, n=6)
    fixed = Landmarks(points, [f"F-{i + 1}" for i in range(6)])  # Slicer's default names
    moving = Landmarks(points + residual, [f"M-{i + 1}" for i in range(6)])
    code, rows = evaluate_cli(tmp_path, image, fixed, moving)
    assert code == 0 and "matched by order" in capsys.readouterr().out
    np.testing.assert_allclose([r.tre_mm for r in rows], np.linalg.norm(residual, axis=1), atol=1e-6)
    assert [r.moving_label for r in rows] == moving.labels

    partial = Landmarks(points + residual, ["F-1", "F-2", "F-3", "F-4", "X-5", "X-6"])
    code, _ = evaluate_cli(tmp_path, image, fixed, partial)
    err = capsys.readouterr().err
    assert code == 2 and "'F-5', 'F-6'" in err and "'X-5', 'X-6'" in err and message_lines(err) <= 3
    with pytest.raises(InputError, match="appear more than once"):
        pair_landmarks(Landmarks(points[:3], ["a", "a", "b"]), Landmarks(points[:3], ["b", "a", "a"]))


def test_slicer_logic_pairs_by_label_before_applying_its_transform(monkeypatch):
    """The panel's evaluation shifts moving landmarks pair by pair, so it must pair them (by label) first."""
    slicer = pytest.importorskip("slicer")
    logic_tests = pytest.importorskip("test_slicer_logic")
    rm = logic_tests._load_module(monkeypatch)
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    matrix = np.diag([1.5, 1.5, 1.5, 1.0])
    labelmap = logic_tests.add_volume(scene, "map", np.ones((20, 20, 20), np.uint8), matrix,
                                      cls="vtkMRMLLabelMapVolumeNode")
    fixed_ras = np.random.default_rng(1).uniform(5.0, 25.0, (5, 3))
    residual = np.array([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 4.0], [5.0, 0, 0], [0, 7.0, 0]])
    to_parent = logic_tests.translation(3.0, -2.0, 1.0)
    to_parent[:3, :3] = logic_tests.rotation(8.0, -5.0)  # a rotation: every landmark has its own shift
    transform = logic_tests.add_linear_transform(scene, to_parent)
    mapped = (np.linalg.inv(to_parent) @ np.c_[fixed_ras, np.ones(5)].T).T[:, :3]  # where T puts x_F
    labels = ["A", "B", "C", "D", "E"]
    order = [3, 0, 4, 1, 2]
    fixed_node = logic_tests.add_points(scene, "F", fixed_ras)
    moving_node = logic_tests.add_points(scene, "M", (mapped + residual)[order])
    for i, label in enumerate(labels):
        fixed_node.SetNthControlPointLabel(i, label)
        moving_node.SetNthControlPointLabel(i, labels[order[i]])

    rows, _ = rm.RegistrationMisalignmentLogic().evaluateLandmarks(labelmap, fixed_node, moving_node, transform)

    assert [r.label for r in rows] == labels and [r.moving_label for r in rows] == labels
    np.testing.assert_allclose([r.tre_mm for r in rows], np.linalg.norm(residual, axis=1), atol=1e-6)


# ---- the eight traps that already gave the right answer -----------------------------------
COLUMNS = "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"


@pytest.mark.parametrize("header,system", [
    ("# Markups fiducial file version = 4.6\n" + COLUMNS, "RAS"),  # before 4.11: no coordinate system, RAS
    ("# Markups fiducial file version = 4.11\n# CoordinateSystem = 0\n" + COLUMNS, "RAS"),
    ("# Markups fiducial file version = 4.11\n# CoordinateSystem = 1\n" + COLUMNS, "LPS"),
    ("# Markups fiducial file version = 5.6\n# CoordinateSystem = LPS\n" + COLUMNS, "LPS"),
    ("vtkMRMLMarkupsFiducialNode_0", "RAS"),  # no header at all: the oldest files
])
def test_fcsv_header_generations_read_the_same_points(tmp_path, header, system):
    points = landmark_case(chest_crop(), n=3)[0]
    written = points * [-1.0, -1.0, 1.0] if system == "RAS" else points
    rows = "".join(f"vtkMRMLMarkupsFiducialNode_{i},{x:.17g},{y:.17g},{z:.17g},0,0,0,1,1,1,0,P{i},,\n"
                   for i, (x, y, z) in enumerate(written))
    (tmp_path / "p.fcsv").write_text(rows if header.startswith("vtk") else header + rows, encoding="utf-8")
    landmarks = read_landmarks(tmp_path / "p.fcsv")
    np.testing.assert_allclose(landmarks.points_lps, points, atol=1e-9)
    assert landmarks.labels == ["P0", "P1", "P2"]


def test_markups_in_lps_and_ras_read_the_same_points(tmp_path):
    points = landmark_case(chest_crop(), n=4)[0]
    for system in ("LPS", "RAS"):
        write_landmarks(Landmarks(points, list("abcd")), tmp_path / f"{system}.mrk.json", coordinate_system=system)
        doc = json.loads((tmp_path / f"{system}.mrk.json").read_text(encoding="utf-8"))
        assert doc["markups"][0]["coordinateSystem"] == system
        np.testing.assert_allclose(read_landmarks(tmp_path / f"{system}.mrk.json").points_lps, points, atol=1e-9)


def test_nifti_displacement_field_layouts(tmp_path):
    image = chest_crop()
    points, grid = field_grid(image, spacing=6.0)
    u = u_exact(points, centre(image))
    sitk.WriteImage(vector_image(u, grid), str(tmp_path / "ants.nii.gz"))  # ANTs/ITK: 5-D, dims (x, y, z, 1, 3)
    assert sitk.ReadImage(str(tmp_path / "ants.nii.gz")).GetMetaData("dim[0]") == "5"
    transform = read_transform(tmp_path / "ants.nii.gz")
    landmarks = landmark_case(image, n=5)[0]
    mapped = np.array([transform.TransformPoint(tuple(p)) for p in landmarks])
    np.testing.assert_allclose(mapped, landmarks + u_exact(landmarks, centre(image)), atol=0.3)
    components = [sitk.VectorIndexSelectionCast(vector_image(u, grid), i) for i in range(3)]
    sitk.WriteImage(sitk.JoinSeries(components), str(tmp_path / "scalar4d.nii.gz"))  # (x, y, z, 3) scalars
    with pytest.raises(InputError, match="3-D image of 3-component vectors, got 4-D"):
        read_transform(tmp_path / "scalar4d.nii.gz")


def test_4d_nifti_with_one_volume_reads_as_the_volume(tmp_path):
    image = chest_crop()
    sitk.WriteImage(sitk.JoinSeries([image]), str(tmp_path / "one.nii.gz"))
    read = read_image(tmp_path / "one.nii.gz")
    assert read.GetDimension() == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))


def test_mask_on_another_grid_is_resampled_onto_the_fixed_grid():
    image = chest_crop()
    coarse = sitk.BinaryThreshold(sitk.Resample(image, [40, 40, 40], sitk.Transform(), sitk.sitkLinear,
                                                image.GetOrigin(), (3.0, 3.0, 3.0), image.GetDirection(), -1000.0),
                                  -1000.0, -400.0)
    mask = sitk.GetArrayFromImage(prepare_mask(coarse, image))
    lung = sitk.GetArrayFromImage(image) < -400
    assert mask.shape == lung.shape and (mask.astype(bool) == lung).mean() > 0.9


def test_flipped_axes_give_the_same_pair():
    image = chest_crop()
    flipped = sitk.Flip(image, [True, False, True])  # the same voxels stored the other way round
    assert flipped.GetDirection() != image.GetDirection()
    fixed_f, moving_f = prepare_pair(image, flipped)
    np.testing.assert_allclose(sitk.GetArrayFromImage(moving_f), sitk.GetArrayFromImage(fixed_f), atol=1e-3)


@pytest.mark.parametrize("kind", ["point", "index"])
def test_elastix_point_files_are_refused(tmp_path, kind):
    (tmp_path / "points.txt").write_text(f"{kind}\n2\n1.0 2.0 3.0\n4.0 5.0 6.0\n", encoding="utf-8")
    with pytest.raises(InputError, match=f"line 1: expected three voxel indices 'i j k', got '{kind}'"):
        read_landmarks(tmp_path / "points.txt", chest_crop())


def test_oblique_nrrd_in_las_space_reads_in_lps(tmp_path):
    image = chest_crop()
    values = sitk.GetArrayFromImage(image)  # z, y, x
    c, s = np.cos(0.3), np.sin(0.3)
    las_dirs = np.array([[1.5 * c, 1.5 * s, 0.0], [-1.5 * s, 1.5 * c, 0.0], [0.0, 0.0, 1.5]])  # columns in LAS
    las_origin = np.array([10.0, 20.0, -30.0])
    header = (f"NRRD0004\ntype: short\ndimension: 3\nspace: left-anterior-superior\nsizes: 80 80 80\n"
              f"space directions: {' '.join('(' + ','.join(f'{v:.17g}' for v in d) + ')' for d in las_dirs)}\n"
              f"kinds: domain domain domain\nendian: little\nencoding: raw\n"
              f"space origin: ({','.join(f'{v:.17g}' for v in las_origin)})\n\n")
    (tmp_path / "las.nrrd").write_bytes(header.encode() + values.astype("<i2").tobytes())
    read = read_image(tmp_path / "las.nrrd")
    flip = np.array([1.0, -1.0, 1.0])  # LAS -> LPS negates the second axis
    np.testing.assert_allclose(read.GetOrigin(), las_origin * flip, atol=1e-9)
    lps_frame = np.array(read.GetDirection()).reshape(3, 3) * np.array(read.GetSpacing())
    np.testing.assert_allclose(lps_frame, (las_dirs * flip).T, atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), values)


# ---- traps from public bug reports: a moving image short of the fixed one, damaged files, twin names ------
def test_fixed_voxels_the_moving_image_does_not_reach_get_no_label_and_do_not_colour_the_rest(model_dir):
    fixed = chest_crop(depth=48)[16:64, 16:64, :]
    half = fixed[:, :, :24]  # its own grid: the lower half of the fixed image, nothing above it
    model = load_model(model_dir / "test_singlescale.pt")
    messages: list[str] = []
    limited = sitk.GetArrayFromImage(predict(fixed, half, model, device="cpu", body_only=False,
                                             log=messages.append).labelmap)
    whole = sitk.GetArrayFromImage(predict(fixed, fixed, model, device="cpu", body_only=False).labelmap)
    assert (limited[24:] == 0).all()  # (z, y, x): the upper half has no moving data
    # the network read the fixed image where the moving one has none, so the covered half is classed as the
    # identical pair is, not as a pair whose upper half is air
    np.testing.assert_array_equal(limited[:24], whole[:24])
    assert (whole > 0).all() and any("has data for only 50.0 % of the fixed image's grid" in m for m in messages)


def test_a_truncated_gzip_image_is_refused_not_read_as_zeros(tmp_path):
    path = tmp_path / "fixed.nii.gz"
    sitk.WriteImage(chest_crop(depth=24), str(path))
    read_image(path)  # whole: reads
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="damaged gzip file"):
        read_image(path, "fixed image")


@pytest.mark.parametrize("output, source", [("moving.nii", "moving.nii.gz"), ("moving.nii.gz", "moving.nii"),
                                            ("scan.nii.gz", "scan.hdr")])
def test_an_output_a_nifti_reader_would_take_for_an_input_is_refused(tmp_path, output, source):
    (tmp_path / source).write_bytes(b"")
    with pytest.raises(InputError, match="differs from the input .* only by its suffix"):
        check_outputs([Output("--out", tmp_path / output, "image")], [tmp_path / source])
    check_outputs([Output("--out", tmp_path / f"map_{output}", "image")], [tmp_path / source])


def test_a_registrations_zero_fill_is_no_data_not_misalignment(model_dir):
    fixed = chest_crop(depth=48)[16:64, 16:64, :]
    values = sitk.GetArrayFromImage(fixed)
    values[30:] = 0  # (z, y, x): elastix's DefaultPixelValue 0 where the moving image had no data
    moving = sitk.GetImageFromArray(values)
    moving.CopyInformation(fixed)
    assert fill_region(fixed, fixed) is None  # a CT's own edges are no fill
    region, value = fill_region(moving, fixed)
    filled = sitk.GetArrayFromImage(region).astype(bool)
    # the fill, and the few voxels of exactly 0 HU of the anatomy that touch it
    assert value == 0 and filled[30:].all() and filled[:30].mean() < 0.01
    model = load_model(model_dir / "test_singlescale.pt")
    messages: list[str] = []
    labels = sitk.GetArrayFromImage(predict(fixed, moving, model, device="cpu", body_only=False,
                                            log=messages.append).labelmap)
    whole = sitk.GetArrayFromImage(predict(fixed, fixed, model, device="cpu", body_only=False).labelmap)
    assert (labels[filled] == 0).all()
    np.testing.assert_array_equal(labels[~filled], whole[~filled])
    assert any("DefaultPixelValue" in m and "37.5 %" in m for m in messages)


@pytest.mark.parametrize("text", ["label,x,y,z\n1,1.0,2.0,3.0\n2,nan,2.0,3.0\n", "label,x,y,z\n1,1,2,3\n2,4,inf,6\n"])
def test_a_landmark_with_a_coordinate_that_is_not_a_number_is_refused_by_label(tmp_path, text):
    path = tmp_path / "fixed.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=r"not a number .*'2'"):
        read_landmarks(path)


def test_evaluate_with_no_landmark_inside_the_map_says_why_instead_of_scoring_nothing(tmp_path, capsys):
    image = chest_crop(depth=24)
    image.SetOrigin((100.0, 150.0, -50.0))  # negated x and y fall outside it
    points = np.array([image.TransformIndexToPhysicalPoint(i) for i in ((10, 10, 5), (40, 60, 12), (70, 30, 20))])
    lps = Landmarks(points, ["1", "2", "3"])
    ras = Landmarks(points * [-1.0, -1.0, 1.0], ["1", "2", "3"])  # a RAS file read as LPS
    code, _ = evaluate_cli(tmp_path, image, ras, ras)
    assert code == 2 and "outside the labelmap's box" in capsys.readouterr().err
    assert "likely in RAS" in none_inside_message(labelmap_of(image), ras)
    assert "likely in RAS" not in none_inside_message(labelmap_of(image), Landmarks(points + 1000.0, ["1", "2", "3"]))
    empty = labelmap_of(image) * 0
    assert "where the labelmap is 0" in none_inside_message(empty, lps)
    assert evaluate_cli(tmp_path, image, lps, lps)[0] == 0


def test_evaluate_warns_when_landmarks_read_as_lps_are_partly_scored_and_would_all_be_as_ras(tmp_path, capsys):
    """A RAS file read as LPS whose mirror still meets the map: some landmarks are scored at the wrong places. The
    box spans x and y from -30 to 48 mm; the map is 0 beyond x = 16 mm (the body ends there)."""
    image = sitk.Image((40, 40, 10), sitk.sitkInt16)
    image.SetSpacing((2.0, 2.0, 2.0))
    image.SetOrigin((-30.0, -30.0, 0.0))
    labelmap = labelmap_of(image)
    labelmap[23:, :, :] = 0
    points = np.array([[-28.0 + 3 * i, -20.0 + i, 6.0] for i in range(8)])  # x from -28 to -7: all on the map
    lps, ras = Landmarks(points, list("abcdefgh")), Landmarks(points * [-1.0, -1.0, 1.0], list("abcdefgh"))
    assert coordinate_warning(labelmap, lps) == ""
    assert "likely in RAS" in coordinate_warning(labelmap, ras)  # x from 7 to 28: 5 of 8 at or beyond x = 16
    sitk.WriteImage(labelmap, str(tmp_path / "map.nii.gz"))
    write_landmarks(ras, tmp_path / "f.csv")
    code = main(["evaluate", "--labelmap", str(tmp_path / "map.nii.gz"), "--fixed-landmarks", str(tmp_path / "f.csv"),
                 "--moving-landmarks", str(tmp_path / "f.csv")])
    assert code == 0 and "warning: 5 of the 8 fixed landmarks" in capsys.readouterr().err
    beyond = Landmarks(np.vstack([points[:6], [[20.0, 0.0, 6.0], [24.0, 0.0, 6.0]]]), list("abcdefgh"))
    assert coordinate_warning(labelmap, beyond) == ""  # two beyond the body whose mirror helps no one: no warning


def test_a_pair_stored_flipped_or_sagittally_gets_the_map_of_the_pair_stored_axially():
    fixed = chest_crop(depth=48)[16:64, 16:64, :]
    moving = sitk.Resample(fixed, fixed, sitk.TranslationTransform(3, (4.0, -3.0, 6.0)), sitk.sitkLinear, -1000.0)
    model = load_model()  # the shipped model (5 s a map here): the random ones' labels hardly vary
    axial = predict(fixed, moving, model, device="cpu", body_only=False).labelmap
    assert np.bincount(sitk.GetArrayFromImage(axial).ravel(), minlength=4)[2:].min() > 1000  # poor and wrong
    grid = isotropic_reference(fixed, 1.0)
    assert grid.GetOrigin() == fixed.GetOrigin() and grid.GetDirection() == fixed.GetDirection()  # LPS: as it was
    for store in (lambda image: sitk.Flip(image, [True, True, False]),
                  lambda image: sitk.PermuteAxes(image, [2, 0, 1])):
        stored_fixed, stored_moving = store(fixed), store(moving)
        assert stored_fixed.GetDirection() != fixed.GetDirection()
        labels = predict(stored_fixed, stored_moving, model, device="cpu", body_only=False).labelmap
        back = sitk.Resample(labels, axial, sitk.Transform(), sitk.sitkNearestNeighbor, 0)  # the same voxels
        agree = np.mean(sitk.GetArrayFromImage(back) == sitk.GetArrayFromImage(axial))
        assert agree > 0.999, agree


def test_a_moving_header_with_a_flipped_axis_is_named_when_the_images_miss_each_other():
    fixed = chest_crop(depth=24)
    moving = sitk.Image(fixed)
    moving.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))  # RAS written as LPS: x and y flipped
    with pytest.raises(InputError, match="axis directions differ"):
        prepare_pair(fixed, moving)
    with pytest.raises(InputError) as info:  # the same directions: no word about them
        prepare_pair(fixed, _shifted(fixed, 500.0))
    assert "directions" not in str(info.value)


def _shifted(image: sitk.Image, mm: float) -> sitk.Image:
    moved = sitk.Image(image)
    moved.SetOrigin(tuple(np.array(image.GetOrigin()) + mm))
    return moved


def test_a_sheared_fixed_grid_is_not_written_as_nifti(tmp_path, model_dir, capsys):
    """NIfTI holds orthonormal directions only: ITK wrote a sheared fixed grid's labelmap with other directions
    (only a console warning), its voxels 10-19 mm from where they belong. .mha keeps the grid."""
    fixed = chest_crop(depth=40)
    fixed.SetDirection((1, 0, 0.3, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(fixed, str(tmp_path / "fixed.mha"))
    args = ["predict", "--fixed", str(tmp_path / "fixed.mha"), "--moving", str(tmp_path / "fixed.mha"),
            "--model", str(model_dir / "test_singlescale.pt"), "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "map.nii.gz")]) == 2 and not (tmp_path / "map.nii.gz").exists()
    assert "cannot hold the fixed image's sheared grid (its axes are 16.70 deg from perpendicular)" in \
        capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "map.mha")]) == 0
    np.testing.assert_allclose(sitk.ReadImage(str(tmp_path / "map.mha")).GetDirection(), fixed.GetDirection())


def test_an_image_saved_without_its_header_is_named_instead_of_mapped_elsewhere():
    """The moving image written from an array without CopyInformation: read by geometry it lay elsewhere and at
    another scale, and the map called 69 % of the pair wrong with notes that never said why."""
    fixed = chest_crop(depth=40)
    bare = sitk.GetImageFromArray(sitk.GetArrayFromImage(fixed))
    with pytest.raises(InputError, match=r"the moving image has the fixed image's size \(80, 80, 40\) but a default "
                                         r"header .*spacing \(1.5, 1.5, 1.5\) mm.*CopyInformation"):
        prepare_pair(fixed, bare)
    with pytest.raises(InputError, match="the fixed image has the moving image's size"):
        prepare_pair(bare, fixed)
    prepare_pair(bare, bare)  # both bare: the same grid, nothing lost between them
    lungs = sitk.Cast(fixed < -500, sitk.sitkUInt8)  # a mask written the same way: it lay elsewhere, 1 mm voxels
    with pytest.raises(InputError, match="the mask has the fixed image's size .* default header"):
        prepare_mask(sitk.GetImageFromArray(sitk.GetArrayFromImage(lungs)), fixed)
    assert sitk.GetArrayViewFromImage(prepare_mask(lungs, fixed)).any()


def test_a_nested_dicom_export_and_a_single_dicom_slice_name_the_folder_to_give(tmp_path):
    image = chest_crop(depth=8)
    write_dicom_series(image, tmp_path / "export" / "PATIENT" / "STUDY" / "SERIES", f"{UID_ROOT}.40", "chest")
    with pytest.raises(InputError, match=r"holds no DICOM series itself; it holds DICOM files deeper down, in "
                                         r".*PATIENT/STUDY/SERIES'.*give one of those folders"):
        read_image(tmp_path / "export", "fixed image")
    one = sorted((tmp_path / "export" / "PATIENT" / "STUDY" / "SERIES").iterdir())[0]
    with pytest.raises(InputError, match=r"is a single DICOM slice; give the folder that holds the whole series"):
        read_image(one, "fixed image")
    assert read_image(tmp_path / "export" / "PATIENT" / "STUDY" / "SERIES").GetSize() == (80, 80, 8)


def test_the_same_image_twice_dirlab_indices_and_a_labelmap_of_unknown_origin_are_noted(tmp_path, model_dir, capsys):
    sitk.WriteImage(chest_crop(depth=40), str(tmp_path / "fixed.nii.gz"))
    out = tmp_path / "map.nii.gz"
    assert main(["predict", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "fixed.nii.gz"),
                 "--out", str(out), "--model", str(model_dir / "test_singlescale.pt"), "--device", "cpu"]) == 0
    assert "--fixed and --moving are the same image" in capsys.readouterr().err
    for name in ("f.txt", "m.txt"):
        (tmp_path / name).write_text("40 40 20\n30 35 25\n", encoding="utf-8")
    assert main(["evaluate", "--labelmap", str(out), "--fixed-landmarks", str(tmp_path / "f.txt"),
                 "--moving-landmarks", str(tmp_path / "m.txt")]) == 0
    err = capsys.readouterr().err
    assert "converted on the labelmap's grid (size (80, 80, 40), spacing (1.5, 1.5, 1.5) mm)" in err
    assert "does not say it is a misalignment map" not in err  # predict's labelmap says so in its descrip
    body = sitk.Cast(chest_crop(depth=40) > -3000, sitk.sitkUInt8)  # a segmentation: 1 everywhere
    sitk.WriteImage(body, str(tmp_path / "body.nii.gz"))
    assert main(["evaluate", "--labelmap", str(tmp_path / "body.nii.gz"), "--fixed-landmarks", str(tmp_path / "f.txt"),
                 "--moving-landmarks", str(tmp_path / "m.txt")]) == 0
    assert "body.nii.gz does not say it is a misalignment map" in capsys.readouterr().err


def test_a_nifti_whose_qform_and_sform_disagree_is_noted(tmp_path):
    """ITK reads the sform without a word; a header where one of the two was edited puts the image elsewhere."""
    import struct

    image = chest_crop(depth=20)
    sitk.WriteImage(image, str(tmp_path / "both.nii"))
    notes = []
    read_image(tmp_path / "both.nii", "fixed image", log=notes.append)
    assert notes == []  # ITK writes the two alike
    header = bytearray((tmp_path / "both.nii").read_bytes())
    assert struct.unpack("<2h", header[252:256]) != (0, 0)
    srow_x = struct.unpack("<4f", header[280:296])
    header[280:296] = struct.pack("<4f", *srow_x[:3], srow_x[3] + 30.0)  # the sform moved 30 mm along x
    (tmp_path / "edited.nii").write_bytes(bytes(header))
    read_image(tmp_path / "edited.nii", "fixed image", log=notes.append)
    assert len(notes) == 1 and "two orientations that place the image up to 30.0 mm apart" in notes[0]
    assert "ITK used the sform" in notes[0]


# ---- traps from a review of 2026-12-02 (issue 22's session): ITK's quiet habits ----------------
def _write_float(image: sitk.Image, path: Path, bad: float) -> None:
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    values[2, 3, 4:9] = bad
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".hdr", ".img.gz", "plain .nii.gz"])
def test_nan_and_inf_in_a_nifti_are_refused_not_read_as_water(tmp_path, suffix):
    """ITK's NIfTI reader (also for .hdr / .img pairs) turns NaN and Inf into 0 (water): scattered, they passed
    unnoticed; an .mha kept them. "plain .nii.gz": an uncompressed file under a .gz name, which ITK reads."""
    image = chest_crop(depth=20)
    plain = suffix.startswith("plain")
    suffix = suffix.split()[-1]
    for bad, word in ((np.nan, "5 NaN and 0 Inf"), (np.inf, "0 NaN and 5 Inf")):
        _write_float(image, tmp_path / ("written.nii" if plain else f"moving{suffix}"), bad)
        if plain:
            (tmp_path / "written.nii").replace(tmp_path / f"moving{suffix}")
        assert not np.isnan(sitk.GetArrayViewFromImage(sitk.ReadImage(str(tmp_path / f"moving{suffix}")))).any()
        with pytest.raises(InputError, match=f"holds {word} voxels, which ITK's NIfTI reader turns into 0"):
            read_image(tmp_path / f"moving{suffix}", "moving image")
        read_image(tmp_path / f"moving{suffix}", "mask", finite=False)  # a mask: 0 is outside, as NaN was
    _write_float(image, tmp_path / f"fine{suffix}", -1000.0)
    read_image(tmp_path / f"fine{suffix}", "moving image")


def test_a_nifti_beside_its_twin_is_read_as_named(tmp_path):
    """Asked for ct.nii.gz beside a stale ct.nii, ITK read ct.nii: a pair of the two was "100 % correct"."""
    image = chest_crop(depth=20)
    stale = sitk.GetImageFromArray(np.zeros(sitk.GetArrayViewFromImage(image).shape, np.int16))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(stale, str(tmp_path / "ct.nii"))
    assert not sitk.GetArrayViewFromImage(sitk.ReadImage(str(tmp_path / "ct.nii.gz"))).any()  # ITK's habit
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "ct.nii.gz")),
                                  sitk.GetArrayFromImage(image))
    assert read_image(tmp_path / "ct.nii.gz").GetSpacing() == image.GetSpacing()
    assert not sitk.GetArrayViewFromImage(read_image(tmp_path / "ct.nii")).any()


def test_twin_outputs_a_stale_twin_and_upper_case_suffixes_are_refused_before_the_work(tmp_path):
    with pytest.raises(InputError, match="--probabilities and --out differ only by their NIfTI suffix"):
        check_outputs([Output("--out", tmp_path / "map.nii", "image"),
                       Output("--probabilities", tmp_path / "map.nii.gz", "image")])
    (tmp_path / "old.nii").write_bytes(b"")
    with pytest.raises(InputError, match="old.nii' already lies beside 'old.nii.gz'"):
        check_outputs([Output("--out", tmp_path / "old.nii.gz", "image")])
    with pytest.raises(InputError, match="old.nii.gz' already lies beside 'old.nii'"):  # a reader of it gets ours
        (tmp_path / "old.nii").rename(tmp_path / "old.nii.gz")
        check_outputs([Output("--out", tmp_path / "old.nii", "image")])
    for name, fixed in (("LAB.MHA", "LAB.mha"), ("LAB.NII.GZ", "LAB.nii.gz"), ("lab.Nii", "lab.nii")):
        with pytest.raises(InputError, match=f"upper-case extension.*name it '{fixed}'"):
            check_outputs([Output("--out", tmp_path / name, "image")])
    (tmp_path / "scan.hdr").write_bytes(b"")  # an Analyze header: ITK reads scan.nii.gz as named beside it
    check_outputs([Output("--out", tmp_path / "map.nii.gz", "image"), Output("--csv", tmp_path / "MAP.CSV", "csv"),
                   Output("--probabilities", tmp_path / "map_p.nii.gz", "image"),
                   Output("--jacobian", tmp_path / "jac.NRRD", "image"),
                   Output("--x", tmp_path / "scan.nii.gz", "image")])


def test_hu_minus_1024_is_refused_with_the_offset_that_mends_it_and_padding_is_not():
    """The rescale intercept applied twice (or --hu-offset -1024 for a pair in HU) puts air near -2048 and soft
    tissue near -1000, in the air band: it passed, and the map called a still pair 15 % poor."""
    hu = chest_crop()
    twice = sitk.Cast(hu, sitk.sitkInt16) - 1024
    with pytest.raises(InputError, match=r"fixed image does not look like.*below air.*HU - 1024.*hu-offset=1024,0"):
        prepare_pair(twice, hu)
    with pytest.raises(InputError, match=r"below air.*hu offset -1024 added"):
        prepare_pair(hu, hu, hu_offset=-1024)
    prepare_pair(twice, twice, hu_offset=1024)
    padded = sitk.GetArrayFromImage(hu)
    padded[:, :, :12] = -2048  # a scanner's outside-field padding: one constant value below air
    image = sitk.GetImageFromArray(padded)
    image.CopyInformation(hu)
    prepare_pair(image, hu)
    resampled = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), 3.0)  # as a tool's resampling
    assert np.unique(sitk.GetArrayViewFromImage(resampled)[:, :, :16]).size > 1000  # no longer one padding value
    prepare_pair(resampled, hu)


def test_a_signed_8_bit_windowed_export_is_refused():
    """Windowed lung read as fat (-128..-50), so the export passed as a CT inside the body."""
    hu = chest_crop()
    window = np.clip((sitk.GetArrayFromImage(hu) + 1000.0) / 1400.0 * 255.0 - 128.0, -128, 127).astype(np.int8)
    image = sitk.GetImageFromArray(window)
    image.CopyInformation(hu)
    with pytest.raises(InputError, match="8-bit signed integer.*fit in 8 bits: a display export"):
        prepare_pair(image, image)


def test_2d_and_4d_fixed_images_and_a_single_slice_are_refused_as_such(tmp_path, model_dir, capsys):
    """A 2-D or 4-D fixed image crashed in the output check (a 3 x 3 direction) with an internal error."""
    crop = chest_crop(depth=20)
    sitk.WriteImage(crop, str(tmp_path / "moving.nii.gz"))
    sitk.WriteImage(crop[:, :, 10], str(tmp_path / "slice.nii.gz"))
    sitk.WriteImage(sitk.JoinSeries([crop, crop]), str(tmp_path / "phases.nii.gz"))
    for fixed, message in (("slice.nii.gz", "fixed image is 2-D"),
                           ("phases.nii.gz", "fixed image is 4-D with 2 volumes")):
        assert main(["predict", "--fixed", str(tmp_path / fixed), "--moving", str(tmp_path / "moving.nii.gz"),
                     "--out", str(tmp_path / "map.nii.gz"), "--model", str(model_dir / "test_singlescale.pt"),
                     "--device", "cpu"]) == 2
        assert message in capsys.readouterr().err
    thick = crop[:, :, 10:11]
    thick.SetSpacing((1.5, 1.5, 17.0))
    with pytest.raises(InputError, match=r"fixed image is a single slice along z \(size \(80, 80, 1\), 17 mm thick\)"):
        prepare_pair(thick, thick)


def test_the_library_names_what_it_takes_and_the_devices_it_runs_on():
    from RegistrationMisalignmentLib.inference import resolve_device

    crop = chest_crop(depth=20)
    with pytest.raises(InputError, match="fixed image is a numpy.ndarray, not a SimpleITK.Image.*GetImageFromArray"):
        prepare_pair(sitk.GetArrayFromImage(crop), crop)
    with pytest.raises(InputError, match="mask is a builtins.str, not a SimpleITK.Image"):
        prepare_mask("lungs.nii.gz", crop)
    for device in ("tpu", "gpu", "mps"):
        with pytest.raises(InputError, match=f"device '{device}': the network runs on auto, cpu, cuda"):
            resolve_device(device)


def test_a_sheared_sform_is_noted_as_the_qform_itk_reads():
    """ITK reads the qform when the sform holds a shear; the note said it read the sform."""
    import struct
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sheared.nii"
        sitk.WriteImage(chest_crop(depth=20), str(path))
        header = bytearray(path.read_bytes())
        srow_x = list(struct.unpack("<4f", header[280:296]))
        srow_x[1] += 0.3 * abs(srow_x[0])  # x leans on y: no rotation and scale
        header[280:296] = struct.pack("<4f", *srow_x)
        path.write_bytes(bytes(header))
        notes = []
        image = read_image(path, "moving image", log=notes.append)
        assert len(notes) == 1 and "ITK used the qform" in notes[0]
        assert image.GetDirection() == pytest.approx(chest_crop(depth=20).GetDirection())


def test_a_dicom_slice_cut_short_is_named_not_only_the_gap_it_leaves(tmp_path):
    """GDCM drops an unreadable slice without a word: the series had a gap, and the message did not say why."""
    write_dicom_series(chest_crop(depth=8), tmp_path / "series", f"{UID_ROOT}.50", "chest")
    broken = tmp_path / "series" / "chest_004.dcm"
    broken.write_bytes(broken.read_bytes()[:4000])
    with pytest.raises(InputError, match=r"missing or uneven slices\); 1 DICOM file\(s\) of the folder belong to no "
                                         r"series GDCM could read \(damaged or cut short\?\): chest_004.dcm"):
        read_image(tmp_path / "series", "fixed image")
