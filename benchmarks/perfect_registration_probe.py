"""What does a model call misaligned after a perfect registration of a large breathing motion?

    python benchmarks/perfect_registration_probe.py --out benchmarks/results/training/perfect_registration_probe.md

Why: on the whole-chest protocol the model's false alarms after B-spline registrations sit where the breathing
field had moved the lung most (``false_alarm_probe.py``). This takes the protocol's case (the held-out POPI
scan, its breathing field m, sponge model and noise) and registers it with the exact inverse of m
(SimpleITK's InvertDisplacementField), so that the residual is ~0 everywhere, sliding included: every voxel
the model then calls poor or wrong is a false alarm, caused by what a registered large motion leaves in the
image (density change, noise, two interpolations), not by a residual. Reported per band of slices (the
lung base first, where the motion is largest). About 5 minutes per model on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.publish import publish  # noqa: E402
from RegistrationMisalignmentLib.benchmark.cases import chest_case, load_chest_scan  # noqa: E402
from RegistrationMisalignmentLib.inference import predict  # noqa: E402
from RegistrationMisalignmentLib.weights import load_model  # noqa: E402

BAND_SLICES = 40


def perfectly_registered(case) -> tuple[sitk.Image, np.ndarray]:
    """The case's moving image resampled by the exact inverse of its breathing field, and the residual (mm)
    that inverse leaves at the case's landmarks."""
    dvf = np.asarray(case.truth.dvf)  # (3, D, H, W), components along i, j, k: the grid is 1 mm, axis-aligned
    field = sitk.GetImageFromArray(np.moveaxis(dvf, 0, -1).astype(np.float64), isVector=True)
    field.CopyInformation(case.fixed)
    inverse = sitk.InvertDisplacementField(field, maximumNumberOfIterations=30, maxErrorToleranceThreshold=0.01,
                                           meanErrorToleranceThreshold=1e-4, enforceBoundaryCondition=True)
    transform = sitk.DisplacementFieldTransform(inverse)
    points = case.landmarks.points_lps
    mapped = np.array([transform.TransformPoint(tuple(map(float, p))) for p in points])
    residual = np.linalg.norm(mapped + case.truth.displacement_at(mapped) - points, axis=1)
    return sitk.Resample(case.moving, case.fixed, transform, sitk.sitkLinear, -1000.0), residual


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", type=Path, help="model files (.pt, card beside); default the shipped LSTM")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    scan = load_chest_scan(300, tiny=False)
    case = chest_case(scan, 0, tiny=False)
    if not np.allclose(np.array(case.fixed.GetDirection()).reshape(3, 3), np.eye(3)):
        raise SystemExit("the held-out scan is not axis-aligned: the DVF's components would need rotating")
    registered, residual = perfectly_registered(case)
    lung = scan.box.lung
    bands = [(a, min(a + BAND_SLICES, lung.shape[0])) for a in range(0, lung.shape[0], BAND_SLICES)]
    bands = [(a, b) for a, b in bands if lung[a:b].any()]
    lines = [f"# After a perfect registration: `python benchmarks/perfect_registration_probe.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"Case {case.name}; registered by the exact inverse of its breathing field: residual at its "
             f"{len(residual)} landmarks median {np.median(residual):.2f} mm, max {residual.max():.2f} mm. Every lung "
             "voxel is truly correct; share of lung voxels called poor / wrong, by band of slices (0: the lung base):", "",
             "| model | " + " | ".join(f"slices {a}-{b - 1}" for a, b in bands) + " | whole lung |",
             "|---|" + "---|" * (len(bands) + 1)]
    for path in args.models or [None]:
        model = load_model(path)
        labels = sitk.GetArrayFromImage(predict(case.fixed, registered, model, device="cpu").labelmap)
        cells = []
        for a, b in bands + [(0, lung.shape[0])]:
            called = labels[a:b][lung[a:b]]
            cells.append(f"{100 * np.mean(called == 2):.1f} / {100 * np.mean(called == 3):.1f}")
        lines.append(f"| {model.path.name} ({model.card['sha256'][:12]}) | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines += ["", f"Wall time {time.perf_counter() - started:.0f} s."]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
