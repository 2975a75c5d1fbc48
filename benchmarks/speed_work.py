"""How much arithmetic whole-image prediction needs, and what that means on this machine (issue 7).

Why: the speed goals ask for a fixed time per chest CT. Counting the network's multiply-accumulates
(MACs) per 1 mm voxel separates the two things a time can be made of: the work the method's network
must do on every voxel (one pass over the whole image, no tile borders) and the extra work tiling
adds (the context every tile re-reads). Dividing by the MAC rate this machine sustains on the
network's own layers gives a floor: no scheduling of the same network can go below it.

Counts use meta tensors (shapes, no arithmetic), so they cost nothing for any image size. Only the
throughput is measured, on real tensors, for a few seconds.

Run from the repository root:
    python -m benchmarks.speed_work --threads 2                      # chest CT, LSTM, this machine
    python -m benchmarks.speed_work --network-seconds 1119 --name speed-work-cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

if __package__ in (None, ""):  # run as a file (python benchmarks/speed_work.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.speed import GOAL_CPU_S, machine_info  # noqa: E402
from benchmarks.speed_run import PairGeometry  # noqa: E402
from RegistrationMisalignmentLib.config import DEFAULT_CONFIG, MisalignmentConfig  # noqa: E402
from RegistrationMisalignmentLib.inference import tile_shape, tile_starts  # noqa: E402
from RegistrationMisalignmentLib.networks.model import DECODERS, MisalignmentNet  # noqa: E402
from RegistrationMisalignmentLib.networks.regnet import RegNetEncoder  # noqa: E402
from RegistrationMisalignmentLib.preprocess import block_geometry  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
Triple = tuple[int, int, int]
T = TypeVar("T")


def counted(fn: Callable[[], T]) -> tuple[int, T]:
    """MACs of everything ``fn`` computes (torch's FlopCounterMode counts 2 FLOPs per MAC), and its result.

    Works on meta tensors, and sees functional convolutions too (the conv-LSTM's first step is one).
    """
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops() // 2, result


def alignment_macs(coarse: torch.Size, fine: Triple) -> int:
    """MACs of ``model.align_to_fine``: three dense interpolation matmuls, W, then H, then D."""
    b, c, d, h, w = coarse
    fd, fh, fw = fine
    return b * c * (d * h * fw * w + d * fh * fw * h + fd * fh * fw * d)


def tile_macs(decoder: str, out_size: Triple, config: MisalignmentConfig = DEFAULT_CONFIG) -> dict[str, int]:
    """MACs per part of one forward pass for a 1 mm output block ``out_size`` (z, y, x), as predict runs it.

    The encoders get the input blocks of ``preprocess.block_geometry``; the decoder's per-scale
    reductions, the coarse-to-fine alignment and the decoder itself follow
    ``MisalignmentNet.reduced_features`` and ``decode``.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder {decoder!r} is not one of {DECODERS}")
    with torch.device("meta"):
        net = MisalignmentNet(decoder, config).eval()
    geometry = block_geometry((0, 0, 0), out_size, config)
    scales = (4, 2, 1) if net.multiscale else (1,)
    counts: dict[str, int] = {}
    features = {}
    for s in scales:
        encoder = getattr(net, f"encoder{s}")
        block = torch.empty(1, 2, *geometry[s][1], device="meta")
        counts[f"encoder_x{s}"], features[s] = counted(partial(encoder, block))
    fine: Triple = tuple(features[1].shape[2:])  # type: ignore[assignment]
    reduced, counts["decoder"], counts["alignment"] = [], 0, 0
    for reduce, s in zip(net.decoder.reduce, scales):
        macs, r = counted(partial(reduce.linear, features[s]))
        counts["decoder"] += macs
        if s != 1:
            counts["alignment"] += alignment_macs(r.shape, fine)
        reduced.append(torch.empty(1, r.shape[1], *fine, device="meta"))
    counts["decoder"] += counted(partial(net.decoder.decode, reduced))[0]
    return counts


def image_work(grid: Triple, decoder: str, tile_size: int, config: MisalignmentConfig = DEFAULT_CONFIG) -> dict:
    """MACs to predict a whole 1 mm grid (z, y, x) in tiles of ``tile_size``, and in one single pass."""
    tile = tile_shape(grid, tile_size)
    tiles = len(tile_starts(grid, tile))
    per_tile = tile_macs(decoder, tile, config)
    one_pass_parts = tile_macs(decoder, grid, config)
    voxels = math.prod(grid)
    total, one_pass = tiles * sum(per_tile.values()), sum(one_pass_parts.values())
    return {
        "grid_zyx": list(grid), "voxels": voxels, "decoder": decoder, "tile": list(tile), "tiles": tiles,
        "per_tile_macs": per_tile, "total_macs": total, "macs_per_voxel": total / voxels,
        "one_pass_macs": one_pass, "one_pass_macs_per_voxel": one_pass / voxels,
        "one_pass_parts": {k: v / voxels for k, v in one_pass_parts.items()},
        "tiling_overhead": total / one_pass,
    }


def encoder_throughput(side: int = 213, repeats: int = 3) -> dict:
    """MACs/s this machine sustains through a RegNet encoder (its own layers, batch norm and crops included).

    The encoders are most of the network's work; random weights time the same arithmetic as trained ones.
    """
    encoder = RegNetEncoder().eval()
    x = torch.randn(1, 2, side, side, side)
    with torch.device("meta"):
        probe = RegNetEncoder().eval()
    macs, _ = counted(partial(probe, torch.empty(1, 2, side, side, side, device="meta")))
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            encoder(x)
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times[1:])
    return {"input_side": side, "macs": macs, "seconds": seconds, "macs_per_s": macs / seconds,
            "repeats": repeats}


def floors(work: dict, rate: float, network_seconds: float | None) -> dict:
    """What the work costs at the sustained rate, against the CPU goal and the measured network time."""
    out = {
        "tiled_s": work["total_macs"] / rate,
        "one_pass_s": work["one_pass_macs"] / rate,
        "rate_needed_for_goal_macs_per_s": work["one_pass_macs"] / GOAL_CPU_S,
        "goal_s": GOAL_CPU_S,
    }
    out["one_pass_over_goal"] = out["one_pass_s"] / GOAL_CPU_S
    if network_seconds:
        out["measured_network_s"] = network_seconds
        out["measured_macs_per_s"] = work["total_macs"] / network_seconds
    return out


def markdown(report: dict) -> str:
    w, t, f = report["work"], report["throughput"], report["floors"]
    g = 1e9
    parts = ", ".join(f"{k} {v / g:.0f}" for k, v in w["per_tile_macs"].items())
    one = ", ".join(f"{k} {v / 1e3:.0f} k" for k, v in w["one_pass_parts"].items())
    lines = [
        f"# Work per voxel: {report['name']}",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['torch_threads']} torch threads; "
        f"torch {report['machine']['torch']}. Date {report['created']}.",
        f"Command: `{report['command']}`",
        "",
        "MACs (multiply-accumulates) counted on meta tensors; throughput measured on this machine.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| 1 mm grid (z, y, x) | {' x '.join(map(str, w['grid_zyx']))} = {w['voxels'] / 1e6:.1f} M voxels |",
        f"| decoder | {w['decoder']} |",
        f"| tiles | {w['tiles']} of {' x '.join(map(str, w['tile']))} |",
        f"| GMAC per tile | {parts} |",
        f"| tiled: total | {w['total_macs'] / 1e12:.1f} TMAC = {w['macs_per_voxel'] / 1e3:.0f} k MAC per 1 mm voxel |",
        f"| one pass (no tile borders): total | {w['one_pass_macs'] / 1e12:.1f} TMAC = "
        f"{w['one_pass_macs_per_voxel'] / 1e3:.0f} k MAC per voxel ({one}) |",
        f"| tiling overhead | {w['tiling_overhead']:.2f}x |",
        f"| encoder throughput, {t['input_side']}^3 input | {t['macs_per_s'] / g:.1f} GMAC/s "
        f"(median of {t['repeats']}, {t['seconds']:.2f} s) |",
        f"| at that rate: tiled / one pass | {f['tiled_s']:.0f} s / {f['one_pass_s']:.0f} s |",
        f"| goal | < {f['goal_s']:.0f} s: one pass needs {f['rate_needed_for_goal_macs_per_s'] / g:.1f} GMAC/s, "
        f"{f['one_pass_over_goal']:.1f}x this machine's rate |",
    ]
    if "measured_network_s" in f:
        lines.append(f"| network stage measured by benchmarks.speed (--network-seconds) | {f['measured_network_s']:.0f} s = "
                     f"{f['measured_macs_per_s'] / g:.1f} GMAC/s over the tiled work |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed_work", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", help="fixed grid x,y,z voxels (default the chest CT of benchmarks.speed)")
    p.add_argument("--spacing", help="fixed grid x,y,z mm (default the chest CT's)")
    p.add_argument("--decoder", default="lstm", choices=DECODERS)
    p.add_argument("--tile-size", type=int, default=DEFAULT_CONFIG.tile_size, help="1 mm tile side, as predict")
    p.add_argument("--threads", type=int, help="torch CPU threads for the throughput (default torch's choice)")
    p.add_argument("--throughput-side", type=int, default=213,
                   help="encoder input side of the throughput run (default 213: the x1 input of a 128 tile)")
    p.add_argument("--repeats", type=int, default=3, help="timed encoder runs after one warm-up (median)")
    p.add_argument("--network-seconds", type=float, help="a measured network stage (s) for the same image, to "
                   "compare (e.g. benchmarks/results/speed-cpu-chest-bf16-body-median3.md)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--name", default="speed-work-cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    geometry = PairGeometry()
    if args.shape:
        geometry = PairGeometry(tuple(int(v) for v in args.shape.split(",")), geometry.spacing)  # type: ignore[arg-type]
    if args.spacing:
        geometry = PairGeometry(geometry.shape, tuple(float(v) for v in args.spacing.split(",")))  # type: ignore[arg-type]
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = tuple(reversed(geometry.grid_1mm_shape()))
    work = image_work(grid, args.decoder, args.tile_size)  # type: ignore[arg-type]
    throughput = encoder_throughput(args.throughput_side, args.repeats)
    report = {
        "format": "regmis-speed-work/1", "name": args.name,
        "command": shlex.join(["python", "-m", "benchmarks.speed_work", *(argv if argv is not None else sys.argv[1:])]),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "fixed_shape_xyz": list(geometry.shape), "fixed_spacing_xyz": list(geometry.spacing),
        "work": work, "throughput": throughput,
        "floors": floors(work, throughput["macs_per_s"], args.network_seconds),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    text = markdown(report)
    (args.out / f"{args.name}.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
