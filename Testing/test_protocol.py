"""``regmis benchmark``: the protocol end to end on tiny phantoms, the report against a recomputation
from its own per-landmark CSV, the residual formula, the elastix files and the external-data adapters."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from RegistrationMisalignmentLib.cli import main
from RegistrationMisalignmentLib.config import CLASS_NAMES, DEFAULT_CONFIG
from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.inference import cpu_has_native_bf16
from RegistrationMisalignmentLib.landmarks import Landmarks, write_landmarks
from RegistrationMisalignmentLib.metrics import evaluate_classes
from RegistrationMisalignmentLib.benchmark.cases import LandmarkTruth, SyntheticTruth, sample_lung_landmarks
from RegistrationMisalignmentLib.benchmark.datasets import find_dirlab_cases, load_case, read_pairs_csv
from RegistrationMisalignmentLib.benchmark.elastix import ELASTIX_DIR, SETTINGS, parse_settings

REPO = Path(__file__).resolve().parents[1]
needs_elastix = pytest.mark.skipif(importlib.util.find_spec("itk") is None,
                                   reason="itk-elastix is not installed (pip install -e '.[dev]')")
METHODS = ("test_lstm", "test_regnet_t", "test_singlescale", "elastix-t", "all-correct")
TIMED = METHODS[:-1]
"""The trivial all-correct answer takes no time."""
POPI = Path(__file__).resolve().parents[2] / "shared" / "data" / "popi_00_chest_ct.nii.gz"
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


# ---- the CI-size study ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    code = main(["benchmark", "--phantom", "--cases", "2", "--tiny", "--out", str(out),
                 "--models-dir", str(model_dir), "--device", "cpu"])
    return code, out


@needs_elastix
def test_tiny_phantom_study_writes_the_whole_report(tiny_run):
    code, out = tiny_run
    assert code == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert set(report["methods"]) == set(METHODS)
    for name in ["report.md", "landmarks.csv", "mean_f1_by_setting.png", "overlay.png",
                 *report["figures"]["confusion"].values()]:
        assert (out / name).stat().st_size > 0, name
    assert len(report["cases"]) == 2 and all(c["landmarks"] == 300 for c in report["cases"])
    for case in report["cases"]:  # runtime per case, per setting and per method
        assert set(case["seconds"]["registration"]) == set(SETTINGS)
        assert all(set(case["seconds"]["methods"][m]) == set(SETTINGS) for m in METHODS)
        assert case["seconds"]["total"] > 0
    assert all(report["runtime"]["methods"][m]["total_s"] > 0 for m in TIMED)
    rows = _csv_rows(out / "landmarks.csv")
    assert {r["predicted_class"] for r in rows if r["method"] == "all-correct"} == {"correct"}
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "`regmis benchmark --phantom --cases 2 --landmarks 300 --tiny" in text
    assert "published (not re-measured)" in text and "| 73.1 | 77 |" in text  # LSTM row, all settings
    assert report["published"]["all"]["regnet-t"]["cw"] == 197
    precision = report["environment"]["network_precision"]  # bf16 and float32 labels differ at ~1 % of voxels
    assert precision == ("bf16" if cpu_has_native_bf16() else "float32") and f"network in {precision})" in text


def _csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@needs_elastix
def test_report_numbers_equal_a_recomputation_from_the_csv(tiny_run):
    _, out = tiny_run
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    rows = _csv_rows(out / "landmarks.csv")
    assert len(rows) == 2 * 300 * len(SETTINGS) * len(METHODS)
    index = {name: i for i, name in enumerate(CLASS_NAMES)}
    true_from_tre = DEFAULT_CONFIG.classify_mm(np.array([float(r["tre_mm"]) for r in rows]))
    assert [CLASS_NAMES[c] for c in true_from_tre] == [r["true_class"] for r in rows]
    for method in METHODS:
        for setting in [*SETTINGS, "all"]:
            mine = [r for r in rows if r["method"] == method and setting in ("all", r["setting"])]
            recomputed = evaluate_classes(np.array([index[r["true_class"]] for r in mine]),
                                          np.array([index[r["predicted_class"]] for r in mine])).to_dict()
            assert report["results"][method][setting] == recomputed, (method, setting)
            if method == METHODS[0]:  # every landmark is predicted, so the truth is the confusion's rows
                assert report["truth"][setting]["counts"] == np.sum(recomputed["confusion"], axis=1).tolist()
    text = (out / "report.md").read_text(encoding="utf-8")
    for method in METHODS:  # the Markdown shows the same mean F1 over all settings
        mean_f1 = report["results"][method]["all"]["mean_f1"]
        row = next(line for line in text.splitlines() if line.startswith(f"| {method} |"))
        assert f"| {100 * mean_f1:.1f} |" in row


@needs_elastix
def test_a_stopped_study_keeps_its_finished_cases_and_resumes_from_them(model_dir, tmp_path, monkeypatch, capsys):
    import RegistrationMisalignmentLib.benchmark.study as protocol

    out = tmp_path / "study"
    args = ["benchmark", "--phantom", "--cases", "2", "--tiny", "--settings", "affine,bspline20", "--out", str(out),
            "--models-dir", str(model_dir), "--device", "cpu"]
    real_run_case, calls = protocol.run_case, []

    def stopped_after_one_case(*a, **k):
        calls.append(a[0].name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run_case(*a, **k)

    monkeypatch.setattr(protocol, "run_case", stopped_after_one_case)
    assert main(args) == 130
    assert "--resume" in capsys.readouterr().err
    partial = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert not partial["complete"] and partial["cases_planned"] == 2 and len(partial["cases"]) == 1
    assert "Unfinished: 1 of 2 cases" in (out / "report.md").read_text(encoding="utf-8")
    partial_rows = _csv_rows(out / "landmarks.csv")
    assert len(partial_rows) == 300 * 2 * len(METHODS)  # two settings

    assert main(args) == 2  # not overwritten without --resume
    assert "unfinished study (1 of 2 cases" in capsys.readouterr().err
    assert main([*args, "--resume", "--landmarks", "200"]) == 2  # nor resumed as another study
    assert "differs in landmarks" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["cases"] == partial["cases"]

    calls.clear()
    assert main([*args, "--resume"]) == 0
    assert len(calls) == 1  # only the second case was computed
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["complete"] and [c["name"] for c in report["cases"]] == [partial["cases"][0]["name"], calls[0]]
    assert report["cases"][0] == partial["cases"][0]
    assert "--resume" not in report["command"] and "Unfinished" not in (out / "report.md").read_text(encoding="utf-8")
    assert report["figures"]["overlay"] == "overlay.png" and (out / "overlay.png").is_file()
    rows = _csv_rows(out / "landmarks.csv")
    assert rows[: len(partial_rows)] == partial_rows and len(rows) == 2 * len(partial_rows)
    assert report["runtime"]["total_s"] == pytest.approx(sum(c["seconds"]["total"] for c in report["cases"]))


@needs_elastix
@pytest.mark.skipif(not POPI.is_file(), reason="the held-out chest CT is not in ../shared/data")
def test_tiny_chest_ct_study_moves_the_held_out_scan_by_breathing(model_dir, tmp_path):
    out = tmp_path / "chest"
    code = main(["benchmark", "--real-ct", "--cases", "1", "--landmarks", "3", "--tiny", "--settings",
                 "affine,bspline20", "--out", str(out), "--models-dir", str(model_dir), "--device", "cpu",
                 "--tile-size", "64"])
    assert code == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["study"] == "chest-ct" and report["held_out_scan"] == "popi_00_chest_ct.nii.gz"
    assert report["command"].startswith("regmis benchmark --chest-ct --cases 1 --landmarks 3 --settings affine,bspline20 --tiny")
    assert "--tile-size 64" in report["command"] and set(report["methods"]) == set(METHODS)
    [case] = report["cases"]
    assert case["name"] == "popi00_breathing7030000" and case["size"] == [32, 32, 32] and case["landmarks"] == 3
    assert "POPI-model phase 00" in case["description"] and "sliding" in case["description"]
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "Held-out scan: `popi_00_chest_ct.nii.gz`, never trained on" in text
    rows = _csv_rows(out / "landmarks.csv")
    assert len(rows) == 3 * 2 * len(METHODS)
    # The landmarks lie in the POPI scan's own physical space (the box keeps its place in the scan).
    scan = sitk.ReadImage(str(POPI))
    lower = np.array(scan.GetOrigin())
    upper = lower + np.array(scan.GetSize()) * np.array(scan.GetSpacing())
    points = np.array([[float(r[k]) for k in "xyz"] for r in rows])
    assert (points > lower).all() and (points < upper).all()


# ---- the truth: residual of a registration composed with the known DVF ----------------------
def test_synthetic_residual_composes_the_registration_with_the_known_dvf():
    reference = sitk.Image([12, 10, 8], sitk.sitkFloat32)
    reference.SetSpacing((1.5, 1.0, 2.0))
    reference.SetOrigin((10.0, -5.0, 3.0))
    t = np.array([2.0, -1.0, 0.5])
    constant = SyntheticTruth(np.broadcast_to(t[:, None, None, None], (3, 8, 10, 12)).copy(), reference)
    points = np.array([[16.0, 0.0, 9.0], [20.5, -2.0, 11.0]])
    # M(y) = I(y + t): the perfect registration T(x) = x - t leaves nothing; no registration leaves |t|.
    np.testing.assert_allclose(constant.residual_mm(points, lambda p: p - t), 0.0, atol=1e-9)
    np.testing.assert_allclose(constant.residual_mm(points, lambda p: p), np.linalg.norm(t))
    s = np.array([0.0, 3.0, 0.0])
    np.testing.assert_allclose(constant.residual_mm(points, lambda p: p + s), np.linalg.norm(s + t))
    # A linear field u(y) = A y + b (trilinear interpolation is exact): u is read at T(x), not at x.
    a = np.diag([0.1, -0.05, 0.2])
    b = np.array([0.3, 0.0, -0.4])
    k, j, i = np.meshgrid(*(np.arange(n) for n in (8, 10, 12)), indexing="ij")
    grid = np.stack([10.0 + 1.5 * i, -5.0 + 1.0 * j, 3.0 + 2.0 * k], axis=-1)  # physical (x, y, z)
    linear = SyntheticTruth(np.moveaxis(grid @ a.T + b, -1, 0), reference)
    mapped = points + s
    np.testing.assert_allclose(linear.residual_mm(points, lambda p: p + s),
                               np.linalg.norm(mapped + mapped @ a.T + b - points, axis=1), atol=1e-9)


@needs_elastix
def test_elastix_recovers_a_known_translation_and_the_truth_sees_it():
    from RegistrationMisalignmentLib.benchmark.cases import TINY_SIZE_MM
    from RegistrationMisalignmentLib.benchmark.elastix import ElastixRunner
    from RegistrationMisalignmentLib.synthetic.phantom import make_chest_phantom

    fixed = make_chest_phantom(TINY_SIZE_MM, 1.0, seed=7_500_000)
    shift = 3  # voxels = mm along x: M(y) = I(y + t), t = (3, 0, 0)
    array = sitk.GetArrayFromImage(fixed)
    moving_array = np.full_like(array, -1000.0)
    moving_array[..., :-shift] = array[..., shift:]
    moving = sitk.GetImageFromArray(moving_array)
    moving.CopyInformation(fixed)
    truth = SyntheticTruth(np.broadcast_to(np.array([shift, 0.0, 0.0])[:, None, None, None],
                                           (3, *array.shape)).copy(), fixed)
    points = sample_lung_landmarks(fixed, 50, seed=1, name="translated phantom").points_lps
    np.testing.assert_allclose(truth.residual_mm(points, lambda p: p), shift)
    registration = ElastixRunner(tiny=True).register(fixed, moving, "affine.txt")
    np.testing.assert_allclose(registration.map_points(points) - points, [[-shift, 0, 0]] * len(points), atol=0.5)
    assert truth.residual_mm(points, registration.map_points).max() < 0.5


# ---- elastix parameter files and settings ---------------------------------------------------
def test_elastix_files_follow_the_protocol():
    def settings_lines(text: str) -> list[str]:
        return [line for line in text.splitlines()
                if not line.startswith("//") and "MaximumNumberOfIterations" not in line]

    bspline = {n: (ELASTIX_DIR / f"bspline{n}.txt").read_text(encoding="utf-8") for n in (20, 100, 500, 2000)}
    for n, text in bspline.items():  # the four B-spline settings differ only in their iterations
        assert f"(MaximumNumberOfIterations {n})" in text
        assert settings_lines(text) == settings_lines(bspline[2000])
    for name in ("affine.txt", "bspline500.txt", "elastix_t.txt"):
        text = (ELASTIX_DIR / name).read_text(encoding="utf-8")
        for line in ('(Metric "AdvancedMattesMutualInformation")', '(Optimizer "AdaptiveStochasticGradientDescent")',
                     "(NumberOfResolutions 3)"):
            assert line in text, (name, line)
    assert '(Transform "AffineTransform")' in (ELASTIX_DIR / "affine.txt").read_text(encoding="utf-8")
    assert '(Transform "BSplineTransform")' in (ELASTIX_DIR / "elastix_t.txt").read_text(encoding="utf-8")


def test_settings_are_parsed_in_protocol_order_and_unknown_ones_refused(model_dir, tmp_path, capsys):
    assert parse_settings("bspline2000, affine") == ("affine", "bspline2000")
    code = main(["benchmark", "--phantom", "--settings", "affine,bspline7", "--out", str(tmp_path),
                 "--models-dir", str(model_dir)])
    assert code == 2
    err = capsys.readouterr().err
    assert "bspline7" in err and "affine,bspline20,bspline100,bspline500,bspline2000" in err


def test_the_benchmark_script_is_the_cli():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "evaluate_protocol.py"), "--help"],
                            capture_output=True, text=True, encoding="utf-8", check=False)
    assert result.returncode == 0 and "--chest-ct" in result.stdout and "--dirlab" in result.stdout
    assert "--real-ct" in result.stdout  # the old name of the real-CT study still works


# ---- external data: DIR-Lab and pairs --------------------------------------------------------
AIR_RAW, TISSUE_RAW = 24, 1064  # stored = HU + 1024: -1000 HU and 40 HU
SMALL = ((6, 5, 4), (1.0, 1.0, 2.5))


def write_img(path: Path, bright_ijk: tuple[int, int, int], dtype: str = "<i2") -> None:
    """A headerless DIR-Lab-like volume of SMALL size: air, one tissue voxel at file index (i, j, k)."""
    (nx, ny, nz), _ = SMALL
    values = np.full((nz, ny, nx), AIR_RAW, dtype=dtype)
    i, j, k = bright_ijk
    values[k, j, i] = TISSUE_RAW
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(values.tobytes())


def test_dirlab_4dct_case_keeps_landmarks_on_their_voxels_through_the_flip(tmp_path):
    write_img(tmp_path / "Case1Pack" / "Images" / "case1_T00_s.img", (2, 3, 0))
    write_img(tmp_path / "Case1Pack" / "Images" / "case1_T50_s.img", (3, 1, 1))
    marks = tmp_path / "Case1Pack" / "ExtremePhases"
    marks.mkdir()
    (marks / "case1_300_T00_xyz.txt").write_text("3\t4\t1\n", encoding="utf-8")  # 1-based indices of the file
    (marks / "case1_300_T50_xyz.txt").write_text("4\t2\t2\n", encoding="utf-8")
    [files] = find_dirlab_cases(tmp_path, tables={"DIR-Lab 4DCT": {1: SMALL}})
    case = load_case(files)
    assert case.name == "case1" and case.fixed.GetSize() == (6, 5, 4) and case.fixed.GetSpacing() == (1.0, 1.0, 2.5)
    for image, points in ((case.fixed, case.landmarks), (case.moving, case.truth.moving)):
        values = sitk.GetArrayFromImage(image)
        at = image.TransformPhysicalPointToIndex(tuple(points.points_lps[0]))
        assert image[at] == 40.0 and np.sum(values == 40.0) == 1 and values.min() == -1000.0
    # Slice 0 of the file is the head end: file slice k is flipped slice 4 - 1 - k, at z = 2.5 * (3 - k).
    np.testing.assert_allclose(case.landmarks.points_lps, [[2.0, 3.0, 7.5]])
    np.testing.assert_allclose(case.truth.moving.points_lps, [[3.0, 1.0, 5.0]])
    np.testing.assert_allclose(case.truth.residual_mm(case.landmarks.points_lps, lambda p: p),
                               [np.linalg.norm([1.0, -2.0, -2.5])])


def test_copdgene_names_and_big_endian_files_are_read(tmp_path):
    write_img(tmp_path / "copd1" / "copd1_iBHCT.img", (1, 1, 1), dtype=">i2")
    write_img(tmp_path / "copd1" / "copd1_eBHCT.img", (1, 1, 2), dtype=">i2")
    (tmp_path / "copd1" / "copd1_300_iBH_xyz_r1.txt").write_text("2 2 2\n", encoding="utf-8")
    (tmp_path / "copd1" / "copd1_300_eBH_xyz_r1.txt").write_text("2 2 3\n", encoding="utf-8")
    [files] = find_dirlab_cases(tmp_path, tables={"DIR-Lab COPDgene": {1: SMALL}})
    case = load_case(files)
    assert case.name == "copd1"
    assert case.fixed[case.fixed.TransformPhysicalPointToIndex(tuple(case.landmarks.points_lps[0]))] == 40.0


def test_dirlab_files_of_the_wrong_size_are_refused(tmp_path):
    write_img(tmp_path / "case1_T00_s.img", (0, 0, 0))
    write_img(tmp_path / "case1_T50_s.img", (0, 0, 0))
    (tmp_path / "case1_300_T00_xyz.txt").write_text("1 1 1\n", encoding="utf-8")
    (tmp_path / "case1_300_T50_xyz.txt").write_text("1 1 1\n", encoding="utf-8")
    [files] = find_dirlab_cases(tmp_path)  # the public table: case 1 is 256 x 256 x 94
    with pytest.raises(InputError, match="256 x 256 x 94|12320768 bytes"):
        load_case(files)


def test_an_incomplete_dirlab_folder_lists_what_is_missing(tmp_path, model_dir, capsys):
    write_img(tmp_path / "case2_T00_s.img", (0, 0, 0))
    (tmp_path / "case2_300_T00_xyz.txt").write_text("1 1 1\n", encoding="utf-8")
    code = main(["benchmark", "--dirlab", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--models-dir", str(model_dir)])
    assert code == 2
    err = capsys.readouterr().err
    assert "case 2 is incomplete" in err and "case2_T50_s.img" in err and "case2_300_T50_xyz.txt" in err
    assert "case2_T00_s.img" not in err.split("missing:")[1]
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DIR-Lab case found"):
        find_dirlab_cases(tmp_path / "empty")


def test_pairs_csv_reads_any_images_and_landmarks_and_lists_missing_files(tmp_path):
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32))
    image.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(image, str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(image, str(tmp_path / "m.nrrd"))
    write_landmarks(Landmarks([[1.0, 1.0, 2.0], [2.0, 2.0, 4.0]], ["a", "b"]), tmp_path / "f.csv")
    write_landmarks(Landmarks([[1.0, 2.0, 2.0], [2.0, 2.0, 6.0]], ["a", "b"]), tmp_path / "m.mrk.json")
    table = tmp_path / "pairs.csv"
    table.write_text("case,fixed,moving,fixed_landmarks,moving_landmarks\nA,f.nii.gz,m.nrrd,f.csv,m.mrk.json\n", encoding="utf-8")
    [files] = read_pairs_csv(table)
    case = load_case(files)
    assert isinstance(case.truth, LandmarkTruth) and len(case.landmarks) == 2
    np.testing.assert_allclose(case.truth.residual_mm(case.landmarks.points_lps, lambda p: p), [1.0, 2.0])
    table.write_text("case,fixed,moving,fixed_landmarks,moving_landmarks\nA,f.nii.gz,m.nrrd,f.csv,m.mrk.json\n"
                     "B,f.nii.gz,gone.nii.gz,f.csv,m.mrk.json\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"line 3 \(case 'B'\) misses moving .*gone\.nii\.gz"):
        read_pairs_csv(table)


def test_a_reports_command_names_the_synthetic_studys_case_count_even_by_default():
    """So that a report made under an earlier default still reproduces itself after the default changes."""
    from RegistrationMisalignmentLib.benchmark.study import DEFAULT_CHEST_CASES, BenchmarkOptions

    assert f"--chest-ct --cases {DEFAULT_CHEST_CASES} --landmarks" in BenchmarkOptions("chest-ct").command()
    assert "--phantom --cases 10 --landmarks" in BenchmarkOptions("phantom").command()
    assert "--cases 3" in BenchmarkOptions("chest-ct", cases=3).command()
    assert "--cases" not in BenchmarkOptions("dirlab", source="data").command()  # external: every case found
