"""Turning measured configurations into the benchmark's results: machine, scaling fit, JSON, Markdown."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from benchmarks.speed_run import STAGES

GIB = 1024**3


def machine_info() -> dict:
    """What the numbers were measured on: CPU model, cores, torch and CUDA versions, GPU name."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
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
        "| configuration | model | device | scale | fixed grid | 1 mm grid | tile x batch | "
        + " | ".join(STAGES)
        + " | total s | Mvox/s fixed | Mvox/s 1 mm | peak RSS GB | peak CUDA GB | speed-up vs naive |",
        "|" + "---|" * (13 + len(STAGES)),
    ]
    for r in report["rows"]:
        model = r["decoder"] + (" (random)" if r["random_weights"] else "")
        cells = [r["label"], model, r["device"], f"{r['scale']:g}", "x".join(map(str, r["shape"])),
                 "x".join(map(str, r["shape_1mm"]))]
        if "error" in r:
            cells += ["", *[""] * len(STAGES), f"failed: {r['error']}", "", "", "", "", ""]
        else:
            cells += ["per patch x 1" if r["kind"] == "naive" else f"{r['tile_size']} x {r['tile_batch']}",
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
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path
