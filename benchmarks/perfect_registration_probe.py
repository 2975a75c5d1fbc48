"""What does a model call misaligned after a perfect registration of a large breathing motion?

    python benchmarks/perfect_registration_probe.py --out benchmarks/results/training/perfect_registration_probe.md

Why: on the whole-chest protocol the model's false alarms after B-spline registrations sit where the breathing
field had moved the lung most (``false_alarm_probe.py``). This takes the protocol's case (the held-out POPI
scan, its breathing field m, sponge model and noise) and registers it with the exact inverse of m
(SimpleITK's InvertDisplacementField), so that the residual is ~0 everywhere, sliding included: every voxel
the model then calls poor or wrong is a false alarm, caused by what a registered large motion leaves in the
image (density change, noise, two interpolations), not by a residual. Reported per band of slices (the
lung base first, where the motion is largest). ``--cues`` also builds the registered image with one cue
alone: "interpolation" (the breathing warp and its inverse, no sponge model, no noise) and "density" (the
fixed image with the sponge model's density change that the registered image carries, never resampled).
About 5 minutes per model and image on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.publish import publish  # noqa: E402
from RegistrationMisalignmentLib.benchmark.cases import CHEST_SEED, chest_case, load_chest_scan  # noqa: E402
from RegistrationMisalignmentLib.synthetic.breathing import BreathingSettings, breathe, sample_at  # noqa: E402
from RegistrationMisalignmentLib.synthetic.deform import jacobian_determinant, sponge  # noqa: E402
from RegistrationMisalignmentLib.inference import predict  # noqa: E402
from RegistrationMisalignmentLib.spatial import compose  # noqa: E402
from RegistrationMisalignmentLib.weights import load_model  # noqa: E402

BAND_SLICES = 40
MAX_RESIDUAL_MM = 0.5
"""Lung voxels where the inverse leaves more (it runs out of the box at its faces) are not scored."""


def inverse_transform(case) -> tuple[sitk.DisplacementFieldTransform, np.ndarray]:
    """The exact inverse v of the case's breathing field u as a transform (fixed -> moving points), and the
    residual |v(x) + u(x + v(x))| (mm) it leaves at every voxel (D, H, W): large only where x + v(x) leaves the
    box (the field is not known there)."""
    dvf = np.asarray(case.truth.dvf)  # (3, D, H, W), components along i, j, k: the grid is 1 mm, axis-aligned
    field = sitk.GetImageFromArray(np.moveaxis(dvf, 0, -1).astype(np.float64), isVector=True)
    field.CopyInformation(case.fixed)
    inverse = sitk.InvertDisplacementField(field, maximumNumberOfIterations=30, maxErrorToleranceThreshold=0.01,
                                           meanErrorToleranceThreshold=1e-4, enforceBoundaryCondition=False)
    v = torch.from_numpy(np.moveaxis(sitk.GetArrayFromImage(inverse), -1, 0).astype(np.float32))
    residual = torch.linalg.vector_norm(compose(v, torch.from_numpy(dvf.astype(np.float32))), dim=0).numpy()
    return sitk.DisplacementFieldTransform(inverse), residual


def one_cue(scan, case, field, transform, cue: str) -> sitk.Image:
    """The registered moving image with one cue alone (see the module doc), on the fixed grid; ``field`` is the
    case's ``BreathingField``."""
    spacing = scan.fixed.GetSpacing()
    if cue == "interpolation":
        moved = sample_at(torch.from_numpy(np.ascontiguousarray(scan.hu, dtype=np.float32)), scan.box.offset,
                          field.dvf, spacing).numpy()
        image = sitk.GetImageFromArray(moved.astype(np.float32))
        image.CopyInformation(case.fixed)
        return sitk.Resample(image, case.fixed, transform, sitk.sitkLinear, -1000.0)
    clamp = BreathingSettings().sponge_clamp  # breathe's sponge model, in the lungs only
    divisor = (1.0 / jacobian_determinant(field.inside, spacing).clamp(min=1e-3)).clamp(*clamp)
    divisor = torch.where(field.lung_side, divisor, torch.ones_like(divisor)).numpy().astype(np.float32)
    divisor_image = sitk.GetImageFromArray(divisor)
    divisor_image.CopyInformation(case.fixed)
    at_registered = sitk.GetArrayFromImage(sitk.Resample(divisor_image, case.fixed, transform, sitk.sitkLinear, 1.0))
    fixed = torch.from_numpy(sitk.GetArrayFromImage(case.fixed).astype(np.float32))
    image = sitk.GetImageFromArray(sponge(fixed, torch.from_numpy(at_registered), clamp).numpy())
    image.CopyInformation(case.fixed)
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", type=Path, help="model files (.pt, card beside); default the shipped LSTM")
    parser.add_argument("--cues", action="store_true", help="also the images with one cue alone (interpolation, density)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    scan = load_chest_scan(300, tiny=False)
    case = chest_case(scan, 0, tiny=False)
    if not np.allclose(np.array(case.fixed.GetDirection()).reshape(3, 3), np.eye(3)):
        raise SystemExit("the held-out scan is not axis-aligned: the DVF's components would need rotating")
    transform, residual = inverse_transform(case)
    images = {"registered": sitk.Resample(case.moving, case.fixed, transform, sitk.sitkLinear, -1000.0)}
    if args.cues:  # the case's field again (chest_case keeps only its DVF), drawn from the same seed
        _, field = breathe(sitk.GetArrayViewFromImage(scan.fixed), scan.box, CHEST_SEED,
                           whole=(scan.hu, scan.anatomy.lung))
        images |= {cue: one_cue(scan, case, field, transform, cue) for cue in ("interpolation", "density")}
    lung = scan.box.lung & (residual < MAX_RESIDUAL_MM)
    bands = [(a, min(a + BAND_SLICES, lung.shape[0])) for a in range(0, lung.shape[0], BAND_SLICES)]
    bands = [(a, b) for a, b in bands if lung[a:b].any()]
    lines = [f"# After a perfect registration: `python benchmarks/perfect_registration_probe.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"Case {case.name}; registered by the exact inverse of its breathing field: residual over the lung median "
             f"{np.median(residual[scan.box.lung]):.3f} mm; the {lung.sum():,} lung voxels where it is under "
             f"{MAX_RESIDUAL_MM:g} mm ({100 * lung.sum() / scan.box.lung.sum():.1f} % of the lung) are truly correct "
             "and scored: share called poor / wrong, by band of slices (0: the lung base):", "",
             "| model | image | " + " | ".join(f"slices {a}-{b - 1}" for a, b in bands) + " | whole lung |",
             "|---|---|" + "---|" * (len(bands) + 1)]
    for path in args.models or [None]:
        model = load_model(path)
        for name, image in images.items():
            labels = sitk.GetArrayFromImage(predict(case.fixed, image, model, device="cpu").labelmap)
            cells = []
            for a, b in bands + [(0, lung.shape[0])]:
                called = labels[a:b][lung[a:b]]
                cells.append(f"{100 * np.mean(called == 2):.1f} / {100 * np.mean(called == 3):.1f}")
            lines.append(f"| {model.path.name} ({model.card['sha256'][:12]}) | {name} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    lines += ["", f"Wall time {time.perf_counter() - started:.0f} s."]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
