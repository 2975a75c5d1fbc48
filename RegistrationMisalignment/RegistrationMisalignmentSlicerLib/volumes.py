"""MRML volumes <-> SimpleITK images with their geometry: the one crossing between RAS and LPS.

A MRML volume carries its geometry as one IJK-to-RAS matrix; SimpleITK as origin, spacing and
direction in LPS. Both describe the same voxel-to-millimetre map, so a round trip must give the
same matrix back (tested with oblique, anisotropic volumes). Parent transforms are not part of a
node's own geometry: ``world_volume`` bakes them into a temporary copy so the user's node is
never changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.landmarks import lps_to_ras, ras_to_lps


def ijk_to_ras(volumeNode) -> np.ndarray:
    """The node's own 4x4 IJK-to-RAS matrix (parent transforms not applied)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def volume_to_sitk(volumeNode) -> sitk.Image:
    """The node's voxels as a SimpleITK image in LPS, with the node's own geometry."""
    if volumeNode is None or volumeNode.GetImageData() is None:
        name = volumeNode.GetName() if volumeNode is not None else "(none)"
        raise InputError(f"volume '{name}' holds no image data; select a loaded volume.")
    array = slicer.util.arrayFromVolume(volumeNode)  # (k, j, i): SimpleITK's z, y, x order
    image = sitk.GetImageFromArray(np.array(array, copy=True), isVector=array.ndim == 4)
    matrix = ijk_to_ras(volumeNode)
    # Columns of the 3x3 part are the voxel axes in RAS; ras_to_lps flips rows of points, so the
    # transpose turns the matrix into three "points" and back.
    axes_lps = ras_to_lps(matrix[:3, :3].T).T
    spacing = np.linalg.norm(axes_lps, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((axes_lps / spacing).ravel().tolist())
    image.SetOrigin(ras_to_lps(matrix[:3, 3]).tolist())
    return image


def sitk_to_volume(image: sitk.Image, volumeNode) -> None:
    """Replace the node's voxels and IJK-to-RAS by those of ``image`` (LPS)."""
    slicer.util.updateVolumeFromArray(volumeNode, sitk.GetArrayFromImage(image))
    axes_lps = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    matrix = np.eye(4)
    matrix[:3, :3] = lps_to_ras(axes_lps.T).T
    matrix[:3, 3] = lps_to_ras(np.array(image.GetOrigin()))
    volumeNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))


@contextmanager
def temporary_nodes(scene) -> Iterator[None]:
    """Remove, on exit, every node added to the scene inside the block (singletons excepted).

    Slicer's logics add helper nodes of their own (display nodes, a colour table for an exported
    segmentation); removing all that appeared, rather than the nodes we know of, leaves the scene
    exactly as the user had it. Singletons (subject hierarchy) are shared and stay.
    """
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in before and not node.GetSingletonTag():
                scene.RemoveNode(node)


@contextmanager
def world_volume(volumeNode) -> Iterator:
    """The volume as it appears in the views: itself, or a temporary hardened clone.

    A volume under a transform node (a registration result not yet hardened) is cloned, the
    transform is hardened on the clone (non-linear transforms resample it), and the clone is
    removed from the scene on exit, whatever happens in between.
    """
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is None:
        yield volumeNode
        return
    scene = volumeNode.GetScene()
    with temporary_nodes(scene):
        volumesLogic = slicer.vtkSlicerVolumesLogic()
        volumesLogic.SetMRMLScene(scene)
        clone = volumesLogic.CloneVolume(scene, volumeNode, f"{volumeNode.GetName()} (temporary, hardened)")
        clone.SetAndObserveTransformNodeID(transformNode.GetID())
        if not slicer.vtkSlicerTransformLogic().hardenTransform(clone):
            raise InputError(f"transform '{transformNode.GetName()}' could not be applied to volume "
                             f"'{volumeNode.GetName()}'; check the transform in the Transforms module.")
        yield clone


def mask_to_sitk(maskNode, referenceVolume) -> sitk.Image:
    """A segmentation (visible segments) or labelmap as a label image, in world geometry."""
    if not maskNode.IsA("vtkMRMLSegmentationNode"):
        with world_volume(maskNode) as volume:
            return volume_to_sitk(volume)
    scene = referenceVolume.GetScene()
    with temporary_nodes(scene):
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{maskNode.GetName()} (temporary)")
        exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportVisibleSegmentsToLabelmapNode(
            maskNode, labelmap, referenceVolume)
        if not exported or labelmap.GetImageData() is None:
            raise InputError(f"segmentation '{maskNode.GetName()}' has no visible segment to use as a "
                             "mask; show at least one segment or choose no mask.")
        with world_volume(labelmap) as volume:
            return volume_to_sitk(volume)
