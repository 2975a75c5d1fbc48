"""``regmis qa`` and ``regmis predict --confidence`` end to end, on a crop of a real chest CT.

The pair: the crop and itself moved by 2 mm (the "registered" moving image), a known affine registration
transform with its exact inverse, and landmarks with known residuals, so that the Jacobian (det of the
matrix everywhere), inverse consistency (0) and the landmarks' true classes are known.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from RegistrationMisalignmentLib.cli import main
from RegistrationMisalignmentLib.landmarks import Landmarks, write_landmarks
from conftest import SHARED_DATA

CHEST = SHARED_DATA / "chest_ct_1.5mm.nii.gz"
MATRIX = np.array([[1.05, 0.02, 0.0], [0.0, 0.97, 0.03], [0.01, 0.0, 1.02]])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    if not CHEST.is_file():
        pytest.skip(f"{CHEST} not available")
    folder = tmp_path_factory.mktemp("qa")
    fixed = sitk.Cast(sitk.ReadImage(str(CHEST))[8:40, 60:92, 66:98], sitk.sitkInt16)  # right lung and chest wall
    moving = sitk.Resample(fixed, fixed, sitk.TranslationTransform(3, (2.0, 0.0, 0.0)), sitk.sitkLinear, -1000)
    sitk.WriteImage(fixed, str(folder / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(folder / "moving.nrrd"))
    forward = sitk.AffineTransform(MATRIX.ravel().tolist(), (1.0, -1.0, 0.5),
                                   fixed.TransformContinuousIndexToPhysicalPoint((16, 16, 16)))
    sitk.WriteTransform(forward, str(folder / "forward.tfm"))
    sitk.WriteTransform(forward.GetInverse(), str(folder / "backward.h5"))
    points = np.array([fixed.TransformIndexToPhysicalPoint(ijk) for ijk in ((8, 8, 8), (16, 20, 12), (24, 10, 22))])
    residual = np.array([[1.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 7.0]])
    moving_points = np.array([forward.TransformPoint(tuple(map(float, p))) for p in points]) + residual
    write_landmarks(Landmarks(points, ["a", "b", "c"]), folder / "f.csv")
    write_landmarks(Landmarks(moving_points, ["a", "b", "c"]), folder / "m.mrk.json", coordinate_system="RAS")
    return folder, fixed


def qa_args(folder, *extra):
    return ["qa", "--fixed", str(folder / "fixed.nii.gz"), "--moving", str(folder / "moving.nrrd"),
            "--transform", str(folder / "forward.tfm"), *extra]


def test_qa_computes_the_maps_the_summary_and_the_landmark_table(case, model_dir, capsys):
    folder, fixed = case
    out = folder / "out"
    code = main(qa_args(folder, "--inverse-transform", str(folder / "backward.h5"),
                        "--checks", "learned,confidence,jacobian,inverse-consistency,intensity",
                        "--model", str(model_dir / "test_singlescale.pt"), "--device", "cpu",
                        "--fixed-landmarks", str(folder / "f.csv"), "--moving-landmarks", str(folder / "m.mrk.json"),
                        "--out-labelmap", str(out / "learned.nii.gz"), "--out-confidence", str(out / "conf.nii.gz"),
                        "--out-entropy", str(out / "entropy.nrrd"), "--out-jacobian", str(out / "jac.nii.gz"),
                        "--out-inverse-consistency", str(out / "ic.mha"), "--out-intensity", str(out / "diff.nii.gz"),
                        "--out-json", str(out / "summary.json"), "--out-csv", str(out / "landmarks.csv")))
    printed = capsys.readouterr().out
    assert code == 0
    for name in ("learned.nii.gz", "conf.nii.gz", "entropy.nrrd", "jac.nii.gz", "ic.mha", "diff.nii.gz"):
        image = sitk.ReadImage(str(out / name))
        assert image.GetSize() == fixed.GetSize() and np.allclose(image.GetOrigin(), fixed.GetOrigin())
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jac.nii.gz"))), np.linalg.det(MATRIX),
                               rtol=1e-5)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ic.mha"))).max() < 1e-4
    confidence = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "conf.nii.gz")))
    inside = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "learned.nii.gz"))) > 0
    assert inside.any() and np.all(confidence[inside] >= 1 / 3 - 1e-6) and np.all(confidence[inside] <= 1 + 1e-6)

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["region"] == "body" and summary["checks"][0] == "learned"
    assert summary["maps"]["jacobian"]["folding"] == 0
    assert summary["maps"]["jacobian"]["mean"] == pytest.approx(np.linalg.det(MATRIX), rel=1e-5)
    assert sum(summary["maps"]["learned"]["class_shares"].values()) == pytest.approx(1.0)
    assert summary["maps"]["intensity"]["p95"] > 50.0
    assert summary["landmarks"]["n"] == 3 and "learned" in summary["landmarks"]["scores"]
    with (out / "landmarks.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["true_class"] for r in rows] == ["correct", "poor", "wrong"]  # residuals 1, 4, 7 mm
    assert {"learned", "confidence", "entropy", "jacobian", "inverse_consistency", "intensity"} <= set(rows[0])
    assert float(rows[1]["jacobian"]) == pytest.approx(np.linalg.det(MATRIX), rel=1e-5)
    assert "Jacobian determinant" in printed and "folding (det <= 0): 0 voxels" in printed


@pytest.mark.parametrize("extra, message", [
    (["--checks", "intensity", "--out-residual", "r.nii.gz"], "--out-residual: the re-registration residual"),
    (["--checks", "inverse-consistency"], "both directions"),
    (["--out-jacobian", "j.png"], "2-D format"),
    (["--out-csv", "l.csv"], "--out-csv writes the landmark table"),
    (["--checks", "folding"], "choose a comma-separated subset"),
])
def test_qa_refuses_impossible_requests_before_any_work(case, capsys, extra, message):
    folder, _ = case
    extra = [str(folder / "out2" / e) if e.endswith((".nii.gz", ".png", ".csv")) else e for e in extra]
    assert main(qa_args(folder, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (folder / "out2").exists()


def test_predict_writes_confidence_and_entropy(case, model_dir):
    folder, fixed = case
    code = main(["predict", "--fixed", str(folder / "fixed.nii.gz"), "--moving", str(folder / "moving.nrrd"),
                 "--out", str(folder / "p" / "map.nii.gz"), "--confidence", str(folder / "p" / "conf.nii.gz"),
                 "--entropy", str(folder / "p" / "entropy.nii.gz"), "--model", str(model_dir / "test_singlescale.pt"),
                 "--device", "cpu"])
    assert code == 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "p" / "map.nii.gz")))
    confidence = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "p" / "conf.nii.gz")))
    entropy = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "p" / "entropy.nii.gz")))
    inside = labels > 0
    assert np.all(confidence[~inside] == 0) and np.all(confidence[inside] >= 1 / 3 - 1e-6)
    assert np.all((entropy >= 0) & (entropy <= np.log2(3) + 1e-6))
    # The more certain a voxel, the lower its entropy.
    assert np.corrcoef(confidence[inside], entropy[inside])[0, 1] < -0.5


def test_qa_reregistration_writes_the_residual_and_its_classes(case, capsys):
    pytest.importorskip("itk")
    folder, fixed = case
    out = folder / "rereg"
    code = main(qa_args(folder, "--checks", "intensity,reregistration", "--reregistration-iterations", "10",
                        "--threads", "2", "--out-residual", str(out / "residual.nii.gz"),
                        "--out-reregistration", str(out / "classes.nii.gz"), "--out-json", str(out / "summary.json")))
    assert code == 0
    residual = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "residual.nii.gz")))[6:-6, 6:-6, 6:-6]
    assert 1.0 < np.median(residual) < 3.0  # the moving image is the fixed one moved by 2 mm
    classes = sitk.ReadImage(str(out / "classes.nii.gz"))
    assert classes.GetSize() == fixed.GetSize() and set(np.unique(sitk.GetArrayFromImage(classes))) <= {0, 1, 2, 3}
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["maps"]) == {"intensity", "residual", "reregistration"}
    assert "re-registration classes (elastix-t)" in capsys.readouterr().out
