"""``regmis`` end to end: predict on a small generated pair, evaluate at landmarks, info, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import SimpleITK as sitk

from RegistrationMisalignmentLib.cli import main
from RegistrationMisalignmentLib.landmarks import Landmarks, write_landmarks
from conftest import ct_like


def write_pair(tmp_path):
    array = ct_like((20, 24, 28), seed=1)
    fixed = sitk.GetImageFromArray(array)
    fixed.SetSpacing((1.0, 1.2, 1.5))
    moving = sitk.GetImageFromArray(np.roll(array, 3, axis=2))
    moving.CopyInformation(fixed)
    sitk.WriteImage(fixed, str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "moving.nrrd"))
    return fixed


def test_predict_then_evaluate_end_to_end(tmp_path, model_dir, capsys):
    fixed = write_pair(tmp_path)
    out = tmp_path / "out" / "labelmap.nii.gz"
    code = main(["predict", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nrrd"),
                 "--out", str(out), "--probabilities", str(tmp_path / "probs.mha"),
                 "--model", str(model_dir / "test_singlescale.pt"), "--device", "cpu", "--no-body-mask"])
    assert code == 0
    labelmap = sitk.ReadImage(str(out))
    assert labelmap.GetSize() == fixed.GetSize() and np.allclose(labelmap.GetSpacing(), fixed.GetSpacing())
    assert set(np.unique(sitk.GetArrayFromImage(labelmap))) <= {1, 2, 3}
    assert sitk.ReadImage(str(tmp_path / "probs.mha")).GetNumberOfComponentsPerPixel() == 3
    assert "correct" in capsys.readouterr().out

    points = np.array([fixed.TransformIndexToPhysicalPoint((i, 5, 5)) for i in (4, 8, 12, 16)], dtype=float)
    write_landmarks(Landmarks(points, ["a", "b", "c", "d"]), tmp_path / "f.csv")
    shifted = points + np.array([[0.0, 0.0, 1.0], [0.0, 4.0, 0.0], [7.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    write_landmarks(Landmarks(shifted, ["a", "b", "c", "d"]), tmp_path / "m.mrk.json", coordinate_system="RAS")
    code = main(["evaluate", "--labelmap", str(out), "--fixed-landmarks", str(tmp_path / "f.csv"),
                 "--moving-landmarks", str(tmp_path / "m.mrk.json"), "--out-csv", str(tmp_path / "rows.csv"),
                 "--out-json", str(tmp_path / "metrics.json")])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["n"] == 4
    rows = (tmp_path / "rows.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 5 and "tre_mm" in rows[0]
    # True classes from the known residuals 1, 4, 7, 2 mm.
    assert [r.split(",")[rows[0].split(",").index("true_class")] for r in rows[1:]] == ["correct", "poor", "wrong", "correct"]


def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, model_dir, capsys):
    write_pair(tmp_path)
    out = tmp_path / "labelmap.nii.gz"
    code = main(["predict", "--fixed", str(tmp_path / "missing.nii.gz"), "--moving", str(tmp_path / "moving.nrrd"),
                 "--out", str(out), "--model", str(model_dir / "test_singlescale.pt")])
    assert code == 2
    assert "not found" in capsys.readouterr().err
    flat = sitk.Image([20, 20, 20], sitk.sitkFloat32)
    sitk.WriteImage(flat, str(tmp_path / "flat.nii.gz"))
    code = main(["predict", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "flat.nii.gz"),
                 "--out", str(out), "--model", str(model_dir / "test_singlescale.pt")])
    assert code == 2 and not out.exists()
    assert "moving image" in capsys.readouterr().err


def test_info_prints_the_model_card(model_dir, capsys):
    assert main(["info", "--model", str(model_dir / "test_lstm.pt")]) == 0
    assert '"decoder": "lstm"' in capsys.readouterr().out


def test_console_script_is_installed_and_reports_usage():
    result = subprocess.run([sys.executable, "-m", "RegistrationMisalignmentLib.cli", "--help"], capture_output=True,
                            text=True, encoding="utf-8", check=False)
    assert result.returncode == 0 and "predict" in result.stdout
