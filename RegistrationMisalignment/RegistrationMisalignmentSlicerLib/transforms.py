"""Slicer transform nodes as SimpleITK transforms (LPS), for the Lib's registration checks.

A moving volume under a transform node is shown where the node's "from parent" transform (world -> the
node's space) maps each world point: that is the registration's fixed -> moving map, ITK's resampling
convention, which every transform of the Lib follows. A linear node becomes the exact
``SimpleITK.AffineTransform`` (RAS <-> LPS flipped on both sides); any other node (grid, B-spline,
thin-plate spline, composite, inverted, under parent transforms) is evaluated by VTK at the voxel centres
of a grid, slab by slab, and becomes a ``DisplacementFieldTransform`` on that grid: exact at those
points, linear in between, the nearest edge value outside. The Lib then computes Jacobian and inverse
consistency as it does for files, so the panel and ``regmis qa`` give the same numbers.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from RegistrationMisalignmentLib.landmarks import lps_to_ras, ras_to_lps

LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
SLAB_VOXELS = 1 << 21


def padded_grid(reference: sitk.Image, margin_voxels: int) -> sitk.Image:
    """A uint8 image on ``reference``'s grid extended by ``margin_voxels`` on every side."""
    size = [n + 2 * margin_voxels for n in reference.GetSize()]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(reference.GetSpacing())
    grid.SetDirection(reference.GetDirection())
    grid.SetOrigin(reference.TransformContinuousIndexToPhysicalPoint([-float(margin_voxels)] * 3))
    return grid


def _points_lps(grid: sitk.Image, z0: int, z1: int) -> np.ndarray:
    """(N, 3) LPS voxel centres of slices z0..z1-1, in (z, y, x) array order."""
    width, height, _ = grid.GetSize()
    k, j, i = np.meshgrid(np.arange(z0, z1, dtype=np.float64), np.arange(height, dtype=np.float64),
                          np.arange(width, dtype=np.float64), indexing="ij")
    index = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)
    matrix = np.array(grid.GetDirection()).reshape(3, 3) * np.array(grid.GetSpacing())
    return index @ matrix.T + np.array(grid.GetOrigin())


def sample_displacement(transform: vtk.vtkAbstractTransform, grid: sitk.Image) -> sitk.Image:
    """T(x) - x (float64 vectors, LPS mm) at every voxel of ``grid``, T a VTK transform of RAS points."""
    width, height, depth = grid.GetSize()
    out = np.empty((depth, height, width, 3), dtype=np.float64)
    step = max(1, SLAB_VOXELS // (width * height))
    for z0 in range(0, depth, step):
        z1 = min(z0 + step, depth)
        lps = _points_lps(grid, z0, z1)
        source = vtk.vtkPoints()
        source.SetData(numpy_support.numpy_to_vtk(lps_to_ras(lps), deep=True))
        mapped = vtk.vtkPoints()
        mapped.SetDataTypeToDouble()  # VTK's default float would round the displacements to ~1e-6 mm
        transform.TransformPoints(source, mapped)
        moved = ras_to_lps(numpy_support.vtk_to_numpy(mapped.GetData()).astype(np.float64))
        out[z0:z1] = (moved - lps).reshape(z1 - z0, height, width, 3)
    field = sitk.GetImageFromArray(out, isVector=True)
    field.CopyInformation(grid)
    return field


def node_to_sitk(transformNode, reference: sitk.Image, margin_voxels: int = 0) -> sitk.Transform:
    """The node's world -> node-space transform (fixed -> moving) as a SimpleITK transform in LPS.

    Linear: exact affine. Otherwise a displacement field sampled on ``reference``'s grid grown by
    ``margin_voxels`` per side (a backward transform is read at points the forward one moved). The
    field takes 24 bytes per voxel of that grid.
    """
    if transformNode.IsLinear():
        matrix = vtk.vtkMatrix4x4()
        transformNode.GetMatrixTransformFromWorld(matrix)
        lps = LPS_FLIP @ slicer.util.arrayFromVTKMatrix(matrix) @ LPS_FLIP
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(lps[:3, :3].ravel().tolist())
        affine.SetTranslation(lps[:3, 3].tolist())
        return affine
    general = vtk.vtkGeneralTransform()
    transformNode.GetTransformFromWorld(general)
    field = sample_displacement(general, padded_grid(reference, margin_voxels))
    return sitk.DisplacementFieldTransform(field)
