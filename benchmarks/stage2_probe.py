"""Measures whether the canonical run's misalignment model can fit one held-out block: a bug or too little training.

    python benchmarks/stage2_probe.py --out benchmarks/results/training/stage2_probe.md

Why: after hundreds of blocks stage 2 may still give every validation voxel the same class (the class prior).
If the model cannot fit even one block, the gradient does not reach the decision (a bug: labels that do not
match the inputs, a broken decoder); if it fits one block in a few dozen steps, the inputs carry what the
labels need and the run needs more (or better) training. Data: the trainer's own validation blocks (the
held-out scan of ``--config``, built as ``Trainer`` builds them); the model: the checkpoint's stage 2 as it
is now; training mode, Adam at ``--lr``, ``--steps`` steps on the block with the most non-correct voxels.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.publish import publish  # noqa: E402
from benchmarks.regnet_probe import autocast  # noqa: E402
from RegistrationMisalignmentLib.metrics import evaluate_classes  # noqa: E402
from RegistrationMisalignmentLib.networks.model import MisalignmentNet  # noqa: E402
from trainer import checkpoint  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.dataset import weighted_cross_entropy  # noqa: E402
from trainer.train import Trainer  # noqa: E402


def probe_trainer(config: str, name: str, needs_stage2: bool) -> tuple[TrainConfig, Path, dict, Trainer]:
    """The run's config, its checkpoint folder and state, and a ``Trainer`` of that config (its validation
    blocks, training scans) that logs under runs/``name``, apart from the run's. With ``needs_stage2`` it
    exits first, before the minutes of loading, where the checkpoint holds no stage-2 model."""
    cfg = TrainConfig.from_toml(config)
    folder = Path(cfg.out) / "checkpoint"
    state = checkpoint.load(folder)
    if needs_stage2 and "misalignment" not in state["models"]:
        sys.exit(f"{folder} holds no stage-2 model yet")
    return cfg, folder, state, Trainer(replace(cfg, out=str(Path("runs") / name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="trainer/configs/canonical.toml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)

    cfg, folder, state, trainer = probe_trainer(args.config, "stage2_probe", needs_stage2=True)
    model = MisalignmentNet(cfg.decoder, trainer.config)
    model.load_state_dict(state["models"]["misalignment"])
    blocks = trainer.val_batch
    inside = blocks.weights.numpy() > 0
    i = int(np.argmax([(blocks.final_labels[b].numpy()[inside[b]] > 0).sum() for b in range(len(inside))]))
    x = [blocks.inputs[s][i : i + 1] for s in (1, 2, 4)]
    weights, labels = blocks.weights[i : i + 1], [step[i : i + 1] for step in blocks.step_labels]
    truth = blocks.final_labels[i].numpy()[inside[i]]

    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.train()
    lines = [f"# Stage-2 probe: `python benchmarks/stage2_probe.py {' '.join(sys.argv[1:])}`", "",
             f"Checkpoint: `{folder}`, stage {state['stage']} epoch {state['epoch']}. Block {i + 1} of the "
             f"{len(inside)} validation blocks of `{args.config}` ({truth.size} body voxels; truth correct / poor / "
             f"wrong {' / '.join(str(c) for c in np.bincount(truth, minlength=3))}); Adam at {args.lr:g}, training "
             "mode, bf16 autocast where the CPU has it (as the trainer). Kappa and predicted classes of the "
             "step's own forward pass.", "",
             "| step | loss | kappa | predicted correct / poor / wrong | s |", "|---|---|---|---|---|"]
    started = time.perf_counter()
    for step in range(args.steps + 1):
        with autocast():
            logits = model(*x)
            loss = sum(weighted_cross_entropy(l, t, weights) for l, t in zip(logits, labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 5 == 0:
            with torch.no_grad():
                last = torch.softmax(logits[-1].detach().float(), dim=1)
                predicted = torch.einsum("bkdhw,kc->bcdhw", last, model.merge).argmax(1)[0].numpy()[inside[i]]
            report = evaluate_classes(truth, predicted)
            lines.append(f"| {step} | {float(loss):.3f} | {report.kappa:.3f} | "
                         f"{' / '.join(str(c) for c in np.bincount(predicted, minlength=3))} | "
                         f"{time.perf_counter() - started:.0f} |")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
