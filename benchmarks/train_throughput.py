"""Training throughput of every stage: the paper's 101^3 patches against dense blocks, float32 against bf16.

Times full optimiser steps (cutting the batch + forward + backward + Adam) after one warm-up step, median
of the repeats, on the device asked (CUDA synchronised), for each stage, block size and precision;
reports patches/s and labelled voxels/s (the voxels the loss supervises: 19^3 per 101^3 patch, 59^3 per
141^3 block in stage 2; 21^3 and 61^3 DVF voxels in stage 1). For bf16 it also reports how far its
loss and gradient are from float32 on the same batch and weights. Last, the making of one deformed
training pair on the CPU and, on CUDA, on the GPU. Writes JSON + Markdown to --out. The blocks and the
pair come from phantoms, or (``--image``) from a scan of the compact cache (``trainer.cache``): a machine
without SimpleITK (the lent GPU's) cannot make phantoms.

    python benchmarks/train_throughput.py --device cpu --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
from RegistrationMisalignmentLib.inference import cpu_has_native_bf16, resolve_device
from RegistrationMisalignmentLib.networks.model import MisalignmentNet
from RegistrationMisalignmentLib.networks.regnet import RegNet
from trainer.dataset import BlockSampler, build_pool, make_pair, weighted_cross_entropy, weighted_huber
from RegistrationMisalignmentLib.synthetic.dvf import DVFSettings
from RegistrationMisalignmentLib.synthetic.images import phantom_images
from trainer.cache import read_cache

REGNET_STAGE = "RegNet pre-training (one scale)"
PAIR_STAGE = "deformed pair"
"""Row labels that ``benchmarks.gpu_session`` plans a training run from."""


def misalignment_stage(decoder: str) -> str:
    return f"misalignment model ({decoder})"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines() if Path("/proc/cpuinfo").exists() else []:
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


def loss_of(stage: str, net: torch.nn.Module, batch, device: torch.device, bf16: bool) -> torch.Tensor:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if stage == REGNET_STAGE:
            x, y, w = batch
            return weighted_huber(net(x.to(device)), y.to(device), w.to(device))
        x = {s: v.to(device) for s, v in batch.inputs.items()}
        logits = net(x[1], x[2], x[4])
        targets = batch.step_labels if len(logits) > 1 else [batch.final_labels]
        weights = batch.weights.to(device)
        return sum(weighted_cross_entropy(l, t.to(device), weights) for l, t in zip(logits, targets))


def draw(stage: str, sampler: BlockSampler, batch_size: int):
    return sampler.regnet_batch(batch_size, 1) if stage == REGNET_STAGE else sampler.batch(batch_size)


def bf16_agreement(stage: str, net: torch.nn.Module, batch, device: torch.device) -> dict:
    """Relative loss difference and gradient cosine of bf16 against float32 (same weights, same batch)."""
    grads, losses = [], []
    for bf16 in (False, True):
        net.zero_grad(set_to_none=True)
        loss = loss_of(stage, net, batch, device, bf16)
        loss.backward()
        losses.append(float(loss))
        grads.append(torch.cat([p.grad.flatten().float() for p in net.parameters() if p.grad is not None]))
    cosine = float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0))
    return {"loss_rel_diff": abs(losses[1] - losses[0]) / abs(losses[0]), "grad_cosine": cosine}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--patch-batch", type=int, default=4, help="batch of the paper's 101^3 patches")
    parser.add_argument("--dense-batch", type=int, default=1, help="batch of the dense blocks")
    parser.add_argument("--dense-input", type=int, default=141, help="x1 input side of a dense block (101 + 4k)")
    parser.add_argument("--decoders", default="lstm,multiscale,singlescale")
    parser.add_argument("--pair-mm", type=float, default=256.0, help="side of the phantom cube timed as a training pair")
    parser.add_argument("--image", type=Path, help="a cached scan (.npz, trainer.cache) in the phantoms' place")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    native_bf16 = device.type == "cuda" or cpu_has_native_bf16()
    torch.manual_seed(0)
    scan = read_cache(args.image) if args.image else None
    images = [scan] if scan else phantom_images(1, (160.0, 160.0, 160.0), 1, DEFAULT_CONFIG)
    pool = build_pool(images, 3, 1, DEFAULT_CONFIG, DVFSettings(), kinds=("single", "mixed", "respiratory"))
    if device.type == "cuda":
        for pair in pool:
            pair.pyramid = {s: v.to(device) for s, v in pair.pyramid.items()}
    rows = []
    stages = [REGNET_STAGE] + [misalignment_stage(d) for d in args.decoders.split(",")]
    for stage in stages:
        base = RegNet() if stage == REGNET_STAGE else MisalignmentNet(stage.split("(")[1].rstrip(")"), DEFAULT_CONFIG)
        for block_input, batch_size in ((101, args.patch_batch), (args.dense_input, args.dense_batch)):
            sampler = BlockSampler(pool, DEFAULT_CONFIG, np.random.default_rng(0), block_input)
            side = sampler.dvf_side if stage == REGNET_STAGE else sampler.labels_side
            for bf16 in (False, True):
                net = copy.deepcopy(base).to(device)
                optimizer = torch.optim.Adam(net.parameters(), 1e-3)

                def step():
                    loss = loss_of(stage, net, draw(stage, sampler, batch_size), device, bf16)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()

                seconds = time_steps(step, args.repeats, device)
                row = {"stage": stage, "block_input": block_input, "labels_side": side, "batch": batch_size,
                       "precision": "bf16 autocast" if bf16 else "float32", "seconds_per_step": seconds,
                       "patches_per_s": batch_size / seconds, "labelled_voxels_per_s": batch_size * side**3 / seconds}
                if bf16:
                    row.update(bf16_agreement(stage, copy.deepcopy(base).to(device), draw(stage, sampler, batch_size),
                                              device))
                rows.append(row)
                print(json.dumps(row), flush=True)
    image = scan or phantom_images(1, (args.pair_mm,) * 3, 2, DEFAULT_CONFIG)[0]
    voxels = image.hu.size
    source = scan.name if scan else f"a {args.pair_mm:g} mm phantom"
    for on in [torch.device("cpu")] + ([device] if device.type == "cuda" else []):
        stage = f"{PAIR_STAGE} of {source} ({voxels / 1e6:.1f} M voxels) on {on.type}"
        try:
            seconds = time_steps(lambda: make_pair(image, "respiratory", 0, DEFAULT_CONFIG, DVFSettings(), on), 1, on)
        except (RuntimeError, TypeError) as exc:  # a pair on the GPU is an option (pool_on_device), not a must
            rows.append({"stage": stage, "error": str(exc)})
            continue
        rows.append({"stage": stage, "device": on.type, "seconds_per_step": seconds, "pairs_per_s": 1 / seconds,
                     "mvoxels_per_s": voxels / 1e6 / seconds})
    machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "native_bf16": native_bf16}
    result = {"command": "python benchmarks/train_throughput.py " + " ".join(argv or sys.argv[1:]),
              "machine": machine, "repeats": args.repeats, "rows": rows}
    write(result, Path(args.out), "gpu" if device.type == "cuda" else "cpu")
    return 0


def write(result: dict, out: Path, tag: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_throughput_{tag}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    machine = result["machine"]
    lines = [f"# Training throughput ({tag})", "", f"Command: `{result['command']}`  ",
             f"Machine: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, device "
             f"{machine['device']}, native bf16: {machine['native_bf16']}  ",
             f"Median of {result['repeats']} optimiser steps after a warm-up step. Input 101 is the paper's patch "
             "(19^3 labels, or 21^3 DVF voxels for a RegNet); a larger input is a dense block (labels = input - 82, "
             "DVF = input - 80). Labelled voxels are what the loss supervises. bf16 rows compare their loss and "
             "gradient with float32 on one batch (same weights).", "",
             "| stage | input | batch | precision | s / step | patches / s | labelled voxels / s | bf16 vs fp32: loss, grad cosine |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "block_input" not in r:
            continue
        agreement = f"{100 * r['loss_rel_diff']:.2f} %, {r['grad_cosine']:.4f}" if "grad_cosine" in r else ""
        lines.append(f"| {r['stage']} | {r['block_input']}^3 | {r['batch']} | {r['precision']} | "
                     f"{r['seconds_per_step']:.2f} | {r['patches_per_s']:.3g} | {r['labelled_voxels_per_s']:,.0f} | "
                     f"{agreement} |")
    lines += ["", "| deformed training pair | s | pairs / s |", "|---|---|---|"]
    lines += [f"| {r['stage']} | failed: {r['error']} | |" if "error" in r else
              f"| {r['stage']} | {r['seconds_per_step']:.2f} | {r['pairs_per_s']:.3g} |"
              for r in result["rows"] if r["stage"].startswith(PAIR_STAGE)]
    (out / f"train_throughput_{tag}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
