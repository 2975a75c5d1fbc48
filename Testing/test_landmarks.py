"""Landmark files (RAS/LPS), DIR-Lab indices, transforms, residual TRE and labelmap sampling."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.landmarks import (
    Landmarks,
    lps_to_ras,
    ras_to_lps,
    read_landmarks,
    read_transform,
    residual_tre,
    sample_labelmap,
    write_landmarks,
)

LPS = np.array([[10.0, -20.0, 30.5], [-1.25, 2.0, -3.0]])
RAS = np.array([[-10.0, 20.0, 30.5], [1.25, -2.0, -3.0]])


def _markups(points, system=None):
    markup = {"type": "Fiducial", "controlPoints": [
        {"id": str(i), "label": f"F-{i}", "position": list(p), "positionStatus": "defined"}
        for i, p in enumerate(points)]}
    if system:
        markup["coordinateSystem"] = system
    return json.dumps({"markups": [markup]})


def test_ras_lps_flip_is_its_own_inverse():
    np.testing.assert_array_equal(ras_to_lps(RAS), LPS)
    np.testing.assert_array_equal(lps_to_ras(ras_to_lps(RAS)), RAS)
    np.testing.assert_array_equal(ras_to_lps(np.array([1.0, 2.0, 3.0])), [-1.0, -2.0, 3.0])


def test_mrk_json_ras_and_lps_give_same_points(tmp_path):
    (tmp_path / "ras.mrk.json").write_text(_markups(RAS, "RAS"), encoding="utf-8")
    (tmp_path / "lps.mrk.json").write_text(_markups(LPS, "LPS"), encoding="utf-8")
    (tmp_path / "default.mrk.json").write_text(_markups(LPS), encoding="utf-8")  # no tag: LPS, as current Slicer writes
    for name in ("ras", "lps", "default"):
        lm = read_landmarks(tmp_path / f"{name}.mrk.json")
        np.testing.assert_allclose(lm.points_lps, LPS)
        assert lm.labels == ["F-0", "F-1"]


def test_fcsv_ras(tmp_path):
    path = tmp_path / "p.fcsv"
    path.write_text(
        "# Markups fiducial file version = 4.11\n"
        "# CoordinateSystem = RAS\n"
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        "vtkMRMLMarkupsFiducialNode_0,-10,20,30.5,0,0,0,1,1,1,0,A,,\n"
        "vtkMRMLMarkupsFiducialNode_1,1.25,-2,-3,0,0,0,1,1,1,0,B,,\n", encoding="utf-8")
    lm = read_landmarks(path)
    np.testing.assert_allclose(lm.points_lps, LPS)
    assert lm.labels == ["A", "B"]
    path.write_text(path.read_text(encoding="utf-8").replace("CoordinateSystem = RAS", "CoordinateSystem = 0"),
                    encoding="utf-8")
    np.testing.assert_allclose(read_landmarks(path).points_lps, LPS)


def test_dirlab_txt_uses_reference_geometry(tmp_path):
    ref = sitk.Image(8, 9, 10, sitk.sitkInt16)
    ref.SetSpacing((0.97, 0.97, 2.5))
    ref.SetOrigin((-120.0, 35.0, 12.5))
    ref.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    path = tmp_path / "case1_300.txt"
    path.write_text("1\t1\t1\n2\t3\t4\n\n", encoding="utf-8")
    lm = read_landmarks(path, reference=ref)
    # (1,1,1) is voxel 0 -> the origin; (2,3,4) -> origin + D @ (spacing * (1, 2, 3))
    expected = [[-120.0, 35.0, 12.5], [-120.0 + 0.97, 35.0 - 2 * 0.97, 12.5 + 3 * 2.5]]
    np.testing.assert_allclose(lm.points_lps, expected)
    assert lm.labels == ["1", "2"]
    with pytest.raises(InputError, match="reference"):
        read_landmarks(path)


def test_plain_csv(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("label,x,y,z\nA,10,-20,30.5\nB,-1.25,2,-3\n", encoding="utf-8")
    lm = read_landmarks(path)
    np.testing.assert_allclose(lm.points_lps, LPS)
    assert lm.labels == ["A", "B"]


@pytest.mark.parametrize("name,system", [("p.mrk.json", "LPS"), ("p.mrk.json", "RAS"), ("p.fcsv", "LPS"),
                                         ("p.fcsv", "RAS"), ("p.csv", "LPS")])
def test_write_read_round_trip(tmp_path, name, system):
    lm = Landmarks(LPS + 1e-9, ["first, with comma", "B"])
    path = write_landmarks(lm, tmp_path / name, coordinate_system=system)
    back = read_landmarks(path)
    np.testing.assert_allclose(back.points_lps, lm.points_lps, rtol=0, atol=1e-12)
    assert back.labels == lm.labels
    if name.endswith(".json"):
        assert json.loads(path.read_text(encoding="utf-8"))["markups"][0]["coordinateSystem"] == system


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_landmarks(tmp_path / "missing.fcsv")
    (tmp_path / "p.xyz").write_text("1 2 3\n", encoding="utf-8")
    with pytest.raises(InputError, match="unknown landmark file type"):
        read_landmarks(tmp_path / "p.xyz")
    (tmp_path / "bad.csv").write_text("label,x,y,z\nA,1,2,3\nB,1,two,3\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 3"):
        read_landmarks(tmp_path / "bad.csv")
    (tmp_path / "bad.fcsv").write_text("# CoordinateSystem = LPS\nid0,1,2,3,0,0,0,1,1,1,0,A,,\nid1,1,x,3\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 3"):
        read_landmarks(tmp_path / "bad.fcsv")
    (tmp_path / "bad.txt").write_text("1 2 3\n4 5\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 2"):
        read_landmarks(tmp_path / "bad.txt", reference=sitk.Image(4, 4, 4, sitk.sitkUInt8))
    (tmp_path / "bad.mrk.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="markups"):
        read_landmarks(tmp_path / "bad.mrk.json")
    with pytest.raises(InputError, match="cannot write"):
        write_landmarks(Landmarks(LPS, ["A", "B"]), tmp_path / "p.txt")


# ---- transforms and TRE ----------------------------------------------------------------------
FIXED = Landmarks(np.array([[0.0, 0.0, 0.0], [10.0, 5.0, -2.0], [3.0, 3.0, 3.0]]), ["a", "b", "c"])


def test_residual_tre_without_transform():
    moving = Landmarks(FIXED.points_lps + [[3, 4, 0], [0, 0, 0], [0, 0, -2]], FIXED.labels)
    np.testing.assert_allclose(residual_tre(FIXED, moving), [5.0, 0.0, 2.0])


def test_residual_tre_translation():
    t = sitk.TranslationTransform(3, (1.0, 2.0, 2.0))
    moving = Landmarks(FIXED.points_lps + [1.0, 2.0, 2.0], FIXED.labels)
    np.testing.assert_allclose(residual_tre(FIXED, moving, t), 0.0, atol=1e-12)
    np.testing.assert_allclose(residual_tre(FIXED, FIXED, t), 3.0)  # |(1, 2, 2)|


def test_residual_tre_affine_from_file(tmp_path):
    t = sitk.AffineTransform(3)
    t.SetMatrix((0, -1, 0, 1, 0, 0, 0, 0, 1))  # 90 degrees about z
    t.SetTranslation((5.0, 0.0, 0.0))
    sitk.WriteTransform(t, str(tmp_path / "a.tfm"))
    read = read_transform(tmp_path / "a.tfm")
    # T(x, y, z) = (-y + 5, x, z); moving = T(fixed) + (0, 0, 1)
    mapped = np.array([[5.0, 0.0, 0.0], [0.0, 10.0, -2.0], [2.0, 3.0, 3.0]])
    moving = Landmarks(mapped + [0.0, 0.0, 1.0], FIXED.labels)
    np.testing.assert_allclose(residual_tre(FIXED, moving, read), 1.0)


def test_residual_tre_displacement_field_file(tmp_path):
    disp = np.zeros((12, 12, 12, 3))
    disp[..., 0], disp[..., 1], disp[..., 2] = 0.0, 3.0, 4.0  # (x, y, z) components, LPS mm
    field = sitk.GetImageFromArray(disp, isVector=True)
    field.SetOrigin((-5.0, -5.0, -5.0))
    field.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(field, str(tmp_path / "dvf.mha"))
    t = read_transform(tmp_path / "dvf.mha")
    assert isinstance(t, sitk.DisplacementFieldTransform)
    np.testing.assert_allclose(residual_tre(FIXED, FIXED, t), 5.0)
    moving = Landmarks(FIXED.points_lps + [0.0, 3.0, 4.0], FIXED.labels)
    np.testing.assert_allclose(residual_tre(FIXED, moving, t), 0.0, atol=1e-9)


def test_transform_and_tre_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_transform(tmp_path / "none.tfm")
    (tmp_path / "bad.tfm").write_text("garbage\n", encoding="utf-8")
    with pytest.raises(InputError, match="transform"):
        read_transform(tmp_path / "bad.tfm")
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkFloat32), str(tmp_path / "scalar.mha"))
    with pytest.raises(InputError, match="3-component"):
        read_transform(tmp_path / "scalar.mha")
    with pytest.raises(InputError, match="3 and 2 points"):
        residual_tre(FIXED, Landmarks(FIXED.points_lps[:2], ["a", "b"]))


def test_sample_labelmap_nearest_and_outside():
    lab = sitk.Image(4, 5, 6, sitk.sitkUInt8)
    lab.SetSpacing((2.0, 1.0, 3.0))
    lab.SetOrigin((10.0, 0.0, -3.0))
    lab[3, 1, 2] = 3  # physical (16, 1, 3)
    lab[0, 0, 0] = 1  # physical (10, 0, -3)
    points = np.array([[16.4, 1.3, 3.9],     # nearest voxel (3, 1, 2)
                       [9.2, -0.4, -4.4],    # nearest voxel (0, 0, 0)
                       [17.2, 1.0, 3.0],     # index 3.6 -> 4: beyond the last column
                       [0.0, 0.0, 0.0]])     # far outside
    np.testing.assert_array_equal(sample_labelmap(lab, points), [3, 1, 0, 0])


# ---- files as editors save them (issue: traps from a newcomer's probe) ---------------------------
CSV_TEXT = "label,x,y,z\nLungé 1,10.0,-20.0,30.5\nP2,-1.25,2.0,-3.0\n"


@pytest.mark.parametrize("encoding", ["utf-8-sig", "cp1252", "utf-16"])
def test_landmark_files_read_in_the_encodings_editors_save(tmp_path, encoding):
    """Excel's "CSV UTF-8" (byte-order mark), Excel's plain CSV (Windows-1252), Notepad's "Unicode" (UTF-16)."""
    (tmp_path / "a.csv").write_text(CSV_TEXT, encoding=encoding)
    landmarks = read_landmarks(tmp_path / "a.csv")
    assert landmarks.labels == ["Lungé 1", "P2"] and np.allclose(landmarks.points_lps, LPS)
    fcsv = "# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n" \
           "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n" \
           "1,10.0,-20.0,30.5,0,0,0,1,1,1,0,Lungé 1,,\r\n2,-1.25,2.0,-3.0,0,0,0,1,1,1,0,P2,,\r\n"
    (tmp_path / "a.fcsv").write_text(fcsv, encoding=encoding)
    assert np.allclose(read_landmarks(tmp_path / "a.fcsv").points_lps, LPS)
    (tmp_path / "a.mrk.json").write_text(_markups(LPS, "LPS"), encoding=encoding)
    assert np.allclose(read_landmarks(tmp_path / "a.mrk.json").points_lps, LPS)
    reference = sitk.Image([40, 40, 40], sitk.sitkInt16)
    (tmp_path / "a.txt").write_text("1 2 3\n4 5 6\n", encoding=encoding)
    assert np.allclose(read_landmarks(tmp_path / "a.txt", reference).points_lps, [[0, 1, 2], [3, 4, 5]])


def test_a_csv_from_a_comma_decimal_locale_and_a_capitalised_header_read(tmp_path):
    (tmp_path / "semi.csv").write_text("Label;X;Y;Z\nP1;10,0;-20;30,5\nP2;-1,25;2,0;-3\n", encoding="utf-8")
    assert np.allclose(read_landmarks(tmp_path / "semi.csv").points_lps, LPS)
    (tmp_path / "caps.csv").write_text("LABEL,X,Y,Z\nP1,10,-20,30.5\nP2,-1.25,2,-3\n", encoding="utf-8")
    assert np.allclose(read_landmarks(tmp_path / "caps.csv").points_lps, LPS)


def test_an_empty_landmark_file_is_refused(tmp_path):
    (tmp_path / "empty.fcsv").write_text("# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n",
                                         encoding="utf-8")
    (tmp_path / "empty.mrk.json").write_text(_markups([], "LPS"), encoding="utf-8")
    (tmp_path / "empty.csv").write_text("label,x,y,z\n", encoding="utf-8")
    for name in ("empty.fcsv", "empty.mrk.json", "empty.csv"):
        with pytest.raises(InputError, match="holds no landmark"):
            read_landmarks(tmp_path / name)


def test_a_markups_file_is_read_for_its_one_point_list(tmp_path):
    line = {"type": "Line", "coordinateSystem": "LPS", "controlPoints": [
        {"label": "L-1", "position": [0, 0, 0]}, {"label": "L-2", "position": [1, 1, 1]}]}
    points = json.loads(_markups(LPS, "LPS"))
    (tmp_path / "mixed.mrk.json").write_text(json.dumps({"markups": [line, points["markups"][0]]}), encoding="utf-8")
    assert read_landmarks(tmp_path / "mixed.mrk.json").labels == ["F-0", "F-1"]  # the line's ends are not landmarks
    (tmp_path / "line.mrk.json").write_text(json.dumps({"markups": [line]}), encoding="utf-8")
    with pytest.raises(InputError, match="no point list among its markups .*Line \\(2 points\\)"):
        read_landmarks(tmp_path / "line.mrk.json")
    (tmp_path / "two.mrk.json").write_text(json.dumps({"markups": [points["markups"][0]] * 2}), encoding="utf-8")
    with pytest.raises(InputError, match="2 point lists"):
        read_landmarks(tmp_path / "two.mrk.json")


def test_a_vector_image_as_labelmap_and_a_2d_transform_are_refused(tmp_path):
    probabilities = sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3)
    with pytest.raises(InputError, match="3-component voxels.*--probabilities"):
        sample_labelmap(probabilities, LPS)
    sitk.WriteTransform(sitk.AffineTransform(2), str(tmp_path / "affine2d.tfm"))
    with pytest.raises(InputError, match="a 2-D transform; a 3-D registration transform is needed"):
        read_transform(tmp_path / "affine2d.tfm")


def test_landmarks_outside_a_displacement_fields_grid_are_refused():
    """ITK applies no displacement there: the TRE would ignore the registration."""
    field = sitk.Image([20, 30, 20], sitk.sitkVectorFloat64, 3)
    field.SetOrigin((-5.0, -25.0, -5.0))
    transform = sitk.DisplacementFieldTransform(field)  # covers x -5..14, y -25..4, z -5..14 mm: not z = 30.5
    with pytest.raises(InputError, match=r"1 of the 2 fixed landmarks \('F-0'\) lie outside the displacement field"):
        residual_tre(Landmarks(LPS, ["F-0", "F-1"]), Landmarks(LPS, ["M-0", "M-1"]), transform)
    inside = LPS.copy()
    inside[0] = (0.0, -20.0, 3.0)
    assert residual_tre(Landmarks(inside, ["F-0", "F-1"]), Landmarks(inside, ["M-0", "M-1"]), transform).max() == 0
