"""Measures whether stage 2 learns *across* blocks under a given recipe, in minutes instead of run-hours.

    python benchmarks/stage2_recipe_probe.py --start stage1 --freeze --steps 120 \
        --out benchmarks/results/training/stage2_recipe_frozen.md

Why: the canonical run's stage 2 (all weights trainable, Adam 1e-3, one 141^3 block per step) gave every
held-out voxel the class "correct" for 45 epochs, while ``stage2_probe.py`` showed that it fits one block in
15 steps. So the gradient reaches the decision, but what it learns from one block does not carry to the next.
A suspect with a literature reading: a fresh, random decoder sends large, noisy gradients into pre-trained
encoders and distorts their features before the decoder has learnt to use them (Kumar et al., "Fine-tuning
can distort pretrained features", ICLR 2022: train the head on frozen features first, then fine-tune). This
probe trains on fresh blocks of the training scans (new deformed pairs every ``--pool-every`` steps, as the
run) and measures the trainer's own held-out blocks every ``--eval-every`` steps, for:

- ``--start stage1``: the three stage-1 RegNets' encoders + a fresh decoder (how stage 2 began), or
  ``--start checkpoint``: the run's stage-2 model as it is now, or ``--start shipped``: the shipped default
  model (kappa 0.30 on these blocks: does the recipe keep or lose what it separates?);
- ``--freeze``: encoders in evaluation mode without gradients (only the decoder learns; a step costs the
  encoders' forward pass only), else all trainable as the run;
- ``--centres class``: block centres drawn 60/20/20 by class as the paper draws its patches, else uniform
  body centres with per-voxel class weights, as the run.

Blocks of ``--block-input`` voxels, ``--batch`` per step; bf16 autocast where the CPU has it, as the trainer.
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
from benchmarks.regnet_probe import autocast  # noqa: E402
from benchmarks.stage2_probe import probe_trainer  # noqa: E402
from RegistrationMisalignmentLib.networks.model import MisalignmentNet  # noqa: E402
from trainer.config import CENTRE_SAMPLING  # noqa: E402
from trainer.dataset import BlockSampler, build_pool, weighted_cross_entropy  # noqa: E402
from trainer.train import REGNET_STAGES, Trainer  # noqa: E402

POOL_SEED = 7_000_000
"""Pools of this probe are seeded apart from the run's (whose seeds derive from its config's seed)."""


def start_model(start: str, state: dict, trainer: Trainer, seed: int) -> MisalignmentNet:
    """The model stage 2 began from (``stage1``: trained encoders, fresh decoder), the run's current one, or the
    shipped default model (does a model that separates the classes keep doing so under the recipe?)."""
    torch.manual_seed(seed)
    model = MisalignmentNet(trainer.cfg.decoder, trainer.config)
    if start == "checkpoint":
        model.load_state_dict(state["models"]["misalignment"])
        return model
    if start == "shipped":
        trainer._start_from_shipped(model)  # as misalignment_init = "shipped" starts the run's stage 2
        return model
    for scale, stage in REGNET_STAGES.items():
        regnet = {k.removeprefix("encoder."): v for k, v in state["models"][stage].items() if k.startswith("encoder.")}
        getattr(model, f"encoder{scale}").load_state_dict(regnet)
    return model


def set_mode(model: MisalignmentNet, freeze: bool) -> None:
    """Training mode; with ``freeze`` the encoders stay in evaluation mode (running batch-norm statistics)."""
    model.train()
    if freeze:
        for encoder in (model.encoder1, model.encoder2, model.encoder4):
            encoder.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="trainer/configs/canonical.toml")
    parser.add_argument("--start", choices=("stage1", "checkpoint", "shipped"), default="stage1")
    parser.add_argument("--freeze", action="store_true", help="train the decoder only (encoders frozen)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block-input", type=int, default=141)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--centres", choices=CENTRE_SAMPLING, default="uniform",
                        help="block placement and voxel weights (trainer config centre_sampling)")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--pool-every", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)

    cfg, folder, state, trainer = probe_trainer(args.config, "stage2_recipe_probe", needs_stage2=args.start == "checkpoint")
    model = start_model(args.start, state, trainer, cfg.seed)
    for name, p in model.named_parameters():
        p.requires_grad_(not (args.freeze and name.startswith("encoder")))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    origin = ("the shipped default model" if args.start == "shipped"
              else f"checkpoint `{folder}` at stage {state['stage']} epoch {state['epoch']}")
    lines = [f"# Stage-2 recipe probe: `python benchmarks/stage2_recipe_probe.py {' '.join(sys.argv[1:])}`", "",
             f"Start: {args.start} ({origin}); "
             f"{'encoders frozen, decoder trained' if args.freeze else 'all weights trained'}; Adam {args.lr:g}; "
             f"{args.batch} block(s) of {args.block_input}^3 per step, {args.centres} centres; {cfg.pool_pairs} fresh deformed pairs of the "
             f"training scans every {args.pool_every} steps. Validation: the trainer's {len(trainer.val_batch.final_labels)} "
             "held-out blocks (every body voxel once, evaluation mode), as `history.jsonl`'s val_ columns.", "",
             "| step | blocks | mean train loss since last row | val kappa | val F1 correct / poor / wrong (%) | "
             "val predicted poor + wrong (%) | s |", "|---|---|---|---|---|---|---|"]

    def measure(step: int, losses: list[float], started: float) -> None:
        model.eval()  # as Trainer.validate: running batch-norm statistics
        report = trainer._class_report(model.probabilities)
        f1 = " / ".join("nan" if np.isnan(f) else f"{100 * f:.1f}" for f in report.f1)
        predicted_other = 100.0 * report.confusion[:, 1:].sum() / report.n
        lines.append(f"| {step} | {step * args.batch} | {np.mean(losses) if losses else float('nan'):.3f} | "
                     f"{report.kappa:.3f} | {f1} | {predicted_other:.1f} | {time.perf_counter() - started:.0f} |")
        print(lines[-1], flush=True)
        set_mode(model, args.freeze)

    started = time.perf_counter()
    losses: list[float] = []
    measure(0, losses, started)
    sampler = None
    for step in range(1, args.steps + 1):
        if (step - 1) % args.pool_every == 0:
            seed = POOL_SEED + step
            sampler = None  # the old pool goes before the new one is made: two whole-chest pools need ~4 GB more
            pool = build_pool(trainer.train_images, cfg.pool_pairs, seed, trainer.config, trainer.settings)
            sampler = BlockSampler(pool, trainer.config, np.random.default_rng(seed), args.block_input,
                                    centres=args.centres)
        batch = sampler.batch(args.batch)
        with autocast():
            logits = model(batch.inputs[1], batch.inputs[2], batch.inputs[4])
            loss = sum(weighted_cross_entropy(l, t, batch.weights) for l, t in zip(logits, batch.step_labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % args.eval_every == 0:
            measure(step, losses, started)
            losses = []
    publish(lines, args.out)


if __name__ == "__main__":
    main()
