"""The Slicer module's Logic on a real MRML scene (slicer-core), without the Slicer application.

slicer-core brings MRML nodes and ``slicer.util`` but not the application's Python helpers
(``ScriptedLoadableModule``, ``parameterNodeWrapper``, ``i18n``) nor Qt; ``_shims`` provides
stand-ins just rich enough to import the module file. Everything the Logic does to the scene runs
for real: geometry, transforms, colour table, slice-view layers, markups.
"""

from __future__ import annotations

import importlib.util
import io
import math
import sys
import types
import unittest
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")
vtk = pytest.importorskip("vtk")

from RegistrationMisalignmentLib.config import CLASS_NAMES, DEFAULT_CONFIG  # noqa: E402
from RegistrationMisalignmentLib.errors import InputError, PredictionCancelled  # noqa: E402
from RegistrationMisalignmentLib.evaluation import evaluate_landmarks, write_rows_csv  # noqa: E402
from RegistrationMisalignmentLib.io import prepare_mask, prepare_pair  # noqa: E402
from RegistrationMisalignmentLib.landmarks import Landmarks, lps_to_ras, ras_to_lps  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "RegistrationMisalignment"
MODULE_FILE = MODULE_DIR / "RegistrationMisalignment.py"
LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


# ---- loading the module file -------------------------------------------------------------
def _shims() -> dict[str, types.ModuleType]:
    """Stand-ins for the parts of Slicer's Python that slicer-core does not ship."""
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, requestedDelay=None, msec=None):
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(scripted, cls.__name__, cls)

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = lambda choices: ("Choice", tuple(choices))
    wrapper.WithinRange = lambda low, high: ("WithinRange", low, high)

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    return {"slicer.ScriptedLoadableModule": scripted, "slicer.parameterNodeWrapper": wrapper,
            "slicer.i18n": i18n, "qt": types.ModuleType("qt")}


def _load_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    for name, shim in _shims().items():
        monkeypatch.setitem(sys.modules, name, shim)
    monkeypatch.syspath_prepend(str(MODULE_DIR))
    spec = importlib.util.spec_from_file_location("RegistrationMisalignment", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rm() -> types.ModuleType:
    with pytest.MonkeyPatch.context() as mp:
        return _load_module(mp)


@pytest.fixture
def scene(monkeypatch: pytest.MonkeyPatch):
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    return scene


@pytest.fixture
def fake_predict(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Replace the Lib's predict by a deterministic one with the same contract; returns its calls."""
    calls: list[dict] = []
    inference = types.ModuleType("RegistrationMisalignmentLib.inference")

    def predict(fixed, moving, model=None, *, mask=None, device="auto", progress=None, cancel=None, log=None,
                body_only=True):
        calls.append({"fixed": fixed, "moving": moving, "mask": mask, "device": device, "body_only": body_only})
        return SimpleNamespace(labelmap=difference_labelmap(fixed, moving, mask), probabilities=None)

    inference.predict = predict
    monkeypatch.setitem(sys.modules, "RegistrationMisalignmentLib.inference", inference)
    return calls


def difference_labelmap(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image | None = None) -> sitk.Image:
    """A stand-in map with predict's contract: |fixed - moving| classed on the fixed grid, 0 outside."""
    fixed_f, moving_f = prepare_pair(fixed, moving)
    diff = np.abs(sitk.GetArrayFromImage(fixed_f) - sitk.GetArrayFromImage(moving_f))
    labels = (1 + (diff > 100) + (diff > 400)).astype(np.uint8)
    if mask is not None:
        labels[sitk.GetArrayFromImage(prepare_mask(mask, fixed)) == 0] = 0
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(fixed)
    return image


# ---- scene helpers -----------------------------------------------------------------------
def rotation(z_deg: float, x_deg: float) -> np.ndarray:
    cz, sz = np.cos(np.radians(z_deg)), np.sin(np.radians(z_deg))
    cx, sx = np.cos(np.radians(x_deg)), np.sin(np.radians(x_deg))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1.0]])
    rx = np.array([[1.0, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ rx


def oblique_matrix(spacing=(1.3, 0.9, 2.2), origin=(-20.0, 15.0, -12.0)) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = rotation(25.0, 10.0) * np.array(spacing)
    matrix[:3, 3] = origin
    return matrix


def phantom(shape=(14, 18, 22)) -> np.ndarray:
    """A smooth blob with strong edges (k, j, i), so that a shift changes many voxels."""
    k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    return np.where(i**2 + j**2 + k**2 < 0.5, 800.0, -900.0).astype(np.int16)


def add_volume(scene, name: str, array: np.ndarray, matrix: np.ndarray, cls: str = "vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(cls, name)
    slicer.util.updateVolumeFromArray(node, array)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
    return node


def add_linear_transform(scene, to_parent: np.ndarray, name: str = "registration"):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(to_parent))
    return node


def matrix_of(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def translation(x: float, y: float = 0.0, z: float = 0.0) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = (x, y, z)
    return m


def sitk_image(array: np.ndarray, matrix_ras: np.ndarray) -> sitk.Image:
    """Built straight from the IJK-to-RAS matrix, independently of the module's converter."""
    lps = LPS_FLIP @ matrix_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    return image


def node_classes(scene) -> list[str]:
    """Classes of the scene's nodes, without the subject hierarchy (a singleton Slicer always has)."""
    classes = (scene.GetNthNode(i).GetClassName() for i in range(scene.GetNumberOfNodes()))
    return sorted(c for c in classes if c != "vtkMRMLSubjectHierarchyNode")


ADDED_BY_PROCESS = ["vtkMRMLColorTableNode", "vtkMRMLLabelMapVolumeDisplayNode", "vtkMRMLLabelMapVolumeNode"]


# ---- geometry ----------------------------------------------------------------------------
def test_volume_round_trip_keeps_oblique_anisotropic_geometry(rm, scene):
    from RegistrationMisalignmentSlicerLib.volumes import sitk_to_volume, volume_to_sitk

    array = phantom()
    fixed = add_volume(scene, "fixed", array, oblique_matrix())
    image = volume_to_sitk(fixed)
    np.testing.assert_allclose(image.GetSpacing(), (1.3, 0.9, 2.2))
    for ijk in [(0, 0, 0), (21, 0, 3), (5, 17, 13)]:
        ras = (oblique_matrix() @ [*ijk, 1.0])[:3]
        np.testing.assert_allclose(lps_to_ras(np.array(image.TransformIndexToPhysicalPoint(ijk))), ras, atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)

    copy = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "copy")
    sitk_to_volume(image, copy)
    np.testing.assert_allclose(matrix_of(copy), oblique_matrix(), atol=1e-12)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(copy), array)


# ---- process -----------------------------------------------------------------------------
def test_process_moving_under_transform_matches_prediction_on_fixed_grid(rm, scene, fake_predict):
    array = phantom()
    fixed = add_volume(scene, "fixed", array, oblique_matrix())
    moving = add_volume(scene, "moving", array, oblique_matrix())
    transform = add_linear_transform(scene, translation(3.0, -2.0, 1.5))
    moving.SetAndObserveTransformNodeID(transform.GetID())
    before = node_classes(scene)

    output = rm.RegistrationMisalignmentLogic().process(fixed, moving, showResult=False)

    assert output.IsA("vtkMRMLLabelMapVolumeNode")
    assert output.GetName() == "fixed-moving misalignment"
    np.testing.assert_allclose(matrix_of(output), matrix_of(fixed), atol=1e-9)
    # The moving image reached predict with the transform applied; the user's node is untouched.
    expected_moving = sitk_image(array, translation(3.0, -2.0, 1.5) @ oblique_matrix())
    expected = sitk.GetArrayFromImage(difference_labelmap(sitk_image(array, oblique_matrix()), expected_moving))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(output), expected)
    assert len(np.unique(expected)) == 3  # the shift makes the map non-trivial
    assert moving.GetParentTransformNode() is transform
    np.testing.assert_allclose(matrix_of(moving), oblique_matrix())
    # Only the output, its display node and the colour table were added: no temporaries left.
    assert node_classes(scene) == sorted(before + ADDED_BY_PROCESS)


def test_process_with_grid_transform_leaves_user_nodes_unchanged(rm, scene, fake_predict):
    array = phantom()
    fixed = add_volume(scene, "fixed", array, oblique_matrix())
    moving = add_volume(scene, "moving", array, oblique_matrix())
    grid = vtk.vtkImageData()
    grid.SetDimensions(6, 6, 6)
    grid.SetSpacing(12.0, 12.0, 12.0)
    grid.SetOrigin(-40.0, -30.0, -40.0)
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    vtk.util.numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars())[:] = (2.5, 0.0, 0.0)
    grid_transform = slicer.vtkOrientedGridTransform()
    grid_transform.SetDisplacementGridData(grid)
    transform = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "deformable")
    transform.SetAndObserveTransformFromParent(grid_transform)
    moving.SetAndObserveTransformNodeID(transform.GetID())
    before = node_classes(scene)

    output = rm.RegistrationMisalignmentLogic().process(fixed, moving, showResult=False)

    np.testing.assert_allclose(matrix_of(output), matrix_of(fixed), atol=1e-9)
    assert len(np.unique(slicer.util.arrayFromVolume(output))) > 1
    assert moving.GetParentTransformNode() is transform
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(moving), array)
    assert node_classes(scene) == sorted(before + ADDED_BY_PROCESS)


def test_colour_table_names_and_colours_shared_between_outputs(rm, scene, fake_predict):
    array = phantom()
    fixed = add_volume(scene, "fixed", array, oblique_matrix())
    moving = add_volume(scene, "moving", np.roll(array, 2, axis=2), oblique_matrix())
    logic = rm.RegistrationMisalignmentLogic()
    first = logic.process(fixed, moving, showResult=False)
    second = logic.process(fixed, moving, showResult=False)

    table = first.GetDisplayNode().GetColorNode()
    assert second.GetDisplayNode().GetColorNode() is table
    assert scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == 1
    assert [table.GetColorName(v) for v in range(4)] == ["outside", *CLASS_NAMES]
    rgba = [0.0] * 4
    table.GetColor(DEFAULT_CONFIG.label_outside, rgba)
    assert rgba[3] == 0.0
    for value, expected in zip(DEFAULT_CONFIG.label_values, DEFAULT_CONFIG.class_colors):
        table.GetColor(value, rgba)
        np.testing.assert_allclose(rgba, (*expected, 1.0), atol=1 / 255)  # stored as 8-bit


def test_show_result_puts_fixed_as_background_and_map_as_label_layer(rm, scene, fake_predict):
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    array = phantom()
    fixed = add_volume(scene, "fixed", array, oblique_matrix())
    moving = add_volume(scene, "moving", np.roll(array, 2, axis=0), oblique_matrix())

    output = rm.RegistrationMisalignmentLogic().process(fixed, moving)

    assert composite.GetBackgroundVolumeID() == fixed.GetID()
    assert composite.GetLabelVolumeID() == output.GetID()
    assert composite.GetLabelOpacity() == pytest.approx(0.5)


def test_existing_output_node_is_filled_in_place(rm, scene, fake_predict):
    array = phantom()
    fixed = add_volume(scene, "fixed", array, oblique_matrix())
    moving = add_volume(scene, "moving", np.roll(array, 3, axis=1), oblique_matrix())
    existing = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mine")

    output = rm.RegistrationMisalignmentLogic().process(fixed, moving, existing, showResult=False)

    assert output is existing and output.GetName() == "mine"
    np.testing.assert_allclose(matrix_of(existing), matrix_of(fixed), atol=1e-9)


def test_body_only_is_on_by_default_and_passed_to_the_lib(rm, scene, fake_predict):
    array = phantom()
    fixed = add_volume(scene, "fixed", array, oblique_matrix())
    moving = add_volume(scene, "moving", np.roll(array, 3, axis=1), oblique_matrix())
    logic = rm.RegistrationMisalignmentLogic()
    logic.process(fixed, moving, showResult=False)
    logic.process(fixed, moving, showResult=False, bodyOnly=False)
    assert [call["body_only"] for call in fake_predict] == [True, False]
    assert rm.RegistrationMisalignmentParameterNode.__annotations__["bodyOnly"] in (bool, "bool")


@pytest.mark.parametrize("kind", ["labelmap", "segmentation"])
def test_mask_restricts_the_map(rm, scene, fake_predict, kind):
    array = phantom()
    fixed = add_volume(scene, "fixed", array, oblique_matrix())
    moving = add_volume(scene, "moving", np.roll(array, 2, axis=2), oblique_matrix())
    inside = np.zeros(array.shape, np.uint8)
    inside[3:10, 4:12, 5:15] = 1
    mask = add_volume(scene, "mask", inside, oblique_matrix(), "vtkMRMLLabelMapVolumeNode")
    if kind == "segmentation":
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lungs")
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(mask, segmentation)
        scene.RemoveNode(mask)
        mask = segmentation
    before = node_classes(scene)

    output = rm.RegistrationMisalignmentLogic().process(fixed, moving, mask=mask, showResult=False)

    labels = slicer.util.arrayFromVolume(output)
    assert np.all(labels[inside == 0] == 0)
    assert np.all(labels[inside == 1] > 0)
    assert node_classes(scene) == sorted(before + ADDED_BY_PROCESS)  # the exported temporaries are gone


@pytest.mark.parametrize("error", [InputError("moving image is 2-D; give a 3-D image."), PredictionCancelled()])
def test_failure_or_cancel_writes_nothing(rm, scene, monkeypatch, error):
    inference = types.ModuleType("RegistrationMisalignmentLib.inference")

    def predict(*args, **kwargs):
        raise error

    inference.predict = predict
    monkeypatch.setitem(sys.modules, "RegistrationMisalignmentLib.inference", inference)
    array = phantom()
    fixed = add_volume(scene, "fixed", array, oblique_matrix())
    moving = add_volume(scene, "moving", array, oblique_matrix())
    moving.SetAndObserveTransformNodeID(add_linear_transform(scene, translation(2.0)).GetID())
    before = node_classes(scene)

    with pytest.raises(type(error)):
        rm.RegistrationMisalignmentLogic().process(fixed, moving)

    assert node_classes(scene) == before


def test_fixed_volume_under_a_transform_is_refused_with_its_name(rm, scene, fake_predict):
    array = phantom()
    fixed = add_volume(scene, "chest fixed", array, oblique_matrix())
    moving = add_volume(scene, "moving", array, oblique_matrix())
    fixed.SetAndObserveTransformNodeID(add_linear_transform(scene, translation(1.0)).GetID())

    with pytest.raises(InputError, match="fixed volume 'chest fixed'"):
        rm.RegistrationMisalignmentLogic().process(fixed, moving)
    assert not fake_predict


# ---- landmarks ---------------------------------------------------------------------------
def add_points(scene, name: str, points_ras) -> object:
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for p in points_ras:
        node.AddControlPoint(*(float(v) for v in p))
    return node


@pytest.fixture
def landmark_case(rm, scene, fake_predict):
    """A map with all three classes and landmarks spread over it, in RAS."""
    array = phantom()
    fixed = add_volume(scene, "fixed", array, oblique_matrix())
    moving = add_volume(scene, "moving", np.roll(array, 2, axis=2), oblique_matrix())
    logic = rm.RegistrationMisalignmentLogic()
    output = logic.process(fixed, moving, showResult=False)
    ijk = np.array([[3, 4, 2], [10, 8, 6], [15, 9, 7], [6, 12, 10], [18, 14, 11], [11, 2, 4], [40, 40, 40]])
    fixed_ras = (oblique_matrix() @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    residual = np.array([[0.5, 0, 0], [0, 2.0, 1.0], [3.5, 0, 1.0], [0, 0, 5.0], [6.5, 1.0, 0], [0, 9.0, 0], [1, 1, 1]])
    return SimpleNamespace(logic=logic, output=output, fixed_ras=fixed_ras, residual=residual)


def assert_same_evaluation(got, expected):
    rows, report = got
    expected_rows, expected_report = expected
    assert [r.label for r in rows] == [r.label for r in expected_rows]
    np.testing.assert_allclose([r.position_lps for r in rows], [r.position_lps for r in expected_rows], atol=1e-9)
    np.testing.assert_allclose([r.tre_mm for r in rows], [r.tre_mm for r in expected_rows], atol=1e-9)
    assert [(r.true_class, r.predicted_class, r.agree) for r in rows] == \
        [(r.true_class, r.predicted_class, r.agree) for r in expected_rows]
    assert_same_values(report.to_dict(), expected_report.to_dict())


def assert_same_values(got, expected, where: str = "report") -> None:
    """Plain values compared field by field (pytest 9's approx refuses nested dicts): numbers within 1e-9,
    None (an undefined score) only against None, everything else equal."""
    if isinstance(expected, dict):
        assert sorted(got) == sorted(expected), where
        for key in expected:
            assert_same_values(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_same_values(a, b, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert isinstance(got, (int, float)) and math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-12), \
            f"{where}: {got} != {expected}"
    else:
        assert got == expected, f"{where}: {got!r} != {expected!r}"


def test_landmark_table_with_transform_equals_lib_evaluation(landmark_case, scene):
    case = landmark_case
    to_parent = translation(4.0, -1.0, 2.0)
    to_parent[:3, :3] = rotation(4.0, -3.0)
    from_parent = np.linalg.inv(to_parent)
    transform = add_linear_transform(scene, to_parent)
    # Moving landmarks where the registration maps the fixed ones, plus a known residual.
    moving_ras = (from_parent @ np.c_[case.fixed_ras, np.ones(len(case.fixed_ras))].T).T[:, :3] + case.residual
    fixed_points = add_points(scene, "F", case.fixed_ras)
    moving_points = add_points(scene, "M", moving_ras)
    moving_points.SetAndObserveTransformNodeID(transform.GetID())  # ignored: placed on the moving image

    got = case.logic.evaluateLandmarks(case.output, fixed_points, moving_points, transform)

    affine = sitk.AffineTransform(3)  # the same registration as a SimpleITK (LPS) transform
    from_parent_lps = LPS_FLIP @ from_parent @ LPS_FLIP
    affine.SetMatrix(from_parent_lps[:3, :3].ravel().tolist())
    affine.SetTranslation(from_parent_lps[:3, 3].tolist())
    labels = [f"F-{i + 1}" for i in range(len(case.fixed_ras))]
    expected = evaluate_landmarks(map_image(case.output), Landmarks(ras_to_lps(case.fixed_ras), labels),
                                  Landmarks(ras_to_lps(moving_ras), labels), affine, DEFAULT_CONFIG)
    assert_same_evaluation(got, expected)
    np.testing.assert_allclose([r.tre_mm for r in got[0]], np.linalg.norm(case.residual, axis=1), atol=1e-9)
    assert {r.true_class for r in got[0]} == {0, 1, 2}
    assert got[0][-1].predicted_class == -1  # the last landmark lies outside the map


def map_image(labelmap_node) -> sitk.Image:
    """The output labelmap for the Lib, converted without the module's own converter."""
    return sitk_image(slicer.util.arrayFromVolume(labelmap_node).copy(), matrix_of(labelmap_node))


def test_landmarks_already_in_registered_space_use_world_positions(landmark_case, scene):
    case = landmark_case
    transform = add_linear_transform(scene, translation(1.0, 2.0, -1.0))
    moving_local = case.fixed_ras + case.residual - (1.0, 2.0, -1.0)
    fixed_points = add_points(scene, "F", case.fixed_ras)
    moving_points = add_points(scene, "M", moving_local)
    moving_points.SetAndObserveTransformNodeID(transform.GetID())  # shown at fixed + residual

    rows, report = case.logic.evaluateLandmarks(case.output, fixed_points, moving_points, None)

    np.testing.assert_allclose([r.tre_mm for r in rows], np.linalg.norm(case.residual, axis=1), atol=1e-9)
    labels = [f"F-{i + 1}" for i in range(len(case.fixed_ras))]
    expected = evaluate_landmarks(map_image(case.output), Landmarks(ras_to_lps(case.fixed_ras), labels),
                                  Landmarks(ras_to_lps(case.fixed_ras + case.residual), labels), None, DEFAULT_CONFIG)
    assert_same_evaluation((rows, report), expected)


def test_landmark_rows_export_jump_and_summary(landmark_case, scene, tmp_path):
    case = landmark_case
    slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    rows, report = case.logic.evaluateLandmarks(
        case.output, add_points(scene, "F", case.fixed_ras), add_points(scene, "M", case.fixed_ras + case.residual))

    case.logic.jumpToLandmark(rows[2])
    center = slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS())[:3, 3]
    np.testing.assert_allclose(center, case.fixed_ras[2], atol=1e-6)

    case.logic.exportLandmarkTable(rows, str(tmp_path / "panel.csv"))
    write_rows_csv(rows, tmp_path / "lib.csv")
    assert (tmp_path / "panel.csv").read_text(encoding="utf-8") == (tmp_path / "lib.csv").read_text(encoding="utf-8")

    summary = case.logic.formatReport(report)
    assert f"N {report.n} |" in summary and f"cw {report.cw}" in summary
    assert f"accuracy {100 * report.accuracy:.1f}%" in summary
    assert case.logic.className(-1) == "outside" and case.logic.className(2) == "wrong"


def test_undefined_or_missing_landmarks_are_reported_by_name(rm, scene):
    points = add_points(scene, "F", [[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    points.SetNthControlPointPositionMissing(1)
    with pytest.raises(InputError, match="landmark 'F-2' of 'F' has no position"):
        rm.RegistrationMisalignmentLogic.markupsToLandmarks(points)
    with pytest.raises(InputError, match="point list 'empty' is empty"):
        rm.RegistrationMisalignmentLogic.markupsToLandmarks(add_points(scene, "empty", []))


# ---- the real Lib ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A randomly initialised small LSTM model, saved and loaded the way shipped models are."""
    from RegistrationMisalignmentLib.networks.model import MisalignmentNet
    from RegistrationMisalignmentLib.weights import load_model, save_model
    import torch

    torch.manual_seed(0)
    net = MisalignmentNet("lstm", DEFAULT_CONFIG, hidden_channels=4)
    with torch.no_grad():  # sharper random logits, so that the map holds more than one class
        for parameter in net.decoder.parameters():
            parameter.mul_(10.0)
    path = save_model(net,
                      {"name": "tiny", "decoder": "lstm", "config": DEFAULT_CONFIG.to_dict()},
                      tmp_path_factory.mktemp("model") / "tiny.pt")
    return load_model(path)


def test_process_equals_the_libs_direct_prediction(rm, scene, tiny_model):
    from RegistrationMisalignmentLib.inference import predict

    array = phantom((12, 14, 16))
    matrix = oblique_matrix(spacing=(2.0, 1.5, 2.5))
    fixed = add_volume(scene, "fixed", array, matrix)
    moving = add_volume(scene, "moving", array, matrix)
    moving.SetAndObserveTransformNodeID(add_linear_transform(scene, translation(3.0, 0.0, -2.0)).GetID())

    output = rm.RegistrationMisalignmentLogic().process(fixed, moving, model=tiny_model, device="cpu",
                                                        showResult=False)

    direct = predict(sitk_image(array, matrix), sitk_image(array, translation(3.0, 0.0, -2.0) @ matrix),
                     tiny_model, device="cpu")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(output), sitk.GetArrayFromImage(direct.labelmap))
    np.testing.assert_allclose(matrix_of(output), matrix, atol=1e-9)
    assert len(np.unique(slicer.util.arrayFromVolume(output))) > 1  # a map with some structure to compare


# ---- module-level behaviour --------------------------------------------------------------
@pytest.fixture
def fresh_imports(monkeypatch):
    """Our packages imported anew inside the test, and the session's copies put back after it."""
    prefixes = ("RegistrationMisalignmentLib", "RegistrationMisalignmentSlicerLib")
    before = set(sys.modules)
    for name in [n for n in before if n.startswith(prefixes)]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [n for n in sys.modules if n.startswith(prefixes) and n not in before]:
        del sys.modules[name]


def test_module_file_loads_without_torch(monkeypatch, fresh_imports):
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now raises ImportError

    module = _load_module(monkeypatch)

    assert hasattr(module, "RegistrationMisalignmentLogic")
    dependencies = sys.modules["RegistrationMisalignmentSlicerLib.dependencies"]
    monkeypatch.setattr(dependencies.importlib.util, "find_spec", lambda name: None)
    assert dependencies.missing_packages() == ["torch"]


def test_model_card_text(rm):
    card = {"name": "regmis_lstm_631", "decoder": "lstm", "split": "6-3-1", "description": "Default model.",
            "metrics": {"accuracy": 0.81}, "sha256": "abc"}
    text = rm.RegistrationMisalignmentLogic.formatModelCard(card)
    assert text.splitlines() == ["Name: regmis_lstm_631", "Decoder: lstm", "Split: 6-3-1", "Default model.",
                                 "accuracy: 0.81"]


def test_the_modules_own_slicer_test_passes_on_slicer_core(rm, scene, fake_predict, tiny_model, monkeypatch):
    monkeypatch.setenv("REGMIS_MODEL_DIR", str(tiny_model.path.parent))  # so its prediction part runs too
    result = unittest.TextTestRunner(stream=io.StringIO()).run(
        unittest.defaultTestLoader.loadTestsFromTestCase(rm.RegistrationMisalignmentTest))
    assert result.wasSuccessful(), result.failures + result.errors


def test_background_job_reports_progress_log_result_and_cancel(rm):
    from RegistrationMisalignmentSlicerLib.job import BackgroundJob

    def work(progress, cancel, log):
        progress(0.5, "halfway")
        log("a line")
        return 42

    job = BackgroundJob(work)
    job.start()
    assert job.wait(10)
    assert (job.result, job.error, job.progress(), job.log_lines(), job.log_lines()) == \
        (42, None, (0.5, "halfway"), ["a line"], [])

    def until_cancelled(progress, cancel, log):
        while not cancel():
            pass
        raise PredictionCancelled()

    job = BackgroundJob(until_cancelled)
    job.start()
    assert not job.wait(0.05)
    job.cancel()
    assert job.wait(10) and isinstance(job.error, PredictionCancelled) and job.result is None
