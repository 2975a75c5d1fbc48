"""How a misalignment labelmap looks in Slicer: its colour table, layers, legend and landmarks.

The colour table names every label so that the data probe reads "correct", "poor" or "wrong"
under the mouse; label 0 ("outside", not predicted) is transparent. Calls that need the
application (layout manager, colour legend) are skipped when Slicer runs without one, so the
Logic works from scripts and tests on a bare MRML scene.
"""

from __future__ import annotations

import slicer

from RegistrationMisalignmentLib.config import CLASS_NAMES, DEFAULT_CONFIG, MisalignmentConfig

COLOR_TABLE_NAME = "RegistrationMisalignment"
OUTSIDE_NAME = "outside"


def label_names(config: MisalignmentConfig = DEFAULT_CONFIG) -> dict[int, str]:
    """Label value -> name, the outside label first."""
    return {config.label_outside: OUTSIDE_NAME, **dict(zip(config.label_values, CLASS_NAMES))}


def misalignment_color_table(scene, config: MisalignmentConfig = DEFAULT_CONFIG):
    """The scene's misalignment colour table, created on first use and shared by all outputs."""
    existing = scene.GetFirstNodeByName(COLOR_TABLE_NAME)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", COLOR_TABLE_NAME)
    table.SetTypeToUser()
    table.SetHideFromEditors(False)
    table.SetNumberOfColors(max(label_names(config)) + 1)
    table.SetColor(config.label_outside, OUTSIDE_NAME, 0.0, 0.0, 0.0, 0.0)
    for value, name, rgb in zip(config.label_values, CLASS_NAMES, config.class_colors):
        table.SetColor(value, name, *rgb, 1.0)
    return table


def apply_color_table(labelmapNode, config: MisalignmentConfig = DEFAULT_CONFIG) -> None:
    """Give the labelmap a display node that uses the misalignment colour table."""
    scene = labelmapNode.GetScene()
    table = misalignment_color_table(scene, config)
    displayNode = labelmapNode.GetDisplayNode()
    if displayNode is None:
        displayNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeDisplayNode")
        labelmapNode.SetAndObserveDisplayNodeID(displayNode.GetID())
    displayNode.SetAndObserveColorNodeID(table.GetID())


def show_in_slice_views(labelmapNode, backgroundVolume, opacity: float) -> None:
    """Fixed volume as background, the map as label layer, in every slice view; legend if possible."""
    slicer.util.setSliceViewerLayers(background=backgroundVolume, label=labelmapNode, labelOpacity=opacity)
    app = getattr(slicer, "app", None)
    if app is None:
        return
    slicer.util.setSliceViewerLayers(fit=True)
    legend = slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(labelmapNode)
    if legend is not None:
        legend.SetTitleText("Misalignment")


def set_label_opacity(opacity: float) -> None:
    """Opacity of the label layer in every slice view."""
    slicer.util.setSliceViewerLayers(labelOpacity=opacity)


def jump_slices_to(position_ras) -> None:
    """Centre every slice view on a point (RAS mm)."""
    r, a, s = (float(v) for v in position_ras)
    slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
