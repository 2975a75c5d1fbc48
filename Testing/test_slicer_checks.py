"""The Logic's registration checks on real MRML (slicer-core): volumes named after the inputs, colours,
known answers through Slicer transform nodes, nothing added when cancelled or failed, a real CT pair.

Fixtures and scene helpers are those of ``test_slicer_logic`` (the module loaded with its shims).
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")
vtk = pytest.importorskip("vtk")

from RegistrationMisalignmentLib.checks.maps import MAPS  # noqa: E402
from RegistrationMisalignmentLib.errors import InputError, PredictionCancelled  # noqa: E402
from conftest import SHARED_DATA  # noqa: E402
from test_slicer_logic import (  # noqa: E402,F401  (rm, scene and tiny_model are fixtures)
    add_linear_transform, add_points, add_volume, matrix_of, node_classes, oblique_matrix, phantom, rm,
    scene, tiny_model, translation,
)

CHEST = SHARED_DATA / "chest_ct_1.5mm.nii.gz"


def one_voxel(axis: int = 0) -> np.ndarray:
    """The RAS vector of one voxel step along an axis of ``oblique_matrix()``."""
    return oblique_matrix()[:3, axis].copy()


@pytest.fixture
def pair(scene):
    """The phantom as fixed, and as moving under a registration that shifts it by exactly one voxel along i."""
    array = phantom()
    fixed = add_volume(scene, "fixed", array, oblique_matrix())
    moving = add_volume(scene, "moving", array, oblique_matrix())
    transform = add_linear_transform(scene, translation(*one_voxel()))
    moving.SetAndObserveTransformNodeID(transform.GetID())
    return fixed, moving, transform, array


def test_linear_registration_checks_have_known_answers_and_named_coloured_volumes(rm, scene, pair):
    fixed, moving, transform, array = pair
    inverse = add_linear_transform(scene, translation(*-one_voxel()), "inverse registration")
    wrong = add_linear_transform(scene, np.eye(4), "wrong inverse")
    before = node_classes(scene)
    logic = rm.RegistrationMisalignmentLogic()

    nodes, summary = logic.computeChecks(fixed, moving, ["jacobian", "inverse-consistency", "intensity"],
                                         inverseTransformNode=inverse, bodyOnly=False, showResult=False)

    assert list(nodes) == ["jacobian", "inverse_consistency", "intensity"]
    assert [n.GetName() for n in nodes.values()] == ["fixed-moving Jacobian determinant",
                                                     "fixed-moving inverse consistency",
                                                     "fixed-moving intensity difference |F - D|"]
    for key, node in nodes.items():
        np.testing.assert_allclose(matrix_of(node), matrix_of(fixed), atol=1e-9)
        table = node.GetDisplayNode().GetColorNode()
        assert table.GetName() == f"RegistrationMisalignment {key}" and table.GetNumberOfColors() == 256
        low, high = MAPS[key].display_range
        assert node.GetDisplayNode().GetWindowLevelMin() == pytest.approx(low)
        assert node.GetDisplayNode().GetWindowLevelMax() == pytest.approx(high)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(nodes["jacobian"]), 1.0, atol=1e-9)
    assert slicer.util.arrayFromVolume(nodes["inverse_consistency"]).max() < 1e-6
    # D(x) = M(x - one voxel): the moving array rolled by one along i; |F - D| is known away from the edge.
    expected = np.abs(array.astype(np.float32) - np.roll(array, 1, axis=2))[:, :, 1:]
    np.testing.assert_allclose(slicer.util.arrayFromVolume(nodes["intensity"])[:, :, 1:], expected, atol=1e-3)
    assert summary.region == "whole image" and summary.maps[0].jacobian.folding == 0
    assert node_classes(scene) == sorted(before + ["vtkMRMLColorTableNode"] * 3 + ["vtkMRMLScalarVolumeDisplayNode"] * 3
                                         + ["vtkMRMLScalarVolumeNode"] * 3)
    assert moving.GetParentTransformNode() is transform  # the user's nodes are unchanged

    nodes, _ = logic.computeChecks(fixed, moving, ["inverse-consistency"], inverseTransformNode=wrong,
                                   bodyOnly=False, showResult=False)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(nodes["inverse_consistency"]), 1.3, atol=1e-5)  # 1 voxel
    assert nodes["inverse_consistency"].GetName() == "fixed-moving inverse consistency_1"  # unique names


def test_jacobian_of_an_affine_and_of_grid_transforms(rm, scene):
    array = phantom()
    fixed = add_volume(scene, "fixed", array, oblique_matrix())
    moving = add_volume(scene, "moving", array, oblique_matrix())
    to_parent = np.eye(4)
    to_parent[:3, :3] = [[1.1, 0.05, 0.0], [0.0, 0.95, 0.02], [0.03, 0.0, 1.05]]
    affine = add_linear_transform(scene, to_parent)
    logic = rm.RegistrationMisalignmentLogic()
    nodes, _ = logic.computeChecks(fixed, moving, ["jacobian"], transformNode=affine, bodyOnly=False,
                                   showResult=False)
    # from parent = the inverse matrix; the RAS <-> LPS flip does not change a determinant.
    np.testing.assert_allclose(slicer.util.arrayFromVolume(nodes["jacobian"]), 1 / np.linalg.det(to_parent), rtol=1e-6)

    def grid_node(name: str, displacement) -> object:
        grid = vtk.vtkImageData()
        grid.SetDimensions(8, 8, 8)
        grid.SetSpacing(12.0, 12.0, 12.0)
        grid.SetOrigin(-60.0, -45.0, -60.0)
        grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
        vtk.util.numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars())[:] = displacement
        transform = slicer.vtkOrientedGridTransform()
        transform.SetDisplacementGridData(grid)
        node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
        node.SetAndObserveTransformFromParent(transform)
        return node

    forward, backward = grid_node("grid", (2.5, -1.0, 0.0)), grid_node("grid back", (-2.5, 1.0, 0.0))
    moving.SetAndObserveTransformNodeID(forward.GetID())
    nodes, _ = logic.computeChecks(fixed, moving, ["jacobian", "inverse-consistency"], inverseTransformNode=backward,
                                   bodyOnly=False, showResult=False)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(nodes["jacobian"]), 1.0, atol=1e-6)
    assert slicer.util.arrayFromVolume(nodes["inverse_consistency"]).max() < 1e-4


def test_the_chosen_map_is_shown_over_the_fixed_volume(rm, scene, pair):
    fixed, moving, _, _ = pair
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    nodes, _ = rm.RegistrationMisalignmentLogic().computeChecks(fixed, moving, ["jacobian", "intensity"],
                                                               bodyOnly=False)
    assert composite.GetBackgroundVolumeID() == fixed.GetID()
    assert composite.GetForegroundVolumeID() == nodes["intensity"].GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.5)


def test_cancelled_or_failed_checks_add_nothing(rm, scene, pair):
    fixed, moving, _, _ = pair
    logic = rm.RegistrationMisalignmentLogic()
    before = node_classes(scene)
    with pytest.raises(PredictionCancelled):
        logic.computeChecks(fixed, moving, ["jacobian", "intensity"], cancel=lambda: True)
    moving.SetAndObserveTransformNodeID(None)
    with pytest.raises(InputError, match="Jacobian check needs the registration transform"):
        logic.computeChecks(fixed, moving, ["intensity", "jacobian"])
    assert node_classes(scene) == before


def test_legend_and_landmark_columns(rm):
    logic = rm.RegistrationMisalignmentLogic
    legend = logic.checksLegend(["jacobian", "residual"])
    assert "Jacobian determinant" in legend and "re-registration residual" in legend and "folding" in legend
    assert logic.landmarkCheckColumns(None) == ([], {})


# ---- a real CT pair ------------------------------------------------------------------------
@pytest.fixture
def chest_pair(rm, scene):
    """A crop of the real chest CT as fixed; as moving, itself under a registration shifting it 3 mm."""
    if not CHEST.is_file():
        pytest.skip(f"{CHEST} not available")
    from RegistrationMisalignmentSlicerLib.volumes import sitk_to_volume

    image = sitk.ReadImage(str(CHEST))[8:40, 60:92, 66:98]  # right lung and chest wall
    nodes = []
    for name in ("chest fixed", "chest moving"):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        sitk_to_volume(image, node)
        nodes.append(node)
    transform = add_linear_transform(scene, translation(3.0, 0.0, 0.0))
    nodes[1].SetAndObserveTransformNodeID(transform.GetID())
    return nodes[0], nodes[1], transform


def test_confidence_and_landmark_columns_on_a_real_ct_pair(rm, scene, chest_pair, tiny_model):
    fixed, moving, transform = chest_pair
    centre = np.array(fixed.GetImageData().GetDimensions()) / 2
    ijk_to_ras = matrix_of(fixed)
    fixed_ras = np.array([(ijk_to_ras @ [*(centre + d), 1.0])[:3] for d in ((-8, -8, -8), (0, 4, 0), (8, 8, 6))])
    residual = np.array([[1.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 7.0]])
    # Placed on the moving image where the registration maps the fixed points (from parent: x - 3 mm), plus a residual.
    moving_ras = fixed_ras - (3.0, 0.0, 0.0) + residual
    fixed_points, moving_points = add_points(scene, "F", fixed_ras), add_points(scene, "M", moving_ras)

    nodes, summary = rm.RegistrationMisalignmentLogic().computeChecks(
        fixed, moving, ["confidence", "intensity"], model=tiny_model, device="cpu", fixedLandmarks=fixed_points,
        movingLandmarks=moving_points, showResult=False)

    assert list(nodes) == ["learned", "confidence", "entropy", "intensity"]
    assert nodes["learned"].IsA("vtkMRMLLabelMapVolumeNode")
    assert nodes["learned"].GetName() == "chest fixed-chest moving misalignment"
    assert nodes["confidence"].GetName() == "chest fixed-chest moving confidence of the learned map"
    confidence = slicer.util.arrayFromVolume(nodes["confidence"])
    inside = slicer.util.arrayFromVolume(nodes["learned"]) > 0
    assert inside.any() and confidence[inside].min() >= 1 / 3 - 1e-6
    marks = summary.landmarks
    np.testing.assert_allclose(marks.tre_mm, [1.0, 4.0, 7.0], atol=1e-6)
    headers, cells = rm.RegistrationMisalignmentLogic.landmarkCheckColumns(marks)
    assert headers == ["confidence of the learned map (probability)", "entropy of the learned map (bits)",
                       "intensity difference |F - D| (HU)"]
    assert list(cells) == ["F-1", "F-2", "F-3"] and all(len(row) == 3 for row in cells.values())


def test_reregistration_through_the_logic_on_a_real_ct_pair(rm, scene, chest_pair):
    pytest.importorskip("itk")
    fixed, moving, _ = chest_pair
    before = node_classes(scene)
    nodes, summary = rm.RegistrationMisalignmentLogic().computeChecks(fixed, moving, ["reregistration"],
                                                                      reregistrationIterations=20, showResult=False)
    assert list(nodes) == ["residual", "reregistration"]
    assert nodes["reregistration"].IsA("vtkMRMLLabelMapVolumeNode")
    assert nodes["reregistration"].GetDisplayNode().GetColorNode().GetName() == "RegistrationMisalignment"
    residual = slicer.util.arrayFromVolume(nodes["residual"])[6:-6, 6:-6, 6:-6]
    assert 2.0 < np.median(residual) < 4.0  # the 3 mm shift, found again
    assert node_classes(scene) == sorted(before + ["vtkMRMLColorTableNode", "vtkMRMLColorTableNode",
                                                   "vtkMRMLLabelMapVolumeDisplayNode", "vtkMRMLLabelMapVolumeNode",
                                                   "vtkMRMLScalarVolumeDisplayNode", "vtkMRMLScalarVolumeNode"])
