"""evaluate_landmarks on a small synthetic labelmap whose rows are known by hand; row CSV I/O."""

import numpy as np
import pytest
import SimpleITK as sitk

from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.evaluation import (
    LandmarkRow,
    evaluate_landmarks,
    read_rows_csv,
    write_rows_csv,
)
from RegistrationMisalignmentLib.landmarks import Landmarks


def _labelmap() -> sitk.Image:
    """10^3 voxels of 2 mm at the origin; along x: voxels 0-2 correct, 3-5 poor, 6-8 wrong, 9 unlabelled."""
    a = np.zeros((10, 10, 10), dtype=np.uint8)  # z, y, x
    a[..., 0:3] = DEFAULT_CONFIG.label_correct
    a[..., 3:6] = DEFAULT_CONFIG.label_poor
    a[..., 6:9] = DEFAULT_CONFIG.label_wrong
    image = sitk.GetImageFromArray(a)
    image.SetSpacing((2.0, 2.0, 2.0))
    return image


# label, fixed point (LPS mm), displacement to the moving point, TRE, true class, predicted class
CASES = [
    ("a", (2.0, 2.0, 2.0), (1.0, 0.0, 0.0), 1.0, 0, 0),    # x voxel 1: correct; 1 mm correct
    ("b", (8.0, 2.0, 2.0), (0.0, 4.0, 0.0), 4.0, 1, 1),    # x voxel 4: poor; 4 mm poor
    ("c", (14.0, 2.0, 2.0), (0.0, 0.0, 2.0), 2.0, 0, 2),   # x voxel 7: wrong; 2 mm correct
    ("d", (18.0, 2.0, 2.0), (0.0, 0.0, 7.0), 7.0, 2, -1),  # x voxel 9: label 0, not predicted
    ("e", (50.0, 2.0, 2.0), (0.0, 0.0, 0.0), 0.0, 0, -1),  # outside the image
    ("f", (4.0, 4.0, 4.0), (0.0, 6.0, 0.0), 6.0, 2, 0),    # x voxel 2: correct; 6 mm is wrong ([6, inf))
]


def _landmarks():
    fixed = Landmarks(np.array([c[1] for c in CASES]), [c[0] for c in CASES])
    moving = Landmarks(fixed.points_lps + np.array([c[2] for c in CASES]), fixed.labels)
    return fixed, moving


def test_rows_and_report_by_hand():
    fixed, moving = _landmarks()
    rows, report = evaluate_landmarks(_labelmap(), fixed, moving)
    assert [r.label for r in rows] == [c[0] for c in CASES]
    assert [r.tre_mm for r in rows] == pytest.approx([c[3] for c in CASES])
    assert [r.true_class for r in rows] == [c[4] for c in CASES]
    assert [r.predicted_class for r in rows] == [c[5] for c in CASES]
    assert [r.agree for r in rows] == [True, True, False, False, False, False]
    assert rows[2].position_lps == (14.0, 2.0, 2.0)
    # counted: a, b, c, f -> true (0, 1, 0, 2), predicted (0, 1, 2, 0)
    assert report.n == 4
    assert report.accuracy == pytest.approx(0.5)
    # F1c: TP 1, FP 1 (f), FN 1 (c) -> 2/4; F1p: 2/2; F1w: TP 0 -> 0
    assert report.f1 == pytest.approx((0.5, 1.0, 0.0))
    # po 0.5; true and predicted counts both (2, 1, 1) -> pe = 6/16; kappa = 0.125 / 0.625
    assert report.kappa == pytest.approx(0.2)
    assert report.cw == 2  # c (correct seen as wrong) and f (wrong seen as correct)


def test_transform_maps_fixed_onto_moving():
    fixed, moving = _landmarks()
    shifted = Landmarks(moving.points_lps + [0.0, 0.0, 10.0], moving.labels)
    rows, _ = evaluate_landmarks(_labelmap(), fixed, shifted, sitk.TranslationTransform(3, (0.0, 0.0, 10.0)))
    assert [r.tre_mm for r in rows] == pytest.approx([c[3] for c in CASES])


def test_moving_landmarks_are_matched_by_label():
    fixed, moving = _landmarks()
    order = [3, 0, 5, 1, 4, 2]
    shuffled = Landmarks(moving.points_lps[order], [moving.labels[i] for i in order])
    rows, report = evaluate_landmarks(_labelmap(), fixed, shuffled)
    assert [r.tre_mm for r in rows] == pytest.approx([c[3] for c in CASES])
    assert [r.moving_label for r in rows] == [r.label for r in rows]
    renamed = Landmarks(moving.points_lps, [f"M-{i + 1}" for i in range(len(CASES))])  # no label in common
    rows, _ = evaluate_landmarks(_labelmap(), fixed, renamed)
    assert [r.tre_mm for r in rows] == pytest.approx([c[3] for c in CASES])
    assert rows[0].moving_label == "M-1"


def test_unexpected_label_value_is_an_input_error():
    fixed, moving = _landmarks()
    image = _labelmap()
    image[1, 1, 1] = 7
    with pytest.raises(InputError, match=r"values \[7\]"):
        evaluate_landmarks(image, fixed, moving)


def test_rows_csv_round_trip(tmp_path):
    fixed, moving = _landmarks()
    rows, _ = evaluate_landmarks(_labelmap(), fixed, moving)
    path = write_rows_csv(rows, tmp_path / "out" / "rows.csv")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "label,x,y,z,tre_mm,true_class,predicted_class,agree,moving_label"
    assert lines[3].endswith(",correct,wrong,false,c") and lines[4].endswith(",wrong,outside,false,d")
    assert read_rows_csv(path) == rows
    # tables written before the moving_label column still read
    path.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n", encoding="utf-8")
    assert [r.moving_label for r in read_rows_csv(path)] == [""] * len(rows)


def test_read_rows_csv_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_rows_csv(tmp_path / "none.csv")
    (tmp_path / "cols.csv").write_text("label,x,y,z\n", encoding="utf-8")
    with pytest.raises(InputError, match="missing columns"):
        read_rows_csv(tmp_path / "cols.csv")
    row = LandmarkRow("a", (1.0, 2.0, 3.0), 1.0, 0, 0)
    path = write_rows_csv([row, row], tmp_path / "rows.csv")
    path.write_text(path.read_text(encoding="utf-8").replace("correct,correct,true,\n", "correct,maybe,true,\n", 1),
                    encoding="utf-8")
    with pytest.raises(InputError, match="line 2"):
        read_rows_csv(path)
