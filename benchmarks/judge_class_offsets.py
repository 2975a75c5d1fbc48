"""Would moving the decision between classes help? The registration judge scored with log-prior offsets added to
a model's poor and wrong log-probabilities before the argmax (the shipped model decides by the plain argmax).

    python benchmarks/judge_class_offsets.py --models Resources/Models/regmis_lstm_631.pt \
        --out benchmarks/results/training/judge_class_offsets.md

Why: on the judge the shipped model calls too few voxels wrong after affine (F1 wrong 0.54) and none after
B-spline, and its training loss weighs the classes 60/20/20 (``class_balance``), not as the registrations it
meets do. An offset is a prior shift (Saerens et al. 2002): one number per class, tuned on held-out data, with
no retraining. The judge decides whether it is worth a protocol run; the protocol decides whether it ships.
About 1 minute per model beside the run, plus the judge's loading.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.publish import publish  # noqa: E402
from RegistrationMisalignmentLib.metrics import evaluate_classes  # noqa: E402
from RegistrationMisalignmentLib.weights import load_model  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.train import Trainer  # noqa: E402

OFFSETS = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
"""Log-prior offsets tried for poor and for wrong (a grid of both)."""


def offset_classes(log_probs: np.ndarray, poor: float, wrong: float) -> np.ndarray:
    """(N,) classes of (N, 3) log-probabilities with ``poor`` and ``wrong`` added to their columns."""
    return (log_probs + np.array([0.0, poor, wrong], dtype=np.float32)).argmax(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", type=Path, default=[Path("Resources/Models/regmis_lstm_631.pt")])
    parser.add_argument("--config", default="trainer/configs/canonical.toml")
    parser.add_argument("--top", type=int, default=8, help="offset pairs listed per model, best kappa first")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    trainer = Trainer(TrainConfig.from_toml(args.config))
    groups = trainer._held_out_groups()
    lines = [f"# Class offsets on the registration judge: `python benchmarks/judge_class_offsets.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"Judge {trainer.val_judge} ({trainer.judge.blocks}), body voxels each once. Offsets are added to the "
             "poor and wrong log-probabilities before the argmax; (0, 0) is the model as it ships. Rows: the best "
             f"{args.top} of {len(OFFSETS) ** 2} pairs by kappa over all blocks, then (0, 0) if not among them.", ""]
    for path in args.models:
        model = load_model(path, device="cpu")
        with torch.no_grad():
            truth, probs = trainer._held_out_probabilities(model.module.probabilities)
        log_probs = np.log(np.clip(probs, 1e-8, None))
        rows = []
        for poor, wrong in itertools.product(OFFSETS, OFFSETS):
            predicted = offset_classes(log_probs, poor, wrong)
            reports = {"all": evaluate_classes(truth, predicted)} | {
                group: evaluate_classes(truth[mask], predicted[mask]) for group, mask in groups.items()}
            rows.append(((poor, wrong), reports))
        ranked = sorted(rows, key=lambda r: -r[1]["all"].kappa)[: args.top]
        ranked += [r for r in rows if r[0] == (0.0, 0.0) and r not in ranked]
        lines += [f"**{path.parent.name}/{path.name} ({model.card['sha256'][:12]})**", "",
                  "| poor, wrong offset | " + " | ".join(f"{g}: kappa, mean F1, F1 c/p/w %, cw" for g in rows[0][1])
                  + " |", "|---|" + "---|" * len(rows[0][1])]
        for (poor, wrong), reports in ranked:
            cells = [f"{r.kappa:.3f}, {100 * r.mean_f1:.1f}, {' / '.join(f'{100 * f:.1f}' for f in r.f1)}, {r.cw:,}"
                     for r in reports.values()]
            lines.append(f"| {poor:+g}, {wrong:+g} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Wall time {time.perf_counter() - started:.0f} s (beside the canonical run).")
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
