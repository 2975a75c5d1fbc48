"""Would a class-prior correction of the model's probabilities help, and does the held-out judge agree with
the protocol on which way?

    python benchmarks/prior_shift_probe.py --out benchmarks/results/training/prior_shift_probe.md

Why: stage 2 trains with the paper's 60/20/20 class balance in the loss, while real registrations leave far
more correct voxels; a model trained so may over-call "poor" and "wrong". The standard remedy is a prior-shift
correction (Saerens et al., Neural Computation 14, 2002): multiply each class probability by a weight, i.e. add
a bias to its log-probability, before the argmax. This scores the checkpoint's best-validated weights on the
run's held-out blocks (the trainer's own judge) over a grid of log-biases for "poor" and "wrong", and counts,
from a protocol study's ``landmarks.csv``, how the model's errors on truly correct landmarks spread over TRE:
if they sit near 3 mm, a bias can move them; if they sit below 1 mm, they are false alarms no bias fixes.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.publish import publish  # noqa: E402
from RegistrationMisalignmentLib.metrics import evaluate_classes  # noqa: E402
from RegistrationMisalignmentLib.networks.model import MisalignmentNet  # noqa: E402
from trainer import checkpoint  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.train import Trainer  # noqa: E402

BIASES = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)
TRE_BINS_MM = (0.0, 1.0, 2.0, 2.5, 3.0)


def held_out_log_probabilities(trainer: Trainer, weights: dict) -> tuple[np.ndarray, np.ndarray]:
    """(3, N) log-probabilities and (N,) truth of every body voxel of the trainer's held-out blocks."""
    model = MisalignmentNet(trainer.cfg.decoder, trainer.config)
    model.load_state_dict(weights)
    model.to(trainer.device).eval()
    batch = trainer.val_batch
    with torch.no_grad(), trainer._autocast():
        probs = torch.cat([model.probabilities(*(batch.inputs[s][i : i + 1].to(trainer.device) for s in (1, 2, 4)))
                           for i in range(len(batch.final_labels))]).float().cpu()
    inside = batch.weights.numpy().ravel() > 0
    flat = probs.permute(1, 0, 2, 3, 4).reshape(3, -1).numpy()[:, inside]
    return np.log(np.clip(flat, 1e-8, 1.0)), batch.final_labels.numpy().ravel()[inside]


def protocol_false_alarms(landmarks_csv: Path, method: str) -> list[str]:
    """Markdown rows: per setting, truly correct landmarks the method did not call correct, by TRE bin."""
    with open(landmarks_csv, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == method and r["true_class"] == "correct"]
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        tre = np.array([float(r["tre_mm"]) for r in rows if r["setting"] == setting])
        missed = np.array([float(r["tre_mm"]) for r in rows if r["setting"] == setting and r["predicted_class"] != "correct"])
        counts = np.histogram(missed, bins=TRE_BINS_MM)[0]
        totals = np.histogram(tre, bins=TRE_BINS_MM)[0]
        lines.append(f"| {setting} | " + " | ".join(f"{c} / {t}" for c, t in zip(counts, totals)) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="trainer/configs/canonical.toml")
    parser.add_argument("--protocol", type=Path, default=Path("benchmarks/results/protocol_chest_ct_stage2_e115"),
                        help="a protocol study folder with landmarks.csv, the same model's")
    parser.add_argument("--method", default="regmis_lstm_631")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    trainer = Trainer(TrainConfig.from_toml(args.config))
    best = checkpoint.load(trainer.checkpoint_dir)["bests"]["misalignment"]
    log_probs, truth = held_out_log_probabilities(trainer, best["weights"])
    lines = [f"# Class-prior correction: `python benchmarks/prior_shift_probe.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"Weights: the canonical run's best, stage 2 epoch {best['epoch']} ({best['metric']} {best['value']:.3f}); "
             f"held-out blocks {trainer.val_judge} ({truth.size:,} body voxels, "
             f"{' / '.join(f'{100 * np.mean(truth == c):.0f}' for c in range(3))} % correct / poor / wrong).", "",
             "Kappa (mean F1 %) with log-bias b_poor (rows) and b_wrong (columns) added before the argmax:", "",
             "| b_poor \\ b_wrong | " + " | ".join(f"{b:+.2f}" for b in BIASES) + " |",
             "|---|" + "---|" * len(BIASES)]
    for bias_poor in BIASES:
        cells = []
        for bias_wrong in BIASES:
            report = evaluate_classes(truth, (log_probs + np.array([0.0, bias_poor, bias_wrong])[:, None]).argmax(0))
            cells.append(f"{report.kappa:.3f} ({100 * report.mean_f1:.1f})")
        lines.append(f"| {bias_poor:+.2f} | " + " | ".join(cells) + " |")
    lines += ["", f"Protocol `{args.protocol}`, {args.method}: truly correct landmarks called poor or wrong / all truly "
              "correct ones, by TRE:", "",
              "| setting | " + " | ".join(f"[{a:g}, {b:g}) mm" for a, b in zip(TRE_BINS_MM, TRE_BINS_MM[1:])) + " |",
              "|---|" + "---|" * (len(TRE_BINS_MM) - 1)]
    lines += protocol_false_alarms(args.protocol / "landmarks.csv", args.method)
    lines += ["", f"Wall time {time.perf_counter() - started:.0f} s (beside the canonical run)."]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
