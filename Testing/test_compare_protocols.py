"""The paired bootstrap between two protocol studies scores both models on the same landmarks."""

import csv

import numpy as np
import pytest

from benchmarks.compare_protocols import compare, read_classes, report

FIELDS = ["case", "setting", "method", "label", "x", "y", "z", "tre_mm", "true_class", "predicted_class"]
NAMES = ("correct", "poor", "wrong")


def study(folder, true, predicted, settings=("affine", "bspline20")):
    """A landmarks.csv of one case: ``true`` / ``predicted`` class indices per landmark, the same in each setting."""
    folder.mkdir()
    with open(folder / "landmarks.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        for setting in reversed(settings):  # out of order: rows are matched by (case, setting, label)
            for label, (t, p) in enumerate(zip(true, predicted), 1):
                for method, guess in (("regmis_lstm_631", p), ("all-correct", 0)):
                    writer.writerow(dict(case="c0", setting=setting, method=method, label=label, x=0, y=0, z=0,
                                         tre_mm=1.0, true_class=NAMES[t], predicted_class=NAMES[guess]))
    return folder


@pytest.fixture
def truth():
    return np.random.default_rng(1).integers(0, 3, 60)


def test_the_same_classes_differ_by_nothing_in_every_draw(tmp_path, truth):
    noisy = np.where(np.arange(60) % 3 == 0, (truth + 1) % 3, truth)
    a, b = (read_classes(study(tmp_path / n, truth, noisy), "regmis_lstm_631") for n in "ab")
    for scope, base, cand in compare(a, b, 50, 0):
        assert np.array_equal(base, cand)
        assert base[1:, 0].std() > 0  # the draws do vary the scores


def test_a_candidate_that_mends_the_baselines_mistakes_is_better_in_every_draw(tmp_path, truth):
    wrong = np.where(np.arange(60) % 2 == 0, 2 - truth, truth)  # correct <-> wrong swaps on every other landmark
    mended = np.where(np.arange(60) % 4 == 0, 2 - truth, truth)
    base, cand = read_classes(study(tmp_path / "a", truth, wrong), "regmis_lstm_631"), read_classes(
        study(tmp_path / "b", truth, mended), "regmis_lstm_631")
    scopes = compare(base, cand, 200, 0)
    assert [s for s, _, _ in scopes] == ["all settings", "affine", "bspline20"]  # the protocol's order
    for _, b, c in scopes:
        assert (c[:, 0] >= b[:, 0]).all() and (c[:, 1] >= b[:, 1]).all() and (c[:, 2] <= b[:, 2]).all()
        assert c[0, 1] > b[0, 1]
    text = report(tmp_path / "a", tmp_path / "b", "regmis_lstm_631", 200, 0)
    assert "| all settings | 120 |" in text


def test_studies_of_other_landmarks_or_without_the_method_are_refused(tmp_path, truth):
    base = read_classes(study(tmp_path / "a", truth, truth), "regmis_lstm_631")
    other = read_classes(study(tmp_path / "b", (truth + 1) % 3, truth), "regmis_lstm_631")
    with pytest.raises(ValueError, match="landmarks' true"):
        compare(base, other, 10, 0)
    with pytest.raises(ValueError, match="no row of 'regnet'"):
        read_classes(tmp_path / "a", "regnet")
