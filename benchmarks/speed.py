"""Measures whole-image prediction: time per stage, voxels/s, peak RSS and CUDA memory, scaling with volume.

Generates the chest-CT-sized phantom pair (see ``speed_run``), then measures, each configuration in
a fresh process (``speed_run``): every model given, at the chosen volume scale, per stage (median of
``--repeats`` after a warm-up), voxels/s, peak RSS and peak CUDA memory; comparison rows for the
RegNet-t baseline and the seed's simple per-patch loop; and the first model at the ``--scales``
volume factors, with the fitted exponents of time and memory against voxel count. Writes
``<name>.json`` and ``<name>.md`` to ``--out``.

Run from the repository root:
    python -m benchmarks.speed --random-weights --device cpu          # issue 7, before a model is trained
    python -m benchmarks.speed --ci --out /tmp/bench                    # tiny, < 1 min on 2 cores
    python -m benchmarks.speed --shape 256,256,100 --scales none --decoders lstm --random-weights --skip-comparisons
Run times do not depend on the weights, so ``--random-weights`` rows time the architecture exactly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python benchmarks/speed.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from benchmarks.speed_run import CHEST_SHAPE, CHEST_SPACING, STAGES, PairGeometry, cached_pair, default_cache_dir  # noqa: E402
from RegistrationMisalignmentLib.config import DEFAULT_CONFIG  # noqa: E402
from RegistrationMisalignmentLib.inference import resolve_device  # noqa: E402
from RegistrationMisalignmentLib.networks.model import DECODERS, MisalignmentNet, RegNetT  # noqa: E402
from RegistrationMisalignmentLib.weights import KINDS, available_models, resolve_model_path, save_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CI_PRESET = {
    "random_weights": True, "decoders": "lstm,regnet-t", "device": "cpu", "shape": "32,32,12", "scales": "0.5,1",
    "tile_size": "32", "naive_patch": 117, "repeats": 3, "warmup": "small",
}
"""``--ci``: a 32 x 32 x 12 pair (one 32^3 tile at 1 mm), two sizes for the exponent; < 1 min on 2 cores."""
DEFAULTS = {
    "random_weights": False, "decoders": ",".join(KINDS), "device": "auto", "shape": ",".join(map(str, CHEST_SHAPE)),
    "scales": "0.25,0.5,1,2", "tile_size": "", "naive_patch": 205, "repeats": 3, "warmup": "small",
}



# ---- the report: machine, scaling fit, JSON, Markdown ----------------------------------------------
GIB = 1024**3


def machine_info() -> dict:
    """What the numbers were measured on: CPU model, cores, torch and CUDA versions, GPU name."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": cpu,
        "cpu_cores": usable,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
        if hasattr(os, "sysconf") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "simpleitk": sitk.Version_VersionString(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if torch.cuda.is_available():
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
    return info


def fit_exponent(sizes: list[float], values: list[float]) -> float | None:
    """Slope of log(value) against log(size), least squares: 1 is linear, 0 is flat.

    None when fewer than two distinct sizes (or a non-positive value) leave nothing to fit.
    """
    pairs = [(s, v) for s, v in zip(sizes, values) if s > 0 and v is not None and v > 0]
    if len({s for s, _ in pairs}) < 2:
        return None
    x, y = np.log([s for s, _ in pairs]), np.log([v for _, v in pairs])
    return float(np.polyfit(x, y, 1)[0])


def scaling_summary(rows: list[dict]) -> dict:
    """Time and memory against 1 mm voxel count for the scaling rows, with fitted exponents."""
    points = [{"scale": r["scale"], "voxels_1mm": r["voxels_1mm"], "total_s": r["total_s"],
               "peak_rss_bytes": r["peak_rss_bytes"], "cuda_peak_allocated_bytes": r.get("cuda_peak_allocated_bytes")}
              for r in sorted(rows, key=lambda r: r["voxels_1mm"]) if "error" not in r]
    sizes = [p["voxels_1mm"] for p in points]
    summary = {
        "points": points,
        "time_exponent": fit_exponent(sizes, [p["total_s"] for p in points]),
        "memory_exponent": fit_exponent(sizes, [p["peak_rss_bytes"] for p in points]),
    }
    if any(p["cuda_peak_allocated_bytes"] for p in points):
        summary["cuda_memory_exponent"] = fit_exponent(sizes, [p["cuda_peak_allocated_bytes"] for p in points])
    return summary


GOAL_CPU_S = 240.0
"""Issue 7: whole chest CT in < 4 min on 2 CPU cores."""
GOAL_GPU_S = 2.0


def goals(row: dict) -> dict:
    """Issue 7's goals for a whole chest CT: < 2 s and < 12 GB on a GPU, < 4 min and < 6 GB RAM on CPU."""
    on_gpu = row["device"].startswith("cuda")
    limit_s = GOAL_GPU_S if on_gpu else GOAL_CPU_S
    result = {"time_limit_s": limit_s, "time_met": row["total_s"] < limit_s,
              "ram_limit_bytes": 6 * 10**9, "ram_met": row["peak_rss_bytes"] < 6 * 10**9}
    if on_gpu:
        result.update(gpu_memory_limit_bytes=12 * 10**9,
                      gpu_memory_met=row.get("cuda_peak_allocated_bytes", math.inf) < 12 * 10**9)
    return result


def _gb(value: float | None) -> str:
    return "" if value is None else f"{value / 10**9:.2f}"


def _seconds(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def timing_basis(repeats: int, warmup: str) -> str:
    """How the times were taken, in words (a single unwarmed run is not called a median)."""
    runs = f"medians of {repeats} runs" if repeats > 1 else "from 1 run"
    return f"{runs} without warm-up" if warmup == "none" else f"{runs} after a {warmup} warm-up"


def markdown(report: dict) -> str:
    """The results as a Markdown page: the machine, one table row per configuration, the scaling fit."""
    m = report["machine"]
    gpu = f", GPU {m['gpu']} ({m.get('gpu_memory_gib')} GiB, CUDA {m['cuda']})" if m.get("gpu") else ""
    lines = [
        f"# Speed benchmark: {report['name']}",
        "",
        f"Machine: {m['cpu']}, {m['cpu_cores']} cores, {m['memory_gib']} GiB RAM{gpu}; "
        f"torch {m['torch']}, Python {m['python']}. Date {report['date']}.",
        f"Command: `{report['command']}`",
        "",
        *([] if report.get("complete", True) else ["**Unfinished**: the run stopped before its last configuration.", ""]),
        f"Times are {timing_basis(report['repeats'], report['warmup'])}, in seconds; "
        "Mvox/s counts fixed-grid voxels and 1 mm voxels; peak RSS is the process's high-water mark.",
        "",
        "| configuration | model | device | scale | fixed grid | 1 mm grid | tile x batch | precision | tiles computed | "
        + " | ".join(STAGES)
        + " | total s | Mvox/s fixed | Mvox/s 1 mm | peak RSS GB | peak CUDA GB | speed-up vs naive |",
        "|" + "---|" * (15 + len(STAGES)),
    ]
    for r in report["rows"]:
        model = r["decoder"] + (" (random)" if r["random_weights"] else "")
        cells = [r["label"], model, r["device"], f"{r['scale']:g}", "x".join(map(str, r["shape"])),
                 "x".join(map(str, r["shape_1mm"]))]
        if "error" in r:
            cells += ["", "", "", *[""] * len(STAGES), f"failed: {r['error']}", "", "", "", "", ""]
        else:
            tiles = (f"{r['tiles_computed']} of {r['tiles_total']}" + (" (body)" if r.get("body_only") else "")
                     if r.get("tiles_total") else "")
            cells += ["per patch x 1" if r["kind"] == "naive" else f"{r['tile_size']} x {r['tile_batch']}",
                      r.get("precision", "float32"), tiles,
                      *[_seconds(r["timings_s"][s]) for s in STAGES], _seconds(r["total_s"]),
                      f"{r['voxels_per_s'] / 1e6:.3g}", f"{r['voxels_1mm_per_s'] / 1e6:.3g}", _gb(r["peak_rss_bytes"]),
                      _gb(r.get("cuda_peak_allocated_bytes")),
                      f"{r['speedup_vs_naive']:.2f}" if r.get("speedup_vs_naive") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    s = report.get("scaling")
    if s:
        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.2f}"
        lines += ["", f"Scaling ({s['label']}, {len(s['points'])} sizes): time ~ voxels^{fmt(s['time_exponent'])}, "
                  f"peak RSS ~ voxels^{fmt(s['memory_exponent'])}"
                  + (f", peak CUDA ~ voxels^{fmt(s['cuda_memory_exponent'])}" if "cuda_memory_exponent" in s else "")
                  + " (1 is linear, 0 is flat)."]
    profiles = [r for r in report["rows"] if r.get("tile_profile")]
    if profiles:
        lines += ["", "Network stage split (one batch of tiles, median): encoders vs alignment + decoder; "
                  "'forwards only' = batches x batch forward, the rest of the network stage is block cutting, "
                  "copies and stitching.", "",
                  "| configuration | tiles | batch | inputs x1/x2/x4 | batch forward s | encoders s | decoder s "
                  "| forwards only s | network stage s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in profiles:
            p = r["tile_profile"]
            sides = "/".join(str(p["input_sides"][k][0]) for k in ("1", "2", "4"))
            lines.append(f"| {r['label']} | {p['tiles']} | {p['batch']} | {sides} | {_seconds(p['batch_forward_s'])} "
                         f"| {_seconds(p['encoders_s'])} | {_seconds(p['decoder_s'])} "
                         f"| {_seconds(p['forward_total_estimate_s'])} | {_seconds(r['timings_s']['network'])} |")
    if report.get("goals"):
        g = report["goals"]
        lines += ["", f"Issue 7 goals ({g['label']}): time < {g['time_limit_s']:g} s "
                  f"{'met' if g['time_met'] else 'NOT met'}; peak RAM < 6 GB {'met' if g['ram_met'] else 'NOT met'}"
                  + (f"; GPU memory < 12 GB {'met' if g['gpu_memory_met'] else 'NOT met'}"
                     if "gpu_memory_met" in g else "")
                  + "."]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """``<name>.json`` and ``<name>.md`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{report['name']}.json", out_dir / f"{report['name']}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown(report), encoding="utf-8")
    return json_path, md_path


# ---- the benchmark ----------------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    return [] if text.strip().lower() in ("", "none") else [float(v) for v in text.split(",")]


def random_model(decoder: str, directory: Path) -> Path:
    """A random-weight model of ``decoder`` saved as a real model file (reused when already there)."""
    path = directory / f"random_{decoder}.pt"
    if not (path.exists() and path.with_suffix(".json").exists()):
        torch.manual_seed(0)
        module = RegNetT(DEFAULT_CONFIG) if decoder == "regnet-t" else MisalignmentNet(decoder, DEFAULT_CONFIG)
        save_model(module.eval(), {"name": f"random_{decoder}", "decoder": decoder, "config": DEFAULT_CONFIG.to_dict(),
                                   "random_weights": True, "training": "none: random weights, for timing only"},
                   path)
    return path


def model_entries(args: argparse.Namespace, cache: Path) -> list[dict]:
    """[{path, decoder, random_weights}] for the models to time, in the order given."""
    if args.random_weights:
        decoders = [d.strip() for d in args.decoders.split(",") if d.strip()]
        unknown = set(decoders) - set(KINDS)
        if unknown:
            raise SystemExit(f"--decoders: unknown {sorted(unknown)}; choose from {', '.join(KINDS)}")
        return [{"path": random_model(d, cache / "models"), "decoder": d, "random_weights": True, "sha256": None}
                for d in decoders]
    paths = [resolve_model_path(p) for p in args.models] if args.models else available_models()
    if not paths:
        raise SystemExit("no models in Resources/Models; pass --models PATH ... or --random-weights")
    entries = []
    for path in paths:
        card = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        entries.append({"path": path, "decoder": card["decoder"], "random_weights": bool(card.get("random_weights")),
                        "sha256": card.get("sha256")})
    return entries


def run_configuration(job: dict) -> dict:
    """Run ``speed_run`` in a fresh interpreter; its stderr streams through, its last stdout line is the result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed_run", json.dumps(job)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, text=True, encoding="utf-8")
    if proc.returncode != 0:
        reason = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        return {"error": f"{reason} (see its stderr above)"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", help="model files (.pt with card) or names; default: Resources/Models")
    p.add_argument("--random-weights", action="store_true", default=None,
                   help="time random-weight models of --decoders (no trained model needed)")
    p.add_argument("--decoders", help=f"with --random-weights, comma-separated of {', '.join(KINDS)} (default all)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--shape", help=f"fixed grid x,y,z voxels at --scale 1 (default {','.join(map(str, CHEST_SHAPE))})")
    p.add_argument("--spacing", default=",".join(map(str, CHEST_SPACING)), help="fixed grid x,y,z mm")
    p.add_argument("--scale", type=float, default=1.0, help="voxel-count factor of the main rows (spacing kept)")
    p.add_argument("--scales", help="voxel-count factors of the scaling study, or 'none' (default 0.25,0.5,1,2)")
    p.add_argument("--seed", type=int, default=0, help="phantom and DVF seed")
    p.add_argument("--phantom-spacing", type=float, default=1.0, help="mm of the phantom the pair is resampled from")
    p.add_argument("--repeats", type=int, help="timed runs per configuration, median reported (default 3)")
    p.add_argument("--warmup", choices=("small", "full", "none"),
                   help="warm-up before timing: a crop holding a batch of full tiles (default), the whole pair, none")
    p.add_argument("--tile-size", help="comma-separated tile sides (1 mm voxels) to compare; default the model's")
    p.add_argument("--tile-batch", type=int, help="tiles per forward pass; default the model's")
    p.add_argument("--threads", type=int, help="torch CPU threads (default torch's choice)")
    p.add_argument("--precision", choices=("auto", "float32"), default="auto", help="predict's precision (default auto)")
    p.add_argument("--no-body-mask", action="store_true", help="predict the whole image (default: the body only)")
    p.add_argument("--naive-patch", type=int, help="x1 input side of the seed's per-patch loop (default 205; 0 skips)")
    p.add_argument("--skip-comparisons", action="store_true", help="no RegNet-t and per-patch rows")
    p.add_argument("--skip-regnet-t", action="store_true", help="no RegNet-t row (the per-patch row stays)")
    p.add_argument("--no-tile-profile", action="store_true", help="skip the encoder/decoder split of one tile batch")
    p.add_argument("--ci", action="store_true", help="tiny CI preset; explicit flags still override it")
    p.add_argument("--cache", type=Path, help=f"pair and random-model cache (default {default_cache_dir()})")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="folder for <name>.json/.md")
    p.add_argument("--name", help="results file stem (default speed-<device>[-ci])")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for key, value in {**DEFAULTS, **(CI_PRESET if args.ci else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.models and args.random_weights:
        raise SystemExit("give either --models or --random-weights, not both")
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = str(resolve_device(args.device))
    cache = args.cache or default_cache_dir()
    shape, spacing = tuple(int(v) for v in args.shape.split(",")), tuple(_floats(args.spacing))
    base = PairGeometry(shape, spacing)  # type: ignore[arg-type]
    models = model_entries(args, cache)
    primary = next((m for m in models if m["decoder"] in DECODERS), models[0])
    tiles = [int(v) for v in _floats(args.tile_size)] or [None]

    def log(message: str) -> None:
        print(f"[speed] {message}", file=sys.stderr, flush=True)

    def measure(label: str, role: str, kind: str, model: dict, scale: float, tile: int | None) -> dict:
        geometry = base.scaled(scale)
        log(f"{label}: pair {geometry.shape} ...")
        fixed, moving = cached_pair(geometry, args.seed, args.phantom_spacing, cache)
        job = {"kind": kind, "model": str(model["path"]), "fixed": str(fixed), "moving": str(moving), "device": device,
               "tile_size": tile, "tile_batch": args.tile_batch, "repeats": args.repeats, "warmup": args.warmup,
               "threads": args.threads, "naive_patch": args.naive_patch, "precision": args.precision,
               "body_only": not args.no_body_mask, "profile_tiles": role == "main" and not args.no_tile_profile}
        result = run_configuration(job)
        shape_1mm = geometry.grid_1mm_shape(DEFAULT_CONFIG.spacing_mm)
        row = {"label": label, "role": role, "kind": kind, "decoder": model["decoder"],
               "model": Path(model["path"]).name, "model_sha256": model["sha256"],
               "random_weights": model["random_weights"], "device": device,
               "scale": scale, "shape": list(geometry.shape), "spacing": list(geometry.spacing),
               "shape_1mm": list(shape_1mm), "voxels": geometry.voxels,
               "voxels_1mm": shape_1mm[0] * shape_1mm[1] * shape_1mm[2], **result}
        if "error" not in row:
            row["voxels_per_s"] = row["voxels"] / row["total_s"]
            row["voxels_1mm_per_s"] = row["voxels_1mm"] / row["total_s"]
        log(f"{label}: " + (row["error"] if "error" in row else
                            f"{row['total_s']:.3g} s, peak RSS {row['peak_rss_bytes'] / 1e9:.2f} GB"))
        return row

    rows: list[dict] = []
    scaling_label = primary["decoder"] + (f" tile {tiles[0]}" if tiles[0] else "")
    scaling_rows: list[dict] = []

    header = {  # what every rewrite of the report shares
        "name": args.name or f"speed-{device.split(':')[0]}" + ("-ci" if args.ci else ""),
        "command": "python -m benchmarks.speed " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "settings": {"device": device, "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
                     "shape": list(base.shape), "spacing": list(base.spacing), "scale": args.scale,
                     "phantom_spacing_mm": args.phantom_spacing, "tile_sizes": tiles, "tile_batch": args.tile_batch,
                     "threads": args.threads, "naive_patch": args.naive_patch, "precision": args.precision,
                     "body_only": not args.no_body_mask},
        "repeats": args.repeats,
        "warmup": args.warmup,
    }

    def write(complete: bool = False) -> tuple[Path, Path]:
        """Write the report of the rows so far: a run stopped part-way keeps what it measured."""
        naive = next((r for r in rows if r["kind"] == "naive" and "error" not in r), None)
        for r in rows:
            if naive and "error" not in r:
                r["speedup_vs_naive"] = naive["total_s"] / r["total_s"]
        report = {**header, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "rows": rows, "complete": complete}
        if len(scaling_rows) > 1:
            report["scaling"] = {"label": scaling_label, **scaling_summary(scaling_rows)}
        # The goals are about the chest geometry itself: the primary model's row at volume factor 1, whether it
        # is a main row (--scale 1) or a scaling row (e.g. --scale 0.25 --scales 0.5,1 to keep the comparisons small).
        chest_row = next((r for r in scaling_rows if r["scale"] == 1 and "error" not in r), None)
        if chest_row and base == PairGeometry():
            report["goals"] = {"label": chest_row["label"], **goals(chest_row)}
        return write_report(report, args.out)

    for model in models:
        for tile in tiles:
            label = model["decoder"] + (f" tile {tile}" if len(tiles) > 1 else "")
            rows.append(measure(label, "main", "predict", model, args.scale, tile))
            if model is primary and tile == tiles[0]:
                scaling_rows.append(rows[-1])
            write()
    if not args.skip_comparisons:
        if not args.skip_regnet_t and not any(m["decoder"] == "regnet-t" for m in models):
            baseline = {"path": random_model("regnet-t", cache / "models"), "decoder": "regnet-t",
                        "random_weights": True, "sha256": None}
            rows.append(measure("RegNet-t baseline", "comparison", "predict", baseline, args.scale, tiles[0]))
            write()
        if args.naive_patch and primary["decoder"] in DECODERS:
            label = f"naive {args.naive_patch}^3 patches"
            rows.append(measure(label, "comparison", "naive", primary, args.scale, None))
            write()
    for f in _floats(args.scales):
        if f != args.scale:
            rows.append(measure(f"{primary['decoder']} x{f:g}", "scaling", "predict", primary, f, tiles[0]))
            scaling_rows.append(rows[-1])
            write()
    json_path, md_path = write(complete=True)
    log(f"wrote {json_path} and {md_path}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
