"""Render the learned map beside the classical registration checks on a real chest CT registered by elastix.

The figure for the README (``Resources/Screenshots/registration_checks.png``) and its numbers
(``benchmarks/results/registration_checks.json``). The case, with a known answer:

* moving: the shared chest CT crop (``../shared/data/chest_ct_1.5mm.nii.gz``, 1.5 mm, lungs, heart, diaphragm);
* fixed: the same CT moved by a known physiological breathing field u (``synthetic.breathing.breathe``: the
  benchmark's chest-CT truth; cranio-caudal lung motion up to ~20 mm that slides along the chest wall and
  the mediastinum, rib-cage expansion, smooth local variation, sponge model in the lungs, 5 HU noise),
  F(x) = M(x + u(x)), so the true fixed -> moving map is x + u(x);
* the registration: elastix affine then B-spline with 20 iterations (the evaluation protocol's
  ``bspline20``, ``benchmark.elastix``), both directions (the other one for inverse consistency);
  its true residual is |T(x) - (x + u(x))|, classed at 3 / 6 mm;
* the checks: ``checks.run.run_checks`` with every check, the shipped default model for the learned map,
  inside the fixed image's lungs grown by 4.5 mm (where a lung registration is judged; its surfaces are where
  the sliding makes a smooth B-spline fail), the outer 9 mm of the image left out.

Rows: an axial and a coronal slice through the most misaligned region; columns: the truth, the learned
map, its confidence, the Jacobian determinant, inverse consistency, the intensity difference and the
re-registration (elastix-t) classes. Under each map: how it agrees with the truth over the body (class
maps: mean F1 and kappa; continuous maps: Spearman rank correlation with the true residual).

    python -m benchmarks.render_checks [--out Resources/Screenshots/registration_checks.png] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
CHEST = REPO.parent / "shared" / "data" / "chest_ct_1.5mm.nii.gz"
COLUMNS = ("truth", "learned", "confidence", "jacobian", "inverse_consistency", "intensity", "reregistration")


def make_case(seed: int) -> tuple[sitk.Image, sitk.Image, np.ndarray, sitk.Image, dict]:
    """(fixed, moving, u, mask, parameters): moving the CT, fixed = moving moved by u (3, z, y, x; mm, x y z
    components), mask the fixed image's lungs grown by 3 voxels without the outer 6 voxels (uint8)."""
    from RegistrationMisalignmentLib.synthetic.breathing import breathe, chest_anatomy

    moving = sitk.Cast(sitk.ReadImage(str(CHEST)), sitk.sitkFloat32)
    hu = sitk.GetArrayFromImage(moving)
    moved, field = breathe(hu, chest_anatomy(hu, moving.GetSpacing()), seed)
    fixed = sitk.GetImageFromArray(moved)
    fixed.CopyInformation(moving)
    lungs = sitk.GetImageFromArray(field.lung_side.numpy().astype(np.uint8))
    lungs.CopyInformation(fixed)
    region = sitk.GetArrayFromImage(sitk.BinaryDilate(lungs, [3, 3, 3]))
    inner = np.zeros_like(region)
    inner[6:-6, 6:-6, 6:-6] = 1
    mask = sitk.GetImageFromArray((region * inner).astype(np.uint8))
    mask.CopyInformation(fixed)
    return fixed, moving, field.dvf.numpy().astype(np.float64), mask, field.parameters


def itk_displacement(transform, reference: sitk.Image) -> sitk.Image:
    """T(x) - x of an ITK transform (elastix's combination transform) on ``reference``'s grid."""
    import itk

    from RegistrationMisalignmentLib.benchmark.elastix import _to_itk

    vector = itk.Image[itk.Vector[itk.F, 3], 3]
    make = itk.TransformToDisplacementFieldFilter[vector, itk.D].New()
    make.SetTransform(transform)
    make.SetReferenceImage(_to_itk(reference))
    make.SetUseReferenceImage(True)
    make.Update()
    field = sitk.GetImageFromArray(itk.array_from_image(make.GetOutput()).astype(np.float64), isVector=True)
    field.CopyInformation(reference)
    return field


def register(fixed: sitk.Image, moving: sitk.Image, runner) -> tuple[sitk.Image, sitk.Image]:
    """(deformed moving, displacement field of T on the fixed grid): elastix affine, then B-spline 20."""
    affine = runner.register(fixed, moving, "affine.txt")
    bspline = runner.register(fixed, moving, "bspline20.txt", affine)
    return bspline.deformed, itk_displacement(bspline.transform, fixed)


def agreement(maps: dict[str, sitk.Image], truth_mm: np.ndarray, body: np.ndarray) -> dict[str, dict]:
    """How each map agrees with the true residual inside the body."""
    from scipy.stats import spearmanr

    from RegistrationMisalignmentLib.checks.maps import MAPS
    from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
    from RegistrationMisalignmentLib.metrics import evaluate_classes

    true = DEFAULT_CONFIG.classify_mm(truth_mm[body])
    rng = np.random.default_rng(0)
    sample = rng.choice(int(body.sum()), size=min(200_000, int(body.sum())), replace=False)
    out = {}
    for key, image in maps.items():
        values = sitk.GetArrayFromImage(image)[body]
        if MAPS[key].kind == "classes":
            inside = values > 0
            report = evaluate_classes(true[inside], values[inside].astype(np.int64) - 1)
            out[key] = {"mean_f1": report.mean_f1, "kappa": report.kappa, "accuracy": report.accuracy, "n": report.n}
        else:
            out[key] = {"spearman_with_true_residual": float(spearmanr(values[sample], truth_mm[body][sample]).statistic)}
    return out


def draw(path: Path, fixed: sitk.Image, truth: sitk.Image, maps: dict[str, sitk.Image], scores: dict[str, dict],
         summary, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap, ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    from RegistrationMisalignmentLib.checks.maps import MAPS
    from RegistrationMisalignmentLib.figures import _slice, class_legend, slice_indices

    ct = sitk.GetArrayFromImage(fixed)
    truth_labels = sitk.GetArrayFromImage(truth)
    index = slice_indices(ct.shape, truth_labels >= 2, tuple(s // 2 for s in ct.shape))
    sx, sy, sz = fixed.GetSpacing()
    aspects = [sy / sx, sz / sx]
    classes = ListedColormap([(0, 0, 0, 0)] + [(*c, 1.0) for c in MAPS["learned"].colors])
    rows = {m.key: m for m in summary.maps}
    width = 2.6  # inches per column
    heights = [width * ct.shape[1] * sy / (ct.shape[2] * sx), width * ct.shape[0] * sz / (ct.shape[2] * sx), 0.16]
    fig = plt.figure(figsize=(width * len(COLUMNS), sum(heights) + 1.6))
    grid = fig.add_gridspec(3, len(COLUMNS), height_ratios=heights, hspace=0.06, wspace=0.04, top=0.86, bottom=0.07,
                            left=0.03, right=0.99)
    axes = [[fig.add_subplot(grid[r, c]) for c in range(len(COLUMNS))] for r in range(2)]
    for c, key in enumerate(COLUMNS):
        volume = truth_labels if key == "truth" else sitk.GetArrayFromImage(maps[key])
        info = MAPS["learned" if key == "truth" else key]
        for r, view in enumerate((0, 1)):
            ax = axes[r][c]
            ax.imshow(_slice(ct, view, index[view]), cmap="gray", vmin=-1000, vmax=400, aspect=aspects[view],
                      interpolation="nearest")
            plane = _slice(volume, view, index[view])
            if info.kind == "classes":
                ax.imshow(np.ma.masked_equal(plane, 0), cmap=classes, vmin=0, vmax=3, alpha=0.55,
                          aspect=aspects[view], interpolation="nearest")
            else:
                low, high = info.display_range
                region = _slice(truth_labels, view, index[view]) > 0
                shown = ax.imshow(np.ma.masked_where(~region, plane), aspect=aspects[view], interpolation="nearest",
                                  cmap=LinearSegmentedColormap.from_list(key, info.colors), vmin=low, vmax=high,
                                  alpha=0.9)
                if r == 1:
                    bar = fig.colorbar(shown, cax=fig.add_subplot(grid[2, c]), orientation="horizontal")
                    bar.ax.xaxis.set_major_locator(MaxNLocator(5))
                    bar.set_label(info.unit, fontsize=8)
                    bar.ax.tick_params(labelsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        name = "truth |T(x) - x - u(x)|" if key == "truth" else info.title
        note = ""
        if key in scores:
            s = scores[key]
            note = (f"mean F1 {100 * s['mean_f1']:.0f} %, kappa {s['kappa']:.2f}" if "mean_f1" in s
                    else f"Spearman vs truth {s['spearman_with_true_residual']:+.2f}")
        if key == "jacobian":
            note += f"\nfolding {100 * rows[key].jacobian.folding_share:.2f} %"
        axes[0][c].set_title(f"{name}\n{note}", fontsize=9)
    axes[0][0].set_ylabel("axial", fontsize=10)
    axes[1][0].set_ylabel("coronal", fontsize=10)
    handles = [Patch(color=MAPS["learned"].colors[i], label=text) for i, text in enumerate(class_legend())]
    legend_axis = fig.add_subplot(grid[2, 0:2])
    legend_axis.axis("off")
    legend_axis.legend(handles=handles, loc="center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "Resources" / "Screenshots" / "registration_checks.png")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "registration_checks.json")
    parser.add_argument("--seed", type=int, default=3, help="seed of the breathing field (default 3)")
    parser.add_argument("--threads", type=int, help="torch and ITK threads (default: all cores)")
    args = parser.parse_args(argv)

    import torch

    from RegistrationMisalignmentLib.benchmark.elastix import ElastixRunner
    from RegistrationMisalignmentLib.checks.run import CHECKS, run_checks
    from RegistrationMisalignmentLib.config import DEFAULT_CONFIG

    if args.threads:
        torch.set_num_threads(args.threads)
    seconds = {}
    start = time.perf_counter()
    fixed, moving, u, mask, parameters = make_case(args.seed)
    seconds["case"] = time.perf_counter() - start
    runner = ElastixRunner(threads=args.threads)
    t = time.perf_counter()
    deformed, forward = register(fixed, moving, runner)
    _, backward = register(moving, fixed, runner)
    seconds["elastix_both_directions"] = time.perf_counter() - t
    # The truth: T(x) should be x + u(x); the residual is |(T(x) - x) - u(x)|.
    residual = np.linalg.norm(sitk.GetArrayFromImage(forward) - np.moveaxis(u, 0, -1), axis=-1)
    t = time.perf_counter()
    results = run_checks(fixed, deformed, CHECKS, transform=forward, inverse_transform=backward, mask=mask,
                         threads=args.threads,
                         progress=lambda f, m: print(f"\r{100 * f:5.1f}% {m[:70]:<70}", end="", flush=True),
                         log=lambda m: print(f"\nnote: {m}"))
    print()
    seconds["checks"] = time.perf_counter() - t
    seconds.update({f"check_{k}": v for k, v in results.seconds.items()})
    body = sitk.GetArrayFromImage(results.region) > 0
    labels = np.asarray(DEFAULT_CONFIG.label_values, np.uint8)[DEFAULT_CONFIG.classify_mm(residual)]
    labels[~body] = 0
    truth = sitk.GetImageFromArray(labels)
    truth.CopyInformation(fixed)
    shown = {k: results.maps[k] for k in COLUMNS[1:]}
    scores = agreement({**shown, "entropy": results.maps["entropy"], "residual": results.maps["residual"]},
                       residual, body)
    true_shares = [float(np.mean(labels[body] == v)) for v in DEFAULT_CONFIG.label_values]
    title = (f"Real chest CT (1.5 mm) against itself moved by a known breathing field (sliding lungs), registered by "
             f"elastix affine + B-spline (20 iterations).\nIn the lungs (+4.5 mm) the true residual is correct / poor / "
             f"wrong {' / '.join(f'{100 * s:.0f}' for s in true_shares)} %; under each map, its agreement with that "
             "truth (voxel-wise)")
    draw(args.out, fixed, truth, results.maps, scores, results.summary, title)
    print(results.summary.format_table())
    document = {"case": {"ct": CHEST.name, "seed": args.seed, "field": "synthetic.breathing", "parameters": parameters,
                         "registration": "elastix affine + bspline20, both directions",
                         "region": "fixed lungs grown by 3 voxels, outer 6 voxels left out",
                         "true_class_shares_in_region": dict(zip(("correct", "poor", "wrong"), true_shares)),
                         "true_residual_mm_mean": float(residual[body].mean())},
                "agreement_with_truth": scores, "summary": results.summary.to_dict(), "seconds": seconds}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out} and {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
