"""Does stage 2's drift live in batch norm's running statistics or in the learnt weights?

    python benchmarks/bn_drift_probe.py --out benchmarks/results/training/bn_drift_probe.md

Why: the canonical run's validation kappa falls within a few epochs of every start (0.58 -> 0.42 over 10
epochs at 3e-5) while its training loss does not rise. Training normalises each 141^3 block by its own
statistics (batch 1); validation uses the running averages that those blocks leave. This scores the run's
held-out blocks (the trainer's own ``validate`` numbers) with the checkpoint's best-validated weights and its
last ones, each also with the other's batch-norm buffers swapped in, and with the last weights normalised
per block as in training (batch-norm layers in training mode, statistics left untouched).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.publish import publish  # noqa: E402
from RegistrationMisalignmentLib.networks.model import MisalignmentNet  # noqa: E402
from trainer import checkpoint  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.train import Trainer  # noqa: E402


def is_norm_buffer(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def per_block_statistics(model: torch.nn.Module) -> None:
    """Batch norm normalises with each block's own statistics (as in training) and leaves its buffers alone."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train()
            module.track_running_stats = False
            module.running_mean = module.running_var = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="trainer/configs/canonical.toml")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cfg = TrainConfig.from_toml(args.config)
    trainer = Trainer(cfg)
    state = checkpoint.load(trainer.checkpoint_dir)
    best = state["bests"]["misalignment"]
    weights = {"best": best["weights"], "last step": state["models"]["misalignment"],
               "average": state["averages"].get("misalignment", state["models"]["misalignment"])}

    @torch.no_grad()
    def score(name: str, values: dict, per_block: bool = False) -> str:
        model = MisalignmentNet(cfg.decoder, trainer.config)
        model.load_state_dict(values)
        model.to(trainer.device).eval()
        if per_block:
            per_block_statistics(model)
        report = trainer._class_report(model.probabilities)
        line = (f"| {name} | {report.kappa:.3f} | {' / '.join(f'{100 * f:.1f}' for f in report.f1)} | {report.cw} |")
        print(line, flush=True)
        return line

    def swap(target: dict, source: dict) -> dict:
        return {k: (source[k] if is_norm_buffer(k) else v) for k, v in target.items()}

    lines = [f"# Batch-norm statistics or weights? `python benchmarks/bn_drift_probe.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"Checkpoint: stage {state['stage']} epoch {state['epoch']}; best: epoch {best['epoch']} "
             f"({best['metric']} {best['value']:.3f}); held-out blocks: {trainer.val_judge} "
             f"({len(trainer.val_batch.final_labels)} blocks, {' / '.join(f'{100 * s:.0f}' for s in trainer.val_truth_share)} % "
             "correct / poor / wrong).", "",
             "| weights (batch-norm buffers) | kappa | F1 c / p / w % | cw voxels |", "|---|---|---|---|"]
    lines.append(score(f"best, epoch {best['epoch']} (its own)", weights["best"]))
    lines.append(score(f"last step, epoch {state['epoch']} (its own)", weights["last step"]))
    lines.append(score(f"average, epoch {state['epoch']} (its own)", weights["average"]))
    lines.append(score("last step (the best's buffers)", swap(weights["last step"], weights["best"])))
    lines.append(score("best (the last step's buffers)", swap(weights["best"], weights["last step"])))
    lines.append(score("last step (each block's own statistics, as in training)", weights["last step"], per_block=True))
    lines.append(score("best (each block's own statistics)", weights["best"], per_block=True))
    lines += ["", f"Wall time {time.perf_counter() - started:.0f} s (beside the canonical run)."]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
