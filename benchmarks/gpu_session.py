"""One timed GPU session: training throughput, the speed benchmark, then a default-model training run.

A lent GPU is a short, fixed budget, so everything runs from one command and each phase has its own
time limit; a phase that fails or runs out leaves the others and what it wrote. The training run is
planned from the throughput just measured: ``trainer/configs/default_gpu.toml`` gives the settings,
and the epochs, learning-rate steps and time limit are sized to the seconds left (25 % RegNet
pre-training, 75 % the misalignment model). The config actually used is written beside the results.

    python -m benchmarks.gpu_session --out OUT --data ../shared/data --budget-s 540

Writes to OUT: ``results.tgz`` (throughput, speed report, training history, curves, model cards,
config, logs), the two exported models, and the checkpoint's files split in parts under 16 MB.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

from benchmarks.train_throughput import PAIR_STAGE, REGNET_STAGE, misalignment_stage
from trainer.config import DEFAULT_SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "trainer" / "configs" / "default_gpu.toml"
REGNET_SHARE = 0.25
"""Of the training seconds, the share planned for the RegNet pre-training (three scales)."""
STARTUP_S = 20.0
"""Trainer start-up: imports, reading and resampling the CT, the validation pool."""
EXPORT_S = 25.0
"""TorchScript export of both models, cards and curves."""
PART_BYTES = 15 * 2**20


def log(message: str) -> None:
    print(f"[gpu-session {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(name: str, command: list[str], timeout_s: float, results: Path) -> bool:
    """Run a phase with its stdout/stderr in ``results/<name>.log``; False if it failed or timed out."""
    if timeout_s < 10:
        log(f"{name}: skipped, {timeout_s:.0f} s left")
        return False
    log(f"{name}: {' '.join(command)} (limit {timeout_s:.0f} s)")
    start = time.perf_counter()
    with open(results / f"{name}.log", "w") as out:
        try:
            proc = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)
            ok = proc.returncode == 0
            status = f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            ok, status = False, "timed out"
    log(f"{name}: {status} after {time.perf_counter() - start:.0f} s")
    tail = (results / f"{name}.log").read_text(errors="replace").splitlines()[-12:]
    print("\n".join("    " + line for line in tail), flush=True)
    return ok


def plan(throughput: dict, seconds: float, base: dict) -> dict:
    """Stage lengths that fit ``seconds`` at the measured step and pair times (a sketch, with a time limit
    as the safety net)."""
    rows = {r["stage"]: r for r in throughput.get("rows", []) if "error" not in r}
    regnet = rows[REGNET_STAGE]["seconds_per_step"]
    lstm = rows[misalignment_stage(base["decoder"])]["seconds_per_step"]
    pairs = {r["device"]: r["seconds_per_step"] for r in rows.values() if r["stage"].startswith(PAIR_STAGE)}
    on_gpu = "cuda" in pairs
    pair = pairs["cuda"] if on_gpu else pairs["cpu"]
    steps, pool = base["steps_per_epoch"], base["pool_pairs"] * (1 if on_gpu else 0.5)
    pool = max(1, int(pool))
    overhead = pool * pair + 2.0  # the epoch's pair pool and its validation
    usable = seconds - STARTUP_S - EXPORT_S
    regnet_epochs = max(1, int(REGNET_SHARE * usable / (3 * (steps * regnet + overhead))))
    stage1 = 3 * regnet_epochs * (steps * regnet + overhead)
    epoch = steps * lstm + overhead
    epochs = max(2, int((usable - stage1) / epoch))
    # The limit is checked after each epoch, so it leaves one epoch and the export before the end.
    limit = max(1.0, seconds - EXPORT_S - 1.5 * epoch)
    return {**base, "regnet_epochs": regnet_epochs, "epochs": epochs, "pool_pairs": pool, "pool_on_device": on_gpu,
            "lr_schedule": [[max(2, math.ceil(0.6 * epochs) + 1), 3e-4], [max(3, math.ceil(0.85 * epochs) + 1), 1e-4]],
            "time_limit_minutes": round(limit / 60.0, 2)}


def toml_text(values: dict, header: str) -> str:
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)
    return header + "".join(f"{k} = {value(v)}\n" for k, v in values.items())


def split_file(path: Path, out: Path) -> None:
    """``path`` in parts of at most PART_BYTES (a session's files come back up to 16 MB each); ``cat`` joins them."""
    data = path.read_bytes()
    for i in range(0, len(data), PART_BYTES):
        (out / f"{path.name}.part{i // PART_BYTES}").write_bytes(data[i : i + PART_BYTES])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", default=str(DEFAULT_SHARED_DATA), help="real CT folder for training")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock seconds for the whole session")
    p.add_argument("--speed-s", type=float, default=190.0, help="limit of the speed benchmark")
    p.add_argument("--reserve-s", type=float, default=35.0, help="kept for start-up, export and packing")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to rehearse the session (with --rehearse)")
    p.add_argument("--rehearse", action="store_true",
                   help="tiny phases (CI-sized speed run, 2-step epochs) to check the session end to end on a CPU")
    args = p.parse_args(argv)
    deadline = time.perf_counter() + args.budget_s
    left = lambda: deadline - time.perf_counter()  # noqa: E731
    out, results, train_dir = args.out, Path("/tmp/regmis_gpu_results"), Path("/tmp/regmis_gpu_train")
    for folder in (results, train_dir):  # only files come back from a session, at most 8: pack the rest
        shutil.rmtree(folder, ignore_errors=True)
    results.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    small = ["--batch-size", "2", "--repeats", "1", "--pair-mm", "96"] if args.rehearse else \
        ["--batch-size", "10", "--repeats", "3"]

    if shutil.which("nvidia-smi"):
        with open(results / "nvidia-smi.txt", "w") as smi:
            subprocess.run(["nvidia-smi"], stdout=smi, stderr=subprocess.STDOUT)
    run("throughput", [py, "benchmarks/train_throughput.py", "--device", args.device, *small, "--out", str(results)],
        min(100.0, left()), results)
    # Random weights time the architectures exactly, and need no model file from another torch version.
    run("speed", [py, "-m", "benchmarks.speed", "--device", args.device, "--random-weights", "--decoders", "lstm,regnet-t",
                  "--repeats", "3", "--name", "speed-gpu",
                  "--out", str(results), *(["--ci"] if args.rehearse else [])], min(args.speed_s, left() - 120), results)

    base = tomllib.loads(BASE_CONFIG.read_text())
    if args.rehearse:
        base.update(batch_size=2, steps_per_epoch=2, pool_pairs=2, val_pairs=1, val_patches=2, phantoms=1)
    train_s = left() - args.reserve_s
    try:
        tag = "gpu" if args.device.startswith("cuda") else "cpu"
        config = plan(json.loads((results / f"train_throughput_{tag}.json").read_text()), train_s, base)
    except (OSError, KeyError, ValueError) as exc:
        log(f"no throughput to plan from ({exc!r}); training with the base config and a time limit")
        config = {**base, "time_limit_minutes": round(max(1.0, train_s - EXPORT_S - 60) / 60.0, 2)}
    config.update(data=args.data, out=str(train_dir), device=args.device)
    config_path = results / "default_gpu_used.toml"
    config_path.write_text(toml_text(config, f"# Planned by benchmarks/gpu_session.py for {train_s:.0f} s of training.\n"))
    log(f"training plan: {json.dumps(config)}")
    run("train", [py, "-m", "trainer.train", "--config", str(config_path)], left() - 15, results)

    for name in ("regmis_lstm_631.pt", "regmis_regnet_t.pt"):
        if (train_dir / name).exists():
            shutil.copy(train_dir / name, out / name)
    for part in sorted((train_dir / "checkpoint").glob("*")) if (train_dir / "checkpoint").exists() else []:
        split_file(part, out)
    with tarfile.open(out / "results.tgz", "w:gz") as tar:
        tar.add(results, arcname="results")
        for item in sorted(train_dir.glob("*")) if train_dir.exists() else []:
            if item.suffix not in (".pt", ".tmp"):
                tar.add(item, arcname=f"train/{item.name}")
    log(f"packed {sorted(f.name for f in out.iterdir())}; {left():.0f} s of the budget left")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
