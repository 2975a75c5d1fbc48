"""Measures whether stage 1 (a RegNet regressing the DVF) can learn at all on this data, in minutes: it fits one
block, it learns from a few hundred fresh blocks (or not), and the canonical checkpoint beside the zero predictor.

    python benchmarks/regnet_probe.py --out benchmarks/results/training/regnet_probe.md

Why: the canonical run's RegNet x4 stays at the zero predictor's validation EPE after hundreds of blocks.
That is a bug (inputs and targets that do not match, batch norm that breaks in evaluation) or too little
training; the three parts tell them apart. Data: LIDC-IDRI 0001 (a training scan), 4 deformed pairs to
train on and 3 others (other DVFs, no identity pair) to validate on; blocks of ``--block`` voxels at level
``--scale``; bf16 autocast on CPUs that have it, as the trainer.

``--init regnet4`` starts part 2 from the canonical x4 instead of a fresh network, as ``regnet_init =
"coarser"`` starts a finer stage of the trainer (``regnet_probe_x1_from_x4.md``: does that help x1 learn?).
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
from RegistrationMisalignmentLib.config import MisalignmentConfig  # noqa: E402
from RegistrationMisalignmentLib.inference import cpu_has_native_bf16  # noqa: E402
from RegistrationMisalignmentLib.io import read_image  # noqa: E402
from RegistrationMisalignmentLib.networks.regnet import RegNet  # noqa: E402
from RegistrationMisalignmentLib.synthetic.dvf import DVFSettings  # noqa: E402
from RegistrationMisalignmentLib.synthetic.images import to_training_image  # noqa: E402
from trainer import checkpoint  # noqa: E402
from trainer.dataset import BlockSampler, build_pool, weighted_huber  # noqa: E402
from trainer.train import start_from_coarser  # noqa: E402

SCAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidc_0001_chest_ct.nii.gz"
CANONICAL = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "training" / "canonical" / "checkpoint"
VAL_BLOCKS = 8


def autocast():
    """bf16 autocast where the CPU has native bf16, as the trainer; float32 elsewhere."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_native_bf16())


def endpoint_error(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor,
                   train_mode: bool = False) -> float:
    """Mean |prediction - DVF| (mm) over the supervised voxels; ``train_mode``: batch norm from each block."""
    net.train(train_mode)
    with torch.no_grad(), autocast():
        prediction = torch.cat([net(x[i : i + 1]) for i in range(len(x))]).float()
    net.train()
    return float((prediction - y).norm(dim=1)[keep].mean())


def coarser_regnet(stage: str, scale: int) -> RegNet:
    """The canonical checkpoint's RegNet of ``stage`` (e.g. "regnet4"), its DVF output scaled to level ``scale``."""
    net = RegNet()
    start_from_coarser(net, checkpoint.load(CANONICAL)["models"][stage], scale / int(stage.removeprefix("regnet")))
    return net


def step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, x, y, w) -> float:
    with autocast():
        loss = weighted_huber(net(x), y, w)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--block", type=int, default=101, help="input block side (101 + 4k)")
    parser.add_argument("--steps", type=int, default=200, help="fresh blocks per learning rate")
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3, 1e-4])
    parser.add_argument("--fit-steps", type=int, default=40, help="steps on the one block")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--init", choices=("regnet4", "regnet2"), help="start part 2 from the canonical checkpoint's STAGE (e.g. regnet4), "
                        "its output scaled from that stage's level to --scale (a shift of k voxels stays k voxels)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.init and int(args.init.removeprefix("regnet")) <= args.scale:
        parser.error(f"--init {args.init}: give a stage coarser than --scale {args.scale}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    config = MisalignmentConfig()
    image = to_training_image(read_image(SCAN, str(SCAN)), SCAN.name, config)
    train = BlockSampler(build_pool([image], 4, 11, config, DVFSettings()), config, np.random.default_rng(1), args.block)
    val = BlockSampler(build_pool([image], 3, 99, config, DVFSettings(), kinds=("single", "mixed", "respiratory")),
                       config, np.random.default_rng(2), args.block)
    xv, yv, wv = val.regnet_batch(VAL_BLOCKS, args.scale)
    keep = wv[:, 0] > 0
    zero = float(yv.norm(dim=1)[keep].mean())
    lines = [f"# Stage-1 probe: `python benchmarks/regnet_probe.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"RegNet at level x{args.scale}, input blocks {args.block}^3; validation: {VAL_BLOCKS} blocks of 3 unseen deformed "
             f"pairs of {SCAN.name}; the zero predictor's EPE there: **{zero:.3f} mm**.", ""]

    torch.manual_seed(0)
    net = RegNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y, w = train.regnet_batch(1, args.scale)
    one = w[:, 0] > 0
    first = endpoint_error(net, x, y, one, train_mode=True)
    for _ in range(args.fit_steps):
        loss = step(net, optimizer, x, y, w)
    lines += ["## 1. One block, fitted (capacity, and inputs that explain the targets)", "",
              f"{args.fit_steps} steps at lr 1e-3 on one block (|DVF| {float(y.norm(dim=1)[one].mean()):.2f} mm): loss "
              f"{loss:.4f}; EPE on that block {first:.2f} -> {endpoint_error(net, x, y, one, train_mode=True):.2f} mm "
              f"(batch norm from the block), {endpoint_error(net, x, y, one):.2f} mm (running statistics).", ""]

    start = "a fresh network" if args.init is None else f"the canonical {args.init}, output scaled to x{args.scale} (step 0: as loaded)"
    lines += [f"## 2. Fresh blocks (does it generalise?), from {start}", "", "| lr | step | val EPE (mm) | zero predictor (mm) |",
              "|---|---|---|---|"]
    batches = [train.regnet_batch(1, args.scale) for _ in range(args.steps)]
    for lr in args.lr:
        torch.manual_seed(0)
        net = RegNet() if args.init is None else coarser_regnet(args.init, args.scale)
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        if args.init is not None:
            lines.append(f"| {lr:g} | 0 | {endpoint_error(net, xv, yv, keep):.3f} | {zero:.3f} |")
        for i, (x, y, w) in enumerate(batches, 1):
            step(net, optimizer, x, y, w)
            if i % max(1, args.steps // 4) == 0:
                lines.append(f"| {lr:g} | {i} | {endpoint_error(net, xv, yv, keep):.3f} | {zero:.3f} |")
    lines.append("")

    if args.scale == 4 and checkpoint.exists(CANONICAL):
        state = checkpoint.load(CANONICAL)
        if "regnet4" in state["models"]:
            net = RegNet()
            net.load_state_dict(state["models"]["regnet4"])
            lines += ["## 3. The canonical run's RegNet x4", "",
                      f"Checkpoint at {state['stage']} epoch {state['epoch']}: val EPE {endpoint_error(net, xv, yv, keep):.3f} mm "
                      f"with its running statistics, {endpoint_error(net, xv, yv, keep, train_mode=True):.3f} mm with batch "
                      f"norm from each block (zero predictor {zero:.3f} mm).", ""]
    lines.append(f"Wall time {time.perf_counter() - started:.0f} s on {args.threads} threads.")
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
