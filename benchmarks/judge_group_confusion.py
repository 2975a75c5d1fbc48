"""Where on the registration judge a model errs, per kind of registration: the confusion matrix of each setting
group's blocks (affine, B-spline: ``trainer.config.SETTING_GROUPS``) and the blocks per setting.

    python benchmarks/judge_group_confusion.py --models Resources/Models/regmis_lstm_631.pt other.pt ... \
        --out benchmarks/results/training/judge_group_confusion.md

Why: the candidates the canonical run selected (452, 467, 491) lost on the protocol after B-spline, and the
judge's B-spline blocks say the same (``judge_probe_setting_groups.md``); the row's F1s and cw do not say which
errors they are. About 1 minute per model beside the run, plus the judge's loading.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.publish import publish  # noqa: E402
from RegistrationMisalignmentLib.config import CLASS_NAMES  # noqa: E402
from RegistrationMisalignmentLib.metrics import evaluate_classes  # noqa: E402
from RegistrationMisalignmentLib.weights import load_model  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.train import Trainer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", type=Path, required=True, help="model files (.pt, card beside)")
    parser.add_argument("--config", default="trainer/configs/canonical.toml")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    trainer = Trainer(TrainConfig.from_toml(args.config))
    groups = trainer._held_out_groups()
    tags = np.array(trainer.val_batch.registrations)
    lines = [f"# The judge's errors per kind of registration: `python benchmarks/judge_group_confusion.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"Judge {trainer.val_judge} ({trainer.judge.blocks}); blocks per setting: "
             + ", ".join(f"{s} {int((tags == s).sum())}" for s in dict.fromkeys(tags)) + ". Rows: the truth, columns: "
             "the model's class, body voxels of the group's blocks (each once).", ""]
    for path in args.models:
        model = load_model(path, device="cpu")
        with torch.no_grad():
            truth, predicted = trainer._held_out_classes(model.module.probabilities)
        for group, mask in groups.items():
            report = evaluate_classes(truth[mask], predicted[mask])
            lines += [f"**{path.parent.name}/{path.name} ({model.card['sha256'][:12]}), {group} blocks**: kappa "
                      f"{report.kappa:.3f}, F1 c/p/w {' / '.join(f'{100 * f:.1f}' for f in report.f1)} %, cw {report.cw:,}",
                      "", "| truth \\ model | " + " | ".join(CLASS_NAMES) + " |", "|---|---|---|---|"]
            lines += [f"| {name} | " + " | ".join(f"{int(n):,}" for n in report.confusion[k]) + " |"
                      for k, name in enumerate(CLASS_NAMES)]
            lines.append("")
    lines.append(f"Wall time {time.perf_counter() - started:.0f} s (beside the canonical run).")
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
