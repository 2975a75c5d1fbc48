"""Forward time of one inference tile under the execution variants issue 7 lists, on one device.

On a GPU the network is what is left of ``predict``'s time (benchmarks/speed.py), so this measures
what could make it faster before any of it goes into the product: the shipped TorchScript module
against the eager model, channels-last 3-D tensors, weights cast to bf16 instead of autocast, and
``torch.compile``. Each variant runs the chest CT's tile shape (the one ``predict`` uses at that
tile size) at batch 1, median of ``--repeats`` after two warm-up calls, and reports its largest
probability difference to fp32 so that a fast variant that changes the output shows it.

    python -m benchmarks.network_variants --device cuda --tiles 192,256 --out OUT
    python -m benchmarks.network_variants --device cpu --tiles 128 --repeats 2 --out OUT \
        --variant "torchscript (shipped)" --variant "torchscript, channels-last"
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from RegistrationMisalignmentLib.inference import _autocast, resolve_device, tile_shape
from RegistrationMisalignmentLib.networks.model import MisalignmentNet
from RegistrationMisalignmentLib.preprocess import block_geometry
from RegistrationMisalignmentLib.weights import LoadedModel, load_model
from benchmarks.speed import machine_info
from benchmarks.speed_run import PairGeometry

CL3D = torch.channels_last_3d


def chest_inputs(config, tile_size: int, device: torch.device) -> tuple[tuple[int, ...], dict[int, torch.Tensor]]:
    """Random (1, 2, ...) input blocks per scale for the chest CT's tile at ``tile_size``."""
    shape_1mm = tuple(reversed(PairGeometry().grid_1mm_shape(config.spacing_mm)))
    tile = tile_shape(shape_1mm, tile_size)
    generator = torch.Generator().manual_seed(0)
    blocks = {s: torch.randn((1, 2, *size), generator=generator).to(device)
              for s, (_, size) in block_geometry((0, 0, 0), tile, config).items()}
    return tile, blocks


def timed(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of ``fn`` after two warm-up calls, and its last output."""
    times, out = [], None
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def variants(loaded: LoadedModel, device: torch.device) -> dict[str, tuple[Callable, bool, torch.dtype | None]]:
    """name -> (module factory, channels-last inputs, input dtype or None for autocast).

    No factory changes ``loaded.module``, so it also serves as the fp32 reference.
    """

    def eager() -> torch.nn.Module:
        net = MisalignmentNet(loaded.decoder, loaded.config)
        # TorchScript's state dict also holds the non-persistent class-merge buffer, which the constructor makes.
        missing, _ = net.load_state_dict(loaded.module.state_dict(), strict=False)
        if missing:
            raise RuntimeError(f"the TorchScript model lacks {missing}")
        return net.eval().to(device)

    def bf16() -> torch.nn.Module:
        net = eager().to(dtype=torch.bfloat16, memory_format=CL3D)
        net.merge = net.merge.float()  # applied to the float softmax
        return net

    return {
        "torchscript (shipped)": (lambda: loaded.module, False, None),
        "torchscript, channels-last": (lambda: torch.jit.load(str(loaded.path), map_location=device).eval()
                                       .to(memory_format=CL3D), True, None),
        "eager": (eager, False, None),
        "eager, channels-last": (lambda: eager().to(memory_format=CL3D), True, None),
        "eager, bf16 weights, channels-last": (bf16, True, torch.bfloat16),
        "torch.compile, channels-last": (lambda: torch.compile(eager().to(memory_format=CL3D)), True, None),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.network_variants", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="regmis_lstm_631")
    p.add_argument("--device", default="auto")
    p.add_argument("--tiles", default="192,256", help="comma-separated tile sizes (1 mm voxels)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variant", action="append", help="a variant to run, by name; repeat it for more (default: all)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": "python -m benchmarks.network_variants " + shlex.join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(), "model": args.model, "repeats": args.repeats, "rows": []}
    loaded = load_model(args.model, device=device)
    table = variants(loaded, device)
    if args.variant:
        chosen = args.variant
        unknown = [name for name in chosen if name not in table]
        if unknown:
            p.error(f"unknown variant(s) {', '.join(map(repr, unknown))}; choose from {', '.join(map(repr, table))}")
        table = {name: table[name] for name in chosen}
    for tile_size in (int(t) for t in args.tiles.split(",")):
        tile, x = chest_inputs(loaded.config, tile_size, device)
        reference = None
        for name, (factory, channels_last, dtype) in table.items():
            row = {"variant": name, "tile_size": tile_size, "tile": list(tile)}
            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                module = factory()
                inputs = [x[s].to(dtype=dtype or torch.float32,
                                  memory_format=CL3D if channels_last else torch.contiguous_format) for s in (1, 2, 4)]

                def run() -> torch.Tensor:
                    with torch.inference_mode(), (_autocast(device) if dtype is None else torch.autocast(
                            device.type, enabled=False)):
                        return module.probabilities(*inputs).float()

                first = run()  # compiles, for torch.compile
                row["first_call_s"] = time.perf_counter() - t0
                row["forward_s"], out = timed(run, device, args.repeats)
                if reference is None:
                    with torch.inference_mode():
                        reference = loaded.module.probabilities(*[x[s] for s in (1, 2, 4)]).float()
                row["max_prob_diff_vs_fp32"] = float((out - reference).abs().max())
                row["argmax_agreement_vs_fp32"] = float((out.argmax(1) == reference.argmax(1)).float().mean())
                if device.type == "cuda":
                    row["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
                del module, first, out
            except Exception as exc:  # one variant failing must not lose the others
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            report["rows"].append(row)
            print(f"[variants] tile {tile_size} {name}: " + (row.get("error") or
                  f"{row['forward_s'] * 1e3:.1f} ms, diff {row['max_prob_diff_vs_fp32']:.2g}"), flush=True)
            (args.out / "network_variants.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
