"""Render a misalignment labelmap over its fixed CT as Slicer's slice views show it, to a PNG.

The picture for the README is meant to show what a user sees in Slicer, so it goes through the
module's own display path: the Logic's ``writeOutput`` (labelmap node + the module's colour table)
and ``showResult`` (fixed CT as background, map as label layer, label opacity). Each view is a real
``vtkMRMLSliceLogic`` (Red axial, Green coronal, Yellow sagittal) whose blended layer image, the
very image a slice view draws, is read out directly: slicer-core alone is enough, with no render
window, OpenGL, X display, Xvfb or trame-slicer. Not drawn: what the view widgets add on top
(corner annotations, crosshair, the colour legend, which needs ``slicer.app``); the legend here
is drawn with matplotlib from the module's class colours.

Without ``--labelmap`` a stand-in map is drawn, NOT a prediction: the magnitude of a smooth
synthetic displacement (``synthetic.dvf.random_dvf``, single-frequency kind by default: it
gives all three classes within one axial slice) classed at 3 and 6 mm inside the body. Give
``--labelmap`` a ``regmis`` prediction (on the fixed grid) to render that instead.

    pip install slicer-core           # the "dev" extra of pyproject.toml
    python -m benchmarks.render_slice_view --fixed ../shared/data/chest_ct_1.5mm.nii.gz \\
        --crop-z 16 148 --out Resources/Screenshots/slicer_slice_view.png \\
        --montage Resources/Screenshots/slicer_slice_views.png
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "RegistrationMisalignment"
BODY_HU = -950.0  # as benchmarks/evaluate_synthetic.py: tissue and lungs, not the air around
VIEWS = {"Red": "Axial", "Green": "Coronal", "Yellow": "Sagittal"}
VIEW_SIZE = 512


# ---- the module, outside the Slicer application ----------------------------------------
def _application_shims() -> dict[str, types.ModuleType]:
    """Stand-ins for the Slicer application's Python that slicer-core does not ship (as in the tests)."""
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (), {"__init__": lambda self, *args: None}))
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = lambda choices: choices
    wrapper.WithinRange = lambda low, high: (low, high)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    return {"slicer.ScriptedLoadableModule": scripted, "slicer.parameterNodeWrapper": wrapper,
            "slicer.i18n": i18n, "qt": types.ModuleType("qt")}


def load_module() -> types.ModuleType:
    """The module file RegistrationMisalignment.py, imported with the shims in place."""
    for name, shim in _application_shims().items():
        sys.modules.setdefault(name, shim)
    sys.path.insert(0, str(MODULE_DIR))
    path = MODULE_DIR / "RegistrationMisalignment.py"
    spec = importlib.util.spec_from_file_location("RegistrationMisalignment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- inputs ------------------------------------------------------------------------------
def read_fixed(path: Path, crop_z: tuple[int, int] | None) -> sitk.Image:
    image = sitk.ReadImage(str(path))
    if crop_z is None:
        return image
    lo, hi = crop_z
    size = list(image.GetSize())
    return sitk.RegionOfInterest(image, [size[0], size[1], hi - lo], [0, 0, lo])


def standin_labelmap(fixed: sitk.Image, kind: str, seed: int) -> sitk.Image:
    """Classes of |u| for a synthetic DVF u, 0 outside the body: a picture, not a prediction."""
    import torch

    from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
    from RegistrationMisalignmentLib.synthetic.dvf import random_dvf

    torch.set_num_threads(1)
    hu = sitk.GetArrayFromImage(fixed).astype(np.float32)
    body = hu > BODY_HU
    dvf = random_dvf(kind, hu.shape, fixed.GetSpacing(), torch.Generator().manual_seed(seed),
                     body_mask=torch.from_numpy(body))
    magnitude = torch.linalg.vector_norm(dvf, dim=0).numpy()
    labels = np.asarray(DEFAULT_CONFIG.label_values, dtype=np.uint8)[DEFAULT_CONFIG.classify_mm(magnitude)]
    labels[~body] = DEFAULT_CONFIG.label_outside
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(fixed)
    return image


def most_mixed_voxel(labels: np.ndarray) -> tuple[int, int, int]:
    """(i, j, k) whose axial, coronal and sagittal slices each show the most of their rarest class."""
    classes = [v for v in np.unique(labels) if v != 0]
    best = []
    for axis in range(3):  # array axes (k, j, i)
        other = tuple(a for a in range(3) if a != axis)
        counts = np.stack([(labels == v).sum(axis=other) for v in classes])
        best.append(int(np.argmax(counts.min(axis=0))))
    k, j, i = best
    return i, j, k


# ---- rendering ---------------------------------------------------------------------------
def slice_logics(scene) -> tuple[object, dict]:
    """The application logic and the slice logics of the Red (axial), Green (coronal) and Yellow
    (sagittal) views, set up as Slicer does. The slice logics do not own the application logic:
    the caller must keep it alive while they are used, or they crash."""
    import slicer

    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    logics = {}
    for name, orientation in VIEWS.items():
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        logic.AddSliceNode(name).SetOrientation(orientation)
        logic.ResizeSliceNode(VIEW_SIZE, VIEW_SIZE)
        logics[name] = logic
    return app_logic, logics


def grab(logic) -> np.ndarray:
    """The view's composited image (all layers blended) over a black view background, as drawn on
    screen: (rows, columns, RGB), top row first. Outside the volume the image is transparent."""
    from vtk.util.numpy_support import vtk_to_numpy

    connection = logic.GetImageDataConnection()
    producer = connection.GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(connection.GetIndex())
    width, height, _ = image.GetDimensions()
    scalars = vtk_to_numpy(image.GetPointData().GetScalars())
    rgba = scalars.reshape(height, width, 4).astype(np.float32)
    pixels = rgba[..., :3] * (rgba[..., 3:] / 255.0)
    return pixels[::-1].round().astype(np.uint8)


def render(fixed: sitk.Image, labelmap: sitk.Image, opacity: float, window_level: tuple[float, float]) -> dict:
    """Axial, coronal and sagittal slice views of the map over the CT, set up by the module's Logic."""
    import slicer

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene  # slicer.util and the Logic work on slicer.mrmlScene
    module = load_module()
    app_logic, logics = slice_logics(scene)  # noqa: F841 (kept alive for the slice logics)

    fixedNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed CT")
    module.sitk_to_volume(fixed, fixedNode)
    fixedNode.CreateDefaultDisplayNodes()
    display = fixedNode.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    display.AutoWindowLevelOff()
    display.SetWindowLevel(*window_level)

    logic = module.RegistrationMisalignmentLogic()
    output = logic.writeOutput(labelmap, fixedNode, None)
    logic.showResult(output, fixedNode, opacity)

    i, j, k = most_mixed_voxel(sitk.GetArrayFromImage(labelmap))
    r, a, s = module.lps_to_ras(np.array(fixed.TransformIndexToPhysicalPoint((i, j, k))))
    shots = {}
    for name, sliceLogic in logics.items():
        orientation = VIEWS[name]
        sliceLogic.FitSliceToBackground()
        sliceLogic.SetSliceOffset({"Axial": s, "Coronal": a, "Sagittal": r}[orientation])
        shots[orientation] = grab(sliceLogic)
    return shots


# ---- the picture -------------------------------------------------------------------------
def save_figure(panels: dict, out: Path, caption: str) -> None:
    """The panels side by side with the module's class colours as legend and a caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from RegistrationMisalignmentLib.config import CLASS_NAMES, DEFAULT_CONFIG

    edges = ["< 3 mm", "3-6 mm", ">= 6 mm"]
    figure, axes = plt.subplots(1, len(panels), figsize=(max(4.2 * len(panels), 6.0), 5.2), squeeze=False)
    for ax, (title, pixels) in zip(axes[0], panels.items()):
        ax.imshow(pixels)
        ax.set_title(title)
        ax.axis("off")
    handles = [Patch(color=c, label=f"{n} ({e})") for n, c, e in zip(CLASS_NAMES, DEFAULT_CONFIG.class_colors, edges)]
    figure.legend(handles=handles, loc="lower center", ncol=3, frameon=False, bbox_to_anchor=(0.5, 0.07))
    figure.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=7.5, wrap=True)
    figure.tight_layout(rect=(0, 0.14, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixed", type=Path, required=True, help="fixed CT (any SimpleITK format)")
    parser.add_argument("--labelmap", type=Path, help="predicted labelmap on the fixed grid; default: a stand-in")
    parser.add_argument("--out", type=Path, required=True, help="PNG of the axial view")
    parser.add_argument("--montage", type=Path, help="also write axial, coronal and sagittal side by side here")
    parser.add_argument("--crop-z", type=int, nargs=2, metavar=("START", "STOP"), help="keep these slices only")
    parser.add_argument("--opacity", type=float, default=0.5, help="label layer opacity (the module's default)")
    parser.add_argument("--window-level", type=float, nargs=2, default=(1500.0, -400.0), metavar=("W", "L"))
    parser.add_argument("--dvf-kind", default="single", help="synthetic.dvf kind of the stand-in displacement")
    parser.add_argument("--seed", type=int, default=2, help="seed of the stand-in displacement")
    args = parser.parse_args(argv)

    fixed = read_fixed(args.fixed, args.crop_z)
    if args.labelmap:
        labelmap = read_fixed(args.labelmap, args.crop_z)
        caption = f"Slicer slice views: {args.labelmap.name} over {args.fixed.name}, label opacity {args.opacity}."
    else:
        labelmap = standin_labelmap(fixed, args.dvf_kind, args.seed)
        caption = ("Stand-in map, not a network prediction: |u| of a smooth synthetic displacement classed at "
                   f"3 / 6 mm inside the body, over {args.fixed.name}; rendered by Slicer's slice logic.")
    panels = render(fixed, labelmap, args.opacity, tuple(args.window_level))
    save_figure({"Axial": panels["Axial"]}, args.out, caption)
    if args.montage:
        save_figure(panels, args.montage, caption)
    print(f"wrote {args.out}" + (f" and {args.montage}" if args.montage else ""))


if __name__ == "__main__":
    main()
