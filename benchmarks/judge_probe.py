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
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compare_protocols import read_classes  # noqa: E402
from benchmarks.publish import publish  # noqa: E402
from RegistrationMisalignmentLib.benchmark.elastix import SETTINGS  # noqa: E402
from RegistrationMisalignmentLib.metrics import evaluate_classes  # noqa: E402
from RegistrationMisalignmentLib.weights import load_model  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.train import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHOD = "regmis_lstm_631"


def protocol_scores(sha256: str) -> tuple[str, dict] | None:
    """(study folder, scores over all settings of its first case) of the protocol study that measured the model
    with this sha256: the case every study holds (the shipped model's has two since 2026-12-02, earlier ones one),
    so that all models are ranked on the same 1,500 points."""
    for report in sorted((REPO / "benchmarks/results").glob("protocol_chest_ct*/report.json")):
        study = json.loads(report.read_text(encoding="utf-8"))
        for name, method in study.get("methods", {}).items():
            if method.get("sha256") == sha256 and "all" in study["results"].get(name, {}):
                classed = read_classes(report.parent, name)
                first = classed.case == study["cases"][0]["name"]
                return report.parent.name, evaluate_classes(classed.true[first], classed.predicted[first]).to_dict()
    return None


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
            scores[name] = [trainer._class_report(model.module.probabilities) for model in models]
        del trainer
        gc.collect()
    protocol = [protocol_scores(model.card["sha256"]) for model in models]
    lines = [f"# Which judge foretells the protocol? `python benchmarks/judge_probe.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             "Held-out blocks of the canonical run (12 stratified class blocks of POPI phase 00), judges: "
             + "; ".join(f"{name}, judge {judges[name]}" for name in args.judges)
             + ". Protocol: its first case, all five settings, 1,500 landmarks.", "",
             "| model | " + " | ".join(f"{name}: kappa / mean F1 % / cw voxels" for name in args.judges)
             + " | protocol: kappa / mean F1 % / cw | protocol study |",
             "|---|" + "---|" * len(args.judges) + "---|---|"]
    for i, model in enumerate(models):
        cells = [f"{scores[n][i].kappa:.3f} / {100 * scores[n][i].mean_f1:.1f} / {scores[n][i].cw:,}" for n in args.judges]
        found = protocol[i]
        measured = (f"{found[1]['kappa']:.3f} / {100 * found[1]['mean_f1']:.1f} / {found[1]['cw']} | `{found[0]}`"
                    if found else "– | not measured")
        lines.append(f"| {model.path.parent.name}/{model.path.name} ({model.card['sha256'][:12]}) | "
                     + " | ".join(cells) + f" | {measured} |")
    known = [i for i, found in enumerate(protocol) if found]
    if len(known) >= 3:
        lines.append("")
        for name in args.judges:
            for metric in ("kappa", "mean_f1"):
                rho = spearmanr([getattr(scores[name][i], metric) for i in known],
                                [protocol[i][1][metric] for i in known])[0]
                lines.append(f"- {name} judge: Spearman rank correlation of {metric} with the protocol's {metric} "
                             f"over the {len(known)} measured models: {rho:.2f}")
    lines += ["", f"Wall time {time.perf_counter() - started:.0f} s (beside the canonical run)."]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
