"""Measures the truth mix (correct / poor / wrong landmarks) that elastix leaves on the chest-CT study's case,
for the study's breathing field or a variant of it, in minutes instead of the whole study's 40.

    python benchmarks/truth_mix.py --settings affine,bspline20 --out benchmarks/results/truth_mix/default.md
    python benchmarks/truth_mix.py --slice-mm 2.5 --noise-hu 25 --out benchmarks/results/truth_mix/4dct.md
    python benchmarks/truth_mix.py --set cc_mm=20,28 --set local_mm=4,7

Why: the study needs >= 30 % of its landmarks poor or wrong over the five settings (DIR-Lab: 46.5 %), and
whether a change of the field or of the images gets there shows after the affine and the weakest B-spline
setting. The case is the study's first (POPI phase 00, field seed ``CHEST_SEED``, its 300 landmarks).
``--slice-mm``/``--noise-hu`` give both images a 4DCT-like acquisition: slabs of that thickness averaged
along z and sampled at that spacing (DIR-Lab: 2.5 mm), and Gaussian noise, drawn independently for the
fixed and the moving image. ``--set NAME=LOW,HIGH`` overrides a ``BreathingSettings`` range.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.publish import publish  # noqa: E402
from RegistrationMisalignmentLib.benchmark.cases import CHEST_SEED, SyntheticTruth, load_chest_scan  # noqa: E402
from RegistrationMisalignmentLib.benchmark.elastix import ElastixRunner, parse_settings  # noqa: E402
from RegistrationMisalignmentLib.config import DEFAULT_CONFIG  # noqa: E402
from RegistrationMisalignmentLib.synthetic.breathing import BreathingSettings, breathe  # noqa: E402


def acquire(image: sitk.Image, slice_mm: float, noise_hu: float, seed: int) -> sitk.Image:
    """``image`` as a 4DCT acquisition would give it: slabs of ``slice_mm`` along z, then noise (HU)."""
    out = image
    if slice_mm > 0:
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        width = max(1, int(round(slice_mm / image.GetSpacing()[2])))
        slab = sitk.GetImageFromArray(ndimage.uniform_filter1d(array, size=width, axis=0))
        slab.CopyInformation(image)
        size, spacing = list(image.GetSize()), list(image.GetSpacing())
        size[2] = int(size[2] * spacing[2] / slice_mm)
        spacing[2] = slice_mm
        out = sitk.Resample(slab, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                            image.GetDirection(), -1000.0, sitk.sitkFloat32)
    if noise_hu > 0:
        array = sitk.GetArrayFromImage(out)
        noisy = sitk.GetImageFromArray(array + np.random.default_rng(seed).normal(0.0, noise_hu, array.shape)
                                       .astype(np.float32))
        noisy.CopyInformation(out)
        out = noisy
    return out


def breathing_settings(overrides: list[str]) -> BreathingSettings:
    values = {}
    for item in overrides:
        name, _, text = item.partition("=")
        if name not in {f.name for f in dataclasses.fields(BreathingSettings)}:
            raise SystemExit(f"--set {item}: {name!r} is not a BreathingSettings field")
        numbers = tuple(float(v) for v in text.split(","))
        values[name] = numbers if len(numbers) > 1 else numbers[0]
    return dataclasses.replace(BreathingSettings(), **values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="affine,bspline20", help="elastix settings (default affine,bspline20)")
    parser.add_argument("--slice-mm", type=float, default=0.0, help="4DCT slab thickness and spacing along z")
    parser.add_argument("--noise-hu", type=float, default=0.0, help="Gaussian noise on both images (HU)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=LOW,HIGH")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the table here (markdown)")
    args = parser.parse_args(argv)
    settings = breathing_settings(args.set)
    started = time.perf_counter()
    scan = load_chest_scan(300, tiny=False)
    moved, field = breathe(sitk.GetArrayViewFromImage(scan.fixed), scan.box, CHEST_SEED, settings,
                           whole=(scan.hu, scan.anatomy.lung))
    moving = sitk.GetImageFromArray(moved)
    moving.CopyInformation(scan.fixed)
    fixed_acquired = acquire(scan.fixed, args.slice_mm, args.noise_hu, seed=1)
    moving_acquired = acquire(moving, args.slice_mm, args.noise_hu, seed=2)
    truth = SyntheticTruth(field.dvf.numpy(), scan.fixed)
    points = scan.landmarks.points_lps
    registrations = ElastixRunner(threads=args.threads).run_settings(fixed_acquired, moving_acquired,
                                                                     parse_settings(args.settings))
    motion = truth.residual_mm(points, lambda p: p)
    lines = [f"# Truth mix of the chest-CT study's case: `python benchmarks/truth_mix.py {' '.join(argv or sys.argv[1:])}`",
             "", f"Field parameters: {', '.join(f'{k} {v:.2f}' if isinstance(v, float) else f'{k} {v}' for k, v in field.parameters.items())}",
             f"Acquisition: slices {f'{args.slice_mm:g} mm' if args.slice_mm else 'as the scan (1 mm)'}, noise {args.noise_hu:g} HU on both images "
             f"(the moved image has the field's own {settings.noise_sigma_hu:g} HU besides).",
             f"Landmark motion: mean {motion.mean():.1f} mm, p95 {np.percentile(motion, 95):.1f} mm, largest {motion.max():.1f} mm "
             f"({len(points)} landmarks).", "",
             "| setting | mean residual (mm) | correct % | poor % | wrong % | poor + wrong % |", "|---|---|---|---|---|---|"]
    shares = []
    for name, registration in registrations.items():
        residual = truth.residual_mm(points, registration.map_points)
        share = 100.0 * np.bincount(DEFAULT_CONFIG.classify_mm(residual), minlength=3) / len(residual)
        shares.append(share)
        lines.append(f"| {name} | {residual.mean():.2f} | {share[0]:.1f} | {share[1]:.1f} | {share[2]:.1f} | "
                     f"{share[1] + share[2]:.1f} |")
    total = np.mean(shares, axis=0)
    lines += [f"| these settings together | | {total[0]:.1f} | {total[1]:.1f} | {total[2]:.1f} | {total[1] + total[2]:.1f} |",
              "", f"Wall time {time.perf_counter() - started:.0f} s ({args.threads} elastix threads)."]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
