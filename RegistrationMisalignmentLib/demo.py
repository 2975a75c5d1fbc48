"""``regmis demo``: a pair with a known deformation, predicted with the shipped model(s), scored.

The fixed image is the held-out slab of the shared real chest CT when it is present (the lowest-z
25 % of its slices, never seen in training), else a procedural phantom. The moving image is that CT
deformed by a respiratory DVF of a seed disjoint from training, with sponge model and noise, so the
true class of every voxel is known. Uses the trainer's deformation code (same distribution).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
from RegistrationMisalignmentLib.inference import Progress, predict
from RegistrationMisalignmentLib.io import write_image
from RegistrationMisalignmentLib.metrics import evaluate_classes
from RegistrationMisalignmentLib.weights import available_models, load_model

SHARED_CHEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_ct_1.5mm.nii.gz"
DEMO_SEED = 987_654
BODY_HU = -950.0


def demo_fixed_image() -> tuple[sitk.Image, str]:
    """The held-out slab of the shared chest CT on a 1 mm grid, or a phantom when it is absent."""
    from trainer.data import phantom_images, to_training_image

    if SHARED_CHEST.exists():
        image = to_training_image(sitk.ReadImage(str(SHARED_CHEST)), SHARED_CHEST.name, DEFAULT_CONFIG)
        image = image.crop_z(0, int(round(0.25 * image.hu.shape[0])))
    else:
        image = phantom_images(1, (160.0, 128.0, 96.0), DEMO_SEED, DEFAULT_CONFIG)[0]
    fixed = sitk.GetImageFromArray(image.hu)
    fixed.SetSpacing((DEFAULT_CONFIG.spacing_mm,) * 3)
    return fixed, image.name


def make_demo_pair(kind: str = "respiratory", seed: int = DEMO_SEED) -> tuple[sitk.Image, sitk.Image, np.ndarray, str]:
    """(fixed, moving, |DVF| in mm on the fixed grid, description)."""
    from trainer.deformations import deform_pair

    fixed, name = demo_fixed_image()
    hu = torch.from_numpy(sitk.GetArrayFromImage(fixed))
    moving_hu, dvf = deform_pair(hu, kind, fixed.GetSpacing(), torch.Generator().manual_seed(seed))
    moving = sitk.GetImageFromArray(moving_hu.numpy())
    moving.CopyInformation(fixed)
    magnitude = torch.linalg.vector_norm(dvf, dim=0).numpy()
    return fixed, moving, magnitude, f"{name} deformed by a {kind} DVF (seed {seed})"


def run_demo(out_dir: str | Path, device: str = "auto", progress: Progress | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Predict the demo pair with every shipped model; write images, metrics and an overlay PNG."""
    from RegistrationMisalignmentLib.figures import overlay_png

    out = Path(out_dir)
    fixed, moving, magnitude, description = make_demo_pair()
    log(f"demo pair: {description}, {fixed.GetSize()} voxels at {fixed.GetSpacing()[0]:g} mm")
    truth = DEFAULT_CONFIG.classify_mm(magnitude)
    body = sitk.GetArrayFromImage(fixed) > BODY_HU
    truth_image = sitk.GetImageFromArray((truth + 1).astype(np.uint8) * body)
    truth_image.CopyInformation(fixed)
    write_image(fixed, out / "fixed.nii.gz")
    write_image(moving, out / "moving.nii.gz")
    write_image(truth_image, out / "truth_labelmap.nii.gz")
    results = {"pair": description, "truth_class_fractions": np.bincount(truth[body], minlength=3).tolist(), "models": {}}
    for path in available_models():
        model = load_model(path)
        log(f"predicting with {model.name} ({model.decoder}) ...")
        prediction = predict(fixed, moving, model, device=device, progress=progress)
        pred = sitk.GetArrayFromImage(prediction.labelmap).astype(np.int64) - 1
        report = evaluate_classes(truth[body], pred[body])
        write_image(prediction.labelmap, out / f"labelmap_{model.name}.nii.gz")
        results["models"][model.name] = {"decoder": model.decoder, "seconds": prediction.seconds, **report.to_dict()}
        log(f"{model.name} ({model.decoder}), voxels in the body, {prediction.seconds:.1f} s:\n{report.format_table()}")
        if model.name == load_model().name:
            overlay_png(fixed, prediction.labelmap, out / "overlay.png", truth=truth_image,
                        title=f"{model.name}: {description}")
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {out / 'overlay.png'}, {out / 'metrics.json'} and the labelmaps in {out}")
    return results
