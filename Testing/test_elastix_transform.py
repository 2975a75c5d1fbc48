"""elastix's TransformParameters files as --transform: read with the chain of initial transforms, checked point for
point against transformix's own mapping."""

from __future__ import annotations

import re
import shutil
import sys

import numpy as np
import pytest

from RegistrationMisalignmentLib.elastix_transform import is_elastix_transform, read_elastix_transform
from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.landmarks import read_transform

itk = pytest.importorskip("itk")
POINTS = np.array([[-5.0, 20.0, 30.0], [20.3, 30.7, 40.1], [0.1, 10.2, 20.3], [40.0, 8.0, 50.0]])


def _image(array: np.ndarray):
    image = itk.image_from_array(array)
    image.SetSpacing([1.2, 1.1, 1.5])
    image.SetOrigin([-10.0, 5.0, 3.0])
    return image


@pytest.fixture(scope="module")
def elastix_output(tmp_path_factory):
    """An affine then B-spline elastix registration of two blob images, as elastix writes it (two files, the second
    naming the first as its initial transform), and transformix's mapping of POINTS through it."""
    folder = tmp_path_factory.mktemp("elastix")
    z, y, x = np.mgrid[:40, :48, :56].astype(np.float32)
    fixed = (500 * np.exp(-((z - 20) ** 2 + (y - 24) ** 2 + (x - 28) ** 2) / 100)
             + 300 * np.exp(-((z - 12) ** 2 + (y - 30) ** 2 + (x - 20) ** 2) / 40)).astype(np.float32)
    moving = np.roll(fixed, 3, axis=2) * 1.0 + np.roll(fixed, -2, axis=0) * 0.2
    parameters = itk.ParameterObject.New()
    for kind in ("affine", "bspline"):
        parameters.AddParameterMap(parameters.GetDefaultParameterMap(kind, 2))
    for i in range(2):
        parameters.SetParameter(i, "MaximumNumberOfIterations", "40")
    itk.elastix_registration_method(_image(fixed), _image(moving), parameter_object=parameters,
                                    log_to_console=False, output_directory=str(folder))
    points = "point\n%d\n" % len(POINTS) + "".join("%f %f %f\n" % tuple(p) for p in POINTS)
    (folder / "points.txt").write_text(points, encoding="utf-8")
    transformed = itk.ParameterObject.New()
    transformed.AddParameterFile(str(folder / "TransformParameters.1.txt"))
    transformix = itk.TransformixFilter.New(_image(np.zeros((2, 2, 2), np.float32)))
    transformix.SetTransformParameterObject(transformed)
    transformix.SetFixedPointSetFileName(str(folder / "points.txt"))
    transformix.SetOutputDirectory(str(folder))
    transformix.SetComputeDeformationField(False)
    transformix.SetLogToConsole(False)
    transformix.Update()
    rows = re.findall(r"OutputPoint = \[([^\]]*)\]", (folder / "outputpoints.txt").read_text(encoding="utf-8"))
    return folder, np.array([[float(v) for v in row.split()] for row in rows])


def _mapped(transform) -> np.ndarray:
    return np.array([transform.TransformPoint(tuple(p)) for p in POINTS])


def test_an_elastix_chain_maps_points_as_transformix_does(elastix_output):
    folder, expected = elastix_output
    assert is_elastix_transform(folder / "TransformParameters.1.txt")
    assert np.abs(expected - POINTS).max() > 1.0  # the registration moved them: the check can fail
    notes = []
    transform = read_transform(folder / "TransformParameters.1.txt", log=notes.append)
    assert np.abs(_mapped(transform) - expected).max() < 0.02
    assert "elastix transform parameter file" in notes[0]


def test_a_moved_elastix_folder_finds_its_initial_transform_beside_the_file(elastix_output, tmp_path):
    folder, expected = elastix_output
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)  # the absolute path elastix wrote still names the original folder
    text = (moved / "TransformParameters.1.txt").read_text(encoding="utf-8")
    (moved / "TransformParameters.1.txt").write_text(text.replace(str(folder), str(tmp_path / "gone")),
                                                     encoding="utf-8")
    assert np.abs(_mapped(read_transform(moved / "TransformParameters.1.txt")) - expected).max() < 0.02
    # elastix 4's key (SimpleElastix, older SlicerElastix), written on Windows
    old = text.replace("InitialTransformParameterFileName", "InitialTransformParametersFileName")
    old = old.replace(str(folder / "TransformParameters.0.txt"), "C:\\elastix\\out\\TransformParameters.0.txt")
    (moved / "TransformParameters.1.txt").write_text(old, encoding="utf-8")
    assert np.abs(_mapped(read_transform(moved / "TransformParameters.1.txt")) - expected).max() < 0.02
    (moved / "TransformParameters.0.txt").unlink()
    with pytest.raises(InputError, match="initial transform .*TransformParameters.0.txt is missing"):
        read_transform(moved / "TransformParameters.1.txt")


def test_a_2d_elastix_file_is_refused_before_transformix(elastix_output, tmp_path):
    """transformix given a 2-D file and a 3-D image ends the process (a segmentation fault)."""
    folder, _ = elastix_output
    text = (folder / "TransformParameters.0.txt").read_text(encoding="utf-8")
    (tmp_path / "2d.txt").write_text(text.replace("(FixedImageDimension 3)", "(FixedImageDimension 2)")
                                     .replace("(MovingImageDimension 3)", "(MovingImageDimension 2)"), encoding="utf-8")
    with pytest.raises(InputError, match="an elastix transform of a 2-D registration"):
        read_transform(tmp_path / "2d.txt")


def test_a_large_grid_is_sampled_coarser_and_still_maps_within_a_tenth_of_a_mm(elastix_output):
    folder, expected = elastix_output
    transform = read_elastix_transform(folder / "TransformParameters.1.txt", max_voxels=20_000)
    field = transform.GetDisplacementField()
    assert np.prod(field.GetSize()) <= 20_000 and field.GetSpacing()[0] > 1.2
    assert np.abs(_mapped(transform) - expected).max() < 0.1


def test_without_itk_elastix_the_error_names_the_package_and_transformix(elastix_output, monkeypatch):
    folder, _ = elastix_output
    monkeypatch.setitem(sys.modules, "itk", None)
    with pytest.raises(InputError, match="pip install itk-elastix.*transformix -def all"):
        read_transform(folder / "TransformParameters.1.txt")


def test_an_itk_text_transform_is_not_taken_for_an_elastix_file(tmp_path):
    import SimpleITK as sitk

    sitk.WriteTransform(sitk.TranslationTransform(3, (1.0, 2.0, 3.0)), str(tmp_path / "t.txt"))
    assert not is_elastix_transform(tmp_path / "t.txt")
    assert read_transform(tmp_path / "t.txt").TransformPoint((0.0, 0.0, 0.0)) == (1.0, 2.0, 3.0)
