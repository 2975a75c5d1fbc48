"""Measures how large RegNet-t's displacement is at the protocol's landmarks beside the true residual there.

    python benchmarks/regnet_t_calibration.py --models Resources/Models/regmis_regnet_t.pt \
        benchmarks/results/training/canonical/regmis_regnet_t.pt --out benchmarks/results/training/regnet_t_calibration.md

Why: RegNet-t (method.md) classes |DVF| at 3 and 6 mm, so a RegNet that points the right way but predicts a
fraction of the displacement calls nearly everything "correct"; the protocol's F1 alone cannot tell that from
a RegNet that has learned nothing. Per model: the mean ‖DVF‖ at the landmarks, its correlation with the true
residual (TRE), the least-squares slope through 0 of |DVF| on TRE (1 = the right size) and each pyramid level's
mean |residual DVF| over its grid. Data: the whole-chest protocol case (``regmis benchmark --chest-ct``: POPI
phase 00, held out of training, moved by a breathing field) registered with one elastix setting (default affine).
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
from RegistrationMisalignmentLib import inference  # noqa: E402
from RegistrationMisalignmentLib.benchmark.cases import chest_ct_cases  # noqa: E402
from RegistrationMisalignmentLib.benchmark.elastix import ElastixRunner  # noqa: E402
from RegistrationMisalignmentLib.config import DEFAULT_CONFIG  # noqa: E402
from RegistrationMisalignmentLib.preprocess import build_pyramid  # noqa: E402
from RegistrationMisalignmentLib.progress import Reporter  # noqa: E402
from RegistrationMisalignmentLib.weights import load_model  # noqa: E402


def level_magnitudes(model, pyramid: dict[int, torch.Tensor], tile_size: int) -> tuple[np.ndarray, dict[int, float]]:
    """RegNet-t's total DVF (3, D, H, W) in mm and each level's mean |residual DVF| (mm) over its grid."""
    levels: dict[int, float] = {}
    dense = inference.dense_dvf

    def recorded(module, pair, scale, *args, **kwargs):
        dvf = dense(module, pair, scale, *args, **kwargs)
        levels[scale] = float(torch.linalg.vector_norm(dvf, dim=0).mean())
        return dvf

    inference.dense_dvf = recorded  # regnet_t_displacement looks it up in the module at each level
    try:
        total = inference.regnet_t_displacement(model.module, pyramid, model.config, tile_size, model.config.tile_batch,
                                                Reporter())
    finally:
        inference.dense_dvf = dense
    return total.numpy(), levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="RegNet-t models (.pt with their .json cards)")
    parser.add_argument("--setting", default="affine", help="elastix setting of the protocol (default affine)")
    parser.add_argument("--tile-size", type=int, default=192)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)

    case = next(chest_ct_cases(1, 300, False))
    registration = ElastixRunner(threads=2).run_settings(case.fixed, case.moving, [args.setting])[args.setting]
    points = case.landmarks.points_lps
    tre = case.truth.residual_mm(points, registration.map_points)
    # the case is on a 1 mm grid already (isotropic_reference would return the same grid)
    index = np.array([case.fixed.TransformPhysicalPointToIndex(tuple(map(float, p))) for p in points])[:, ::-1]
    pyramid = build_pyramid(sitk.GetArrayFromImage(case.fixed), sitk.GetArrayFromImage(registration.deformed),
                            load_model(args.models[0]).config)

    def classes(mm: np.ndarray) -> str:
        return " / ".join(str(c) for c in np.bincount(DEFAULT_CONFIG.classify_mm(mm), minlength=3))

    lines = ["# RegNet-t's displacement beside the true residual at the protocol's landmarks", "",
             f"Command: `python benchmarks/regnet_t_calibration.py --models {' '.join(args.models)} --setting "
             f"{args.setting}`  ", f"Case: {case.name} ({len(points)} lung landmarks), elastix setting "
             f"`{args.setting}`; true residual (TRE) mean {tre.mean():.2f} mm, median {np.median(tre):.2f} mm, "
             f"classes correct / poor / wrong {classes(tre)}.", "",
             "Slope: least squares through 0 of ‖DVF‖ on TRE at the landmarks (1 = the right size). Levels: mean "
             "‖residual DVF‖ each RegNet adds over its whole pyramid level (mm).", "",
             "| model | epochs x4 / x2 / x1 | mean ‖DVF‖ mm | median mm | correlation with TRE | slope | "
             "classes c / p / w | level x4 | x2 | x1 | s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in args.models:
        started = time.perf_counter()
        model = load_model(path)
        total, levels = level_magnitudes(model, pyramid, args.tile_size)
        magnitude = np.linalg.norm(total[:, index[:, 0], index[:, 1], index[:, 2]], axis=0)
        training = model.card.get("training", {})
        planned = training.get("trainer_config", {}).get("regnet_epochs", "–")  # cards before epochs_done
        epochs = " / ".join(str(training.get("epochs_done", {}).get(f"regnet{s}", planned)) for s in (4, 2, 1))
        lines.append(f"| `{path}` | {epochs} | {magnitude.mean():.2f} | {np.median(magnitude):.2f} | "
                     f"{np.corrcoef(magnitude, tre)[0, 1]:.3f} | {float(magnitude @ tre / (tre @ tre)):.2f} | "
                     f"{classes(magnitude)} | {levels[4]:.2f} | {levels[2]:.2f} | "
                     f"{levels[1]:.2f} | {time.perf_counter() - started:.0f} |")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
