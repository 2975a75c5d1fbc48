"""Metrics against hand arithmetic on a worked example, and against scikit-learn."""

import json
import math

import numpy as np
import pytest

from RegistrationMisalignmentLib.metrics import (
    cohen_kappa,
    confusion_matrix,
    evaluate_classes,
    f1_per_class,
)

# Worked example: 10 samples, classes 0 correct, 1 poor, 2 wrong.
TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
PRED = [0, 0, 0, 1, 1, 1, 2, 2, 2, 0]


def test_confusion_matrix_worked_example():
    # true 0 -> predicted 0,0,0,1 ; true 1 -> 1,1,2 ; true 2 -> 2,2,0
    expected = np.array([[3, 1, 0],
                         [0, 2, 1],
                         [1, 0, 2]])
    np.testing.assert_array_equal(confusion_matrix(TRUE, PRED), expected)


def test_report_worked_example():
    r = evaluate_classes(TRUE, PRED)
    assert r.n == 10
    # accuracy = trace / n = (3 + 2 + 2) / 10
    assert r.accuracy == pytest.approx(0.7)
    # F1 = 2TP / (2TP + FP + FN)
    # correct: TP 3, FP (col 0) 1, FN (row 0) 1 -> 6 / 8
    # poor:    TP 2, FP 1, FN 1                  -> 4 / 6
    # wrong:   TP 2, FP 1, FN 1                  -> 4 / 6
    assert r.f1 == pytest.approx((0.75, 2 / 3, 2 / 3))
    assert r.mean_f1 == pytest.approx((0.75 + 2 / 3 + 2 / 3) / 3)
    # po = 0.7; row sums (4, 3, 3), column sums (4, 3, 3)
    # pe = (4*4 + 3*3 + 3*3) / 100 = 0.34; kappa = (0.7 - 0.34) / (1 - 0.34) = 0.36 / 0.66
    assert r.kappa == pytest.approx(0.36 / 0.66)
    # cw = cm[0, 2] + cm[2, 0] = 0 + 1
    assert r.cw == 1


def test_against_sklearn_on_random_labels():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    for _ in range(5):
        true = rng.integers(0, 3, size=500)
        pred = np.where(rng.random(500) < 0.6, true, rng.integers(0, 3, size=500))
        r = evaluate_classes(true, pred)
        np.testing.assert_array_equal(r.confusion, sk.confusion_matrix(true, pred, labels=[0, 1, 2]))
        assert r.accuracy == pytest.approx(sk.accuracy_score(true, pred))
        np.testing.assert_allclose(r.f1, sk.f1_score(true, pred, average=None, labels=[0, 1, 2]))
        assert r.mean_f1 == pytest.approx(sk.f1_score(true, pred, average="macro"))
        assert r.kappa == pytest.approx(sk.cohen_kappa_score(true, pred))
        assert r.cw == int(np.sum((true == 0) & (pred == 2)) + np.sum((true == 2) & (pred == 0)))


def test_f1_nan_for_absent_class_and_zero_for_missed_class():
    # class 1 never true and never predicted -> nan; class 0: TP 1, FN 1 -> 2/3; class 2: TP 1, FP 1 -> 2/3
    r = evaluate_classes([0, 0, 2], [0, 2, 2])
    assert r.f1[0] == pytest.approx(2 / 3) and math.isnan(r.f1[1]) and r.f1[2] == pytest.approx(2 / 3)
    assert r.mean_f1 == pytest.approx(2 / 3)  # nan-mean over the two defined classes
    assert r.cw == 1
    # class 2 is true once but never predicted -> F1 0, not nan
    f1 = f1_per_class(confusion_matrix([0, 2], [0, 0]))
    assert f1[2] == 0.0 and math.isnan(f1[1])


def test_undefined_scores_are_nan_and_none_in_json():
    empty = evaluate_classes([], [])
    assert empty.n == 0 and math.isnan(empty.accuracy) and math.isnan(empty.mean_f1) and math.isnan(empty.kappa)
    d = json.loads(json.dumps(empty.to_dict()))
    assert d["accuracy"] is None and d["f1"] == [None, None, None] and d["kappa"] is None
    # all samples one class, all predicted right: pe = 1, kappa undefined
    assert math.isnan(cohen_kappa(confusion_matrix([1, 1], [1, 1])))


def test_to_dict_and_table():
    r = evaluate_classes(TRUE, PRED)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["n"] == 10 and d["cw"] == 1 and d["confusion"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    assert d["f1"] == pytest.approx([0.75, 2 / 3, 2 / 3]) and d["class_names"] == ["correct", "poor", "wrong"]
    table = r.format_table()
    for text in ("accuracy", "70.0", "F1c", "75.0", "F1p", "66.7", "mean F1", "69.4", "kappa", "54.5", "cw"):
        assert text in table
    assert "30.0" in table  # confusion cell cm[0, 0] = 3 of 10


def test_confusion_rejects_bad_input():
    with pytest.raises(ValueError, match="length"):
        confusion_matrix([0, 1], [0])
    with pytest.raises(ValueError, match="classes"):
        confusion_matrix([0, 3], [0, 1])
