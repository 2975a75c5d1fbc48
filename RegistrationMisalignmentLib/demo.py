"""``regmis demo``: a chest CT region with a known breathing-like deformation, predicted and scored.

The fixed image is the right lower lung of the POPI 4-D CT (phase 00) in ``../shared/data`` when it is
present: a whole chest CT that no shipped model was trained on (``DEMO_SCAN``). The whole scan is
deformed by a respiratory DVF (diaphragm shift + chest expansion + a random smooth field, with the
sponge model and 5 HU noise; a seed disjoint from training), then the region is cut from both images
and from the DVF, so the true class of every voxel is known. Without the shared data a procedural
phantom stands in. The deformation is ``synthetic.deform``'s, the distribution the models were trained on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from RegistrationMisalignmentLib.body_mask import body_mask
from RegistrationMisalignmentLib.config import CLASS_NAMES, DEFAULT_CONFIG
from RegistrationMisalignmentLib.inference import Progress, predict
from RegistrationMisalignmentLib.io import write_image
from RegistrationMisalignmentLib.metrics import evaluate_classes
from RegistrationMisalignmentLib.synthetic.deform import deform_pair
from RegistrationMisalignmentLib.synthetic.images import phantom_images, to_training_image
from RegistrationMisalignmentLib.weights import available_models, load_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEMO_SCAN = "popi_00_chest_ct.nii.gz"
DEMO_REGION = ((40, 168), (72, 264), (88, 248))
"""(start, stop) 1 mm voxels along z, y, x of the scan's 1 mm grid: the right lung's lower half with the
diaphragm dome and the chest wall, 128 x 192 x 160 mm (3.9 M voxels; about a minute per model on 2 cores)."""
DEMO_SEED = 987_654
LUNG_HU = (-950.0, -400.0)
"""Lung parenchyma: the figure's slices pass where the most lung voxels are poor or wrong."""

ProgressBar = Callable[[str], AbstractContextManager[Progress | None]]


def _on_1mm_grid(array: np.ndarray, origin: tuple[float, float, float]) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((DEFAULT_CONFIG.spacing_mm,) * 3)
    image.SetOrigin(origin)
    return image


def make_demo_pair(kind: str = "respiratory", seed: int = DEMO_SEED, scan_name: str = DEMO_SCAN,
                   region_zyx: tuple[tuple[int, int], ...] = DEMO_REGION) -> tuple[sitk.Image, sitk.Image, np.ndarray, str]:
    """(fixed, moving, |DVF| in mm on the fixed grid, a plain description of the pair).

    The whole scan ``scan_name`` of the shared data is deformed, then ``region_zyx`` ((start, stop) 1 mm
    voxels along z, y, x of its 1 mm grid) is cut from both images and the DVF.
    """
    scan = SHARED_DATA / scan_name
    if scan.exists():
        source = sitk.ReadImage(str(scan))
        hu = to_training_image(source, scan_name, DEFAULT_CONFIG).hu
        region = tuple(slice(a, b) for a, b in region_zyx)
        description = ("POPI 4-D CT phase 00 (no model was trained on it), right lower lung" if scan_name == DEMO_SCAN
                       else f"{scan_name}, 1 mm voxels {region_zyx} (z, y, x)")
    else:
        source = None
        hu = phantom_images(1, (160.0, 128.0, 96.0), DEMO_SEED, DEFAULT_CONFIG)[0].hu
        region = (slice(None),) * 3
        description = "procedural chest phantom (the shared CT data is not on this machine)"
    moving, dvf = deform_pair(torch.from_numpy(hu), kind, (DEFAULT_CONFIG.spacing_mm,) * 3,
                              torch.Generator().manual_seed(seed))
    magnitude = dvf.square().sum(0).sqrt().numpy()[region]
    start = [r.start or 0 for r in region][::-1]
    origin = tuple(float(o + s * DEFAULT_CONFIG.spacing_mm) for o, s in
                   zip(source.GetOrigin() if source is not None else (0.0, 0.0, 0.0), start))
    fixed = _on_1mm_grid(np.ascontiguousarray(hu[region]), origin)
    moving_image = _on_1mm_grid(np.ascontiguousarray(moving.numpy()[region]), origin)
    return fixed, moving_image, magnitude, f"{description}, deformed by a known {kind} field"


def run_demo(out_dir: str | Path, device: str = "auto", progress_bar: ProgressBar = lambda name: nullcontext(None),
             log: Callable[[str], None] = print) -> dict:
    """Predict the demo pair with every shipped model, one progress bar each; write the images, the
    labelmaps, ``metrics.json`` and ``overlay.png`` (the default model against the truth) to ``out_dir``."""
    from RegistrationMisalignmentLib.figures import overlay_png

    out = Path(out_dir)
    fixed, moving, magnitude, description = make_demo_pair()
    log(f"demo pair: {description}; {'x'.join(map(str, fixed.GetSize()))} voxels at {fixed.GetSpacing()[0]:g} mm")
    truth = DEFAULT_CONFIG.classify_mm(magnitude)
    body = sitk.GetArrayFromImage(body_mask(fixed)) > 0  # what predict covers by default
    truth_image = sitk.GetImageFromArray((truth + 1).astype(np.uint8) * body)
    truth_image.CopyInformation(fixed)
    write_image(fixed, out / "fixed.nii.gz")
    write_image(moving, out / "moving.nii.gz")
    write_image(truth_image, out / "truth_labelmap.nii.gz")
    shares = np.bincount(truth[body], minlength=3) / max(int(body.sum()), 1)
    log("truth inside the body: " + ", ".join(f"{n} {100 * s:.1f} %" for n, s in zip(CLASS_NAMES, shares)))
    results = {"pair": description, "truth_class_fractions": np.bincount(truth[body], minlength=3).tolist(), "models": {}}
    default = load_model()
    notes = {}
    for path in available_models():
        model = load_model(path)
        with progress_bar(f"{model.name} ({model.decoder})") as update:
            prediction = predict(fixed, moving, model, device=device, progress=update)
        pred = sitk.GetArrayFromImage(prediction.labelmap).astype(np.int64) - 1
        report = evaluate_classes(truth[body], pred[body])
        write_image(prediction.labelmap, out / f"labelmap_{model.name}.nii.gz")
        results["models"][model.name] = {"decoder": model.decoder, "seconds": prediction.seconds, **report.to_dict()}
        notes[model.name] = (f"{model.decoder}: mean F1 {100 * report.mean_f1:.1f} %, kappa {report.kappa:.2f}, "
                             f"accuracy {100 * report.accuracy:.1f} %")
        log(f"{model.name} ({model.decoder}), voxels in the body, {prediction.seconds:.1f} s:\n{report.format_table()}")
        if model.name == default.name:
            shown = prediction.labelmap
    ct = sitk.GetArrayFromImage(fixed)
    lung = (ct > LUNG_HU[0]) & (ct < LUNG_HU[1])
    overlay_png(fixed, shown, out / "overlay.png", truth=truth_image, focus=lung & (truth >= 1),
                title=f"Predicted vs true misalignment, held-out chest CT\n{description}",
                row_notes={"prediction": notes[default.name],
                           "truth": ", ".join(f"{n} {100 * s:.0f} %" for n, s in zip(CLASS_NAMES, shares))},
                footnote="Scores over every body voxel of the region: " + "; ".join(notes.values()))
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {out / 'overlay.png'}, {out / 'metrics.json'} and the labelmaps in {out}")
    return results
