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


# ---- registration checks -------------------------------------------------------------------
CHECK_TABLE_PREFIX = "RegistrationMisalignment "


def check_color_table(scene, info):
    """The scene's colour table of a continuous check map (``checks.maps.MapInfo``): 256 colours from its low
    to its high end, created on first use and shared by every map of that kind."""
    name = CHECK_TABLE_PREFIX + info.key
    existing = scene.GetFirstNodeByName(name)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    colors = info.colormap(256)
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    table.SetTypeToUser()
    table.SetHideFromEditors(False)
    table.SetNumberOfColors(len(colors))
    for index, rgb in enumerate(colors):
        table.SetColor(index, f"{info.title} {index}", *(float(c) for c in rgb), 1.0)
    return table


def apply_check_display(volumeNode, info, config: MisalignmentConfig = DEFAULT_CONFIG) -> None:
    """Colours of a check map: the misalignment table for a class map, else the map's own colour table
    stretched over its display range (window / level fixed, not automatic)."""
    if info.kind == "classes":
        apply_color_table(volumeNode, config)
        return
    scene = volumeNode.GetScene()
    displayNode = volumeNode.GetDisplayNode()
    if displayNode is None:
        displayNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
        volumeNode.SetAndObserveDisplayNodeID(displayNode.GetID())
    displayNode.SetAndObserveColorNodeID(check_color_table(scene, info).GetID())
    displayNode.AutoWindowLevelOff()
    low, high = info.display_range
    displayNode.SetWindowLevelMinMax(low, high)


def show_check(volumeNode, backgroundVolume, info, opacity: float) -> None:
    """The fixed volume as background and the check map over it: a class map as the label layer, a
    continuous map as the foreground layer at ``opacity``; a colour legend where the application runs."""
    if info.kind == "classes":
        slicer.util.setSliceViewerLayers(background=backgroundVolume, label=volumeNode, labelOpacity=opacity)
    else:
        slicer.util.setSliceViewerLayers(background=backgroundVolume, foreground=volumeNode,
                                         foregroundOpacity=opacity)
    if getattr(slicer, "app", None) is None:
        return
    legend = slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(volumeNode)
    if legend is not None:
        legend.SetTitleText(f"{info.title} ({info.unit})")


def legend_html(infos) -> str:
    """One line per map for the panel: a colour bar of its anchors, its range and what it is good for."""
    lines = []
    for info in infos:
        bar = "".join(f'<span style="background-color:#{"".join(f"{round(255 * c):02x}" for c in rgb)}">&nbsp;&nbsp;'
                      "</span>" for rgb in info.colors)
        low, high = info.display_range
        scale = f"{low:.3g} &rarr; {high:.3g} {info.unit}" if info.kind == "continuous" else "correct / poor / wrong"
        lines.append(f"{bar} <b>{info.title}</b> ({scale}): {info.use}")
    return "<br>".join(lines)
