"""Which held-out judge ranks models as the whole-chest protocol does: plain synthetic pairs, or pairs made as a
registration leaves them?

    python benchmarks/judge_probe.py --models Resources/Models/regmis_lstm_631.pt other.pt ... \
        --out benchmarks/results/training/judge_probe.md

Why: the canonical run selects its export by validation kappa on held-out POPI blocks, but the epoch it
validated best (126, kappa 0.658 against the shipped epoch 115's 0.633) scored worse on the protocol (kappa
0.385 against 0.415), calling more correct landmarks poor. Every pair of the protocol is registered: a large
breathing motion undone by elastix. This scores each model on the trainer's held-out blocks built three ways
(``JUDGES``): the paper's synthetic pairs (the run's judge until epoch 152), every held-out pair registered
(``val_registered_share`` 1: the same truth, other moving images, and with ``registered_motion_left`` part of
the motion left in the truth), and the held-out scan moved by another breathing field than the protocol's and
registered back by elastix with all five of its settings (``val_registrations``, the run's judge from epoch
153), and puts the protocol's numbers beside them, found by the model's sha256 in the
``benchmarks/results/protocol_chest_ct*/report.json`` studies. About 1 minute per model and judge.

Judge and protocol are also scored per setting group (``trainer.config.SETTING_GROUPS``: affine,
B-spline): the candidates 452, 467 and 491 beat the shipped model on the protocol after affine and lost after
B-spline while the pooled judge ranked them above it.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compare_protocols import Classed, read_classes  # noqa: E402
from benchmarks.publish import publish  # noqa: E402
from RegistrationMisalignmentLib.benchmark.elastix import SETTINGS  # noqa: E402
from RegistrationMisalignmentLib.metrics import ClassificationReport, evaluate_classes  # noqa: E402
from RegistrationMisalignmentLib.weights import load_model  # noqa: E402
from trainer.config import SETTING_GROUPS, TrainConfig, setting_group  # noqa: E402
from trainer.train import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GROUP_NAMES = {"": "all settings", "affine": "affine", "bspline": "B-spline"}
METRICS = ("kappa", "mean_f1", "cw")


def protocol_classes(sha256: str) -> tuple[str, Classed] | None:
    """(study folder, classes at its landmarks) of the protocol study that measured the model with this sha256."""
    for report in sorted((REPO / "benchmarks/results").glob("protocol_chest_ct*/report.json")):
        study = json.loads(report.read_text(encoding="utf-8"))
        for name, method in study.get("methods", {}).items():
            if (method or {}).get("sha256") == sha256 and "all" in study["results"].get(name, {}):
                return report.parent.name, read_classes(report.parent, name)
    return None


def protocol_scores(classed: Classed, cases: set[str]) -> dict[str, ClassificationReport]:
    """Scores over all settings ("") and per setting group (``SETTING_GROUPS``) at the landmarks of ``cases``: those
    every measured model's study holds, so that all models are ranked on the same points."""
    groups = np.array([setting_group(s) for s in classed.setting])
    kept = np.isin(classed.case, sorted(cases))
    rows = {"": kept} | {group: kept & (groups == group) for group in SETTING_GROUPS}
    return {group: evaluate_classes(classed.true[r], classed.predicted[r]) for group, r in rows.items()}


JUDGES = {
    "plain": {"val_registered_share": 0.0, "val_registrations": ()},
    "registered": {"val_registered_share": 1.0, "val_registrations": ()},
    "elastix": {"val_registered_share": 0.0, "val_registrations": SETTINGS},
}
"""The judges compared, as overrides of the run's configuration (whatever judge it runs on now)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", type=Path, required=True, help="model files (.pt, card beside)")
    parser.add_argument("--config", default="trainer/configs/canonical.toml")
    parser.add_argument("--judges", nargs="+", choices=list(JUDGES), default=list(JUDGES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    models = [load_model(path, device="cpu") for path in args.models]
    scores: dict[str, list] = {}
    judges = {}
    for name in args.judges:
        trainer = Trainer(TrainConfig.from_toml(args.config, **JUDGES[name]))
        judges[name] = f"{trainer.val_judge} ({trainer.judge.blocks})"
        with torch.no_grad():
            scores[name] = [trainer._class_reports(model.module.probabilities) for model in models]
        del trainer
        gc.collect()
    found = [protocol_classes(model.card["sha256"]) for model in models]
    known = [i for i, f in enumerate(found) if f]
    cases = set.intersection(*(set(found[i][1].case) for i in known)) if known else set()
    protocol = {i: protocol_scores(found[i][1], cases) for i in known}
    columns = [(f"{judge} judge", group, scores[judge]) for judge in args.judges for group in scores[judge][0]]
    columns += [("protocol", group, [protocol.get(i) for i in range(len(models))]) for group in ("", *SETTING_GROUPS)]
    lines = [f"# Which judge foretells the protocol? `python benchmarks/judge_probe.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             "Held-out blocks of the canonical run (POPI phase 00), judges: "
             + "; ".join(f"{name}, judge {judges[name]}" for name in args.judges)
             + f". Protocol: {len(cases)} case(s) every measured model's study holds, "
             f"{', '.join(sorted(set(found[known[0]][1].setting))) if known else 'none measured'}. Each cell: kappa / mean F1 % / cw (voxels on the judge, landmarks on the protocol); "
             "a group's cells score its settings alone.", "",
             "| model | " + " | ".join(f"{where}: {GROUP_NAMES[group]}" for where, group, _ in columns)
             + " | protocol study |", "|---|" + "---|" * len(columns) + "---|"]
    for i, model in enumerate(models):
        cells = [f"{c[i][group].kappa:.3f} / {100 * c[i][group].mean_f1:.1f} / {c[i][group].cw:,}" if c[i] else "–"
                 for _, group, c in columns]
        lines.append(f"| {model.path.parent.name}/{model.path.name} ({model.card['sha256'][:12]}) | "
                     + " | ".join(cells) + f" | {f'`{found[i][0]}`' if found[i] else 'not measured'} |")
    if len(known) >= 3:
        lines.append("")
        for where, group, judged in columns:
            if where == "protocol":
                continue
            rhos = [spearmanr([getattr(judged[i][group], metric) for i in known],
                              [getattr(protocol[i][group], metric) for i in known])[0] for metric in METRICS]
            lines.append(f"- {where}, {GROUP_NAMES[group]} against the protocol's {GROUP_NAMES[group]}, Spearman rank "
                         f"correlation over the {len(known)} measured models: "
                         + ", ".join(f"{metric} {rho:.2f}" for metric, rho in zip(METRICS, rhos)))
    lines += ["", f"Wall time {time.perf_counter() - started:.0f} s (beside the canonical run)."]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
