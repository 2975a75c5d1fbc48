"""Training throughput (patches/s) of each stage on this machine, with real sampled patches.

Times full optimiser steps (sampling + forward + backward + Adam) after warm-up, median of the
repeats, on the device asked (CUDA synchronised), and the making of one deformed training pair (DVF,
warp, sponge, noise, pyramid) on the CPU and, on CUDA, on the GPU (``pool_on_device``). Writes
JSON + Markdown to --out.

    python benchmarks/train_throughput.py --device cpu --batch-size 4 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
from RegistrationMisalignmentLib.inference import resolve_device
from RegistrationMisalignmentLib.networks.model import MisalignmentNet
from RegistrationMisalignmentLib.networks.regnet import RegNet
from trainer.data import phantom_images
from trainer.dataset import IGNORE, PatchSampler, build_pool, make_pair
from trainer.deformations import DVFSettings
from trainer.train import masked_huber

REGNET_STAGE = "RegNet pre-training (one scale)"
PAIR_STAGE = "deformed pair"
"""Row labels that ``benchmarks.gpu_session`` plans a training run from."""


def misalignment_stage(decoder: str) -> str:
    return f"misalignment model ({decoder})"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def time_steps(step, repeats: int, device: torch.device) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pair-mm", type=float, default=256.0, help="side of the phantom cube timed as a training pair")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    image = phantom_images(1, (args.pair_mm,) * 3, 2, DEFAULT_CONFIG)[0]
    # On CUDA the pool lives on the GPU, as a run with pool_on_device keeps it (patches are cut there).
    images = phantom_images(1, (128.0, 128.0, 96.0), 1, DEFAULT_CONFIG)
    try:
        pool = build_pool(images, 3, 1, DEFAULT_CONFIG, DVFSettings(), device, kinds=("single", "mixed", "respiratory"))
    except (RuntimeError, TypeError) as exc:
        print(f"pool on {device.type} failed ({exc}); patches are cut from a CPU pool", file=sys.stderr)
        pool = build_pool(images, 3, 1, DEFAULT_CONFIG, DVFSettings(), kinds=("single", "mixed", "respiratory"))
    sampler = PatchSampler(pool, DEFAULT_CONFIG, np.random.default_rng(0))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    rows = []

    def regnet_step(net, optimizer, scale):
        def step():
            x, y, inside = sampler.regnet_batch(args.batch_size, scale)
            with autocast:
                loss = masked_huber(net(x.to(device)).float(), y.to(device), inside.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return step

    def misalignment_step(net, optimizer):
        def step():
            batch = sampler.batch(args.batch_size)
            x = {s: v.to(device) for s, v in batch.inputs.items()}
            with autocast:
                logits = net(x[1], x[2], x[4])
                targets = batch.step_labels if len(logits) > 1 else [batch.final_labels]
                loss = sum(F.cross_entropy(l.float(), t.to(device), ignore_index=IGNORE) for l, t in zip(logits, targets))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return step

    def pair_step(on: torch.device):
        def step():
            make_pair(image, "respiratory", 0, DEFAULT_CONFIG, DVFSettings(), DEFAULT_CONFIG.train_output, on)
        return step

    voxels = image.hu.size
    for on in [torch.device("cpu")] + ([device] if device.type == "cuda" else []):
        stage = f"{PAIR_STAGE} of a {args.pair_mm:g} mm phantom ({voxels / 1e6:.1f} M voxels) on {on.type}"
        try:
            seconds = time_steps(pair_step(on), args.repeats, on)
        except (RuntimeError, TypeError) as exc:  # a pair on the GPU is an option (pool_on_device), not a must
            print(f"{stage}: failed: {exc}", file=sys.stderr)
            rows.append({"stage": stage, "error": str(exc)})
            continue
        rows.append({"stage": stage, "device": on.type, "seconds_per_step": seconds, "pairs_per_s": 1 / seconds,
                     "mvoxels_per_s": voxels / 1e6 / seconds})
    net = RegNet().to(device)
    seconds = time_steps(regnet_step(net, torch.optim.Adam(net.parameters(), 1e-3), 1), args.repeats, device)
    rows.append({"stage": REGNET_STAGE, "seconds_per_step": seconds,
                 "patches_per_s": args.batch_size / seconds})
    for decoder in ("lstm", "multiscale", "singlescale"):
        net = MisalignmentNet(decoder, DEFAULT_CONFIG).to(device)
        seconds = time_steps(misalignment_step(net, torch.optim.Adam(net.parameters(), 1e-3)), args.repeats, device)
        rows.append({"stage": misalignment_stage(decoder), "seconds_per_step": seconds,
                     "patches_per_s": args.batch_size / seconds})
    machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    result = {"command": "python benchmarks/train_throughput.py " + " ".join(argv or sys.argv[1:]),
              "machine": machine, "batch_size": args.batch_size, "repeats": args.repeats, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if device.type == "cuda" else "cpu"
    (out / f"train_throughput_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Training throughput ({tag})", "", f"Command: `{result['command']}`  ",
             f"Machine: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, device {machine['device']}  ",
             f"Batch {args.batch_size}, median of {args.repeats} steps after warm-up; a patch is 101^3 (x1), 93^3 (x2), "
             "85^3 (x4) inputs with 19^3 labels, or one 101^3 RegNet patch. A deformed pair is one step of",
             "its row (respiratory DVF, warp, sponge, noise, 3-level pyramid); its rate is in pairs/s.", "",
             "| stage | s / step | patches / s (pairs / s) |", "|---|---|---|"]
    lines += [f"| {r['stage']} | failed: {r['error']} | |" if "error" in r else f"| {r['stage']} | {r['seconds_per_step']:.3g} | "
              + (f"{r['patches_per_s']:.3g}" if "patches_per_s" in r else f"({r['pairs_per_s']:.3g})") + " |"
              for r in rows]
    (out / f"train_throughput_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
