"""One timed GPU session: the canonical training run continued on the GPU (a throughput measurement optional).

A lent GPU is a short, fixed budget (15 minutes of device time per task, at least 10 of them for the
canonical run), so everything runs from one command and each phase has its own time limit. The run is
resumed from the checkpoint the working tree carries (``trainer/configs/canonical.toml``), on the compact
data cache (``python -m trainer.cache``, carried with the call), with a time limit that brings it back
with its last epoch; its checkpoint files, history and ledger come back under OUT, ready to be copied
over the tracked ones and committed.

The GPU machine's image has no SimpleITK, which the trainer's modules import (its wheel, 50 MiB, does not
fit the call): there the session puts ``benchmarks/sitk_absent`` on the path, which lets the imports pass
and fails on any call, and the stretch calls none (the NumPy cache, no phantoms, no registration).

Rehearse on the CPU first, exactly as the GPU call will run (in a copy of the checkout: the session
writes the run's checkpoint):

    python -m trainer.cache --out runs/cache --scans lidc_0001_chest_ct lidc_0002_chest_ct chest_ct_1.5mm
    python -m benchmarks.gpu_session --out /tmp/gpu_out --data runs/cache --device cpu --train-s 240 --throughput-s 0 \
        --without-simpleitk --batch-size 1 --set steps_per_epoch=1 --set accumulate=1

then move aside what the call need not carry, and on the GPU machine (carry runs/cache; README, "On a lent GPU"):

    python -m benchmarks.gpu_session --list-aside > /tmp/aside.txt && xargs rm -f < /tmp/aside.txt
    python3 -m benchmarks.gpu_session --out $OUT --data runs/cache

and back here: ``python -m benchmarks.gpu_session --bring-in <the call's files_at>``, the moved files restored
(``xargs git checkout -- < /tmp/aside.txt``), commit.

At most 8 files come back from a call: the checkpoint's two parts, state.json, history, ledger, curves and two
logs. A throughput measurement (``--throughput-s 60``) fits a second, short call.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CANONICAL = REPO / "trainer" / "configs" / "canonical.toml"
CALL_S = 600.0
"""A device call's longest command: the run must be back, its files copied, before it."""
STARTUP_S = 60.0
"""Trainer start-up (imports, the scans, the validation pool) and the export at the end."""
SITK_ABSENT = REPO / "benchmarks" / "sitk_absent"
"""A stand-in SimpleITK package (imports pass, calls fail) for a machine without it."""
HELD_OUT = "chest_ct_1.5mm.nii.gz"
"""The stretch's held-out scan: the judge's POPI scan and elastix are not on the GPU machine."""
ASIDE = ("benchmarks/results", "Resources/Models", "Resources/Screenshots")
"""Tracked folders the stretch can do without (but the run's files below), moved aside for the call: the tree
travels in at most 64 MiB with the cache. Without Resources/Models its rows carry no ``val_shipped_*``."""
TRAVELS = ("checkpoint/misalignment.pt", "checkpoint/state.json", "history.jsonl", "ledger.md", "curves.png")
"""The run's files (under its ``out``) that a stage-2 stretch reads or writes."""
PART_BYTES = 15 * 2**20
"""A session's files come back up to 16 MB each: larger ones are split, ``cat`` joins them."""


def log(message: str) -> None:
    print(f"[gpu-session {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def without_simpleitk() -> None:
    """Put the stand-in SimpleITK first on this process's path and its children's."""
    sys.path.insert(0, str(SITK_ABSENT))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITK_ABSENT), os.environ.get("PYTHONPATH")]))
    log(f"SimpleITK: the stand-in of {SITK_ABSENT.relative_to(REPO)} (imports pass, any call fails)")


def aside(out: str) -> list[str]:
    """The tracked files under ``ASIDE`` but the run's ``TRAVELS``: what to move aside before the call."""
    tracked = subprocess.run(["git", "ls-files", *ASIDE], cwd=REPO, capture_output=True, text=True,
                             encoding="utf-8", check=True)
    keep = {f"{out}/{name}" for name in TRAVELS}
    return [path for path in tracked.stdout.splitlines() if path not in keep]


def run(name: str, command: list[str], timeout_s: float, logs: Path) -> bool:
    """Run a phase with its output in ``logs/<name>.log``; False if it failed or timed out."""
    if timeout_s < 10:
        log(f"{name}: skipped, {timeout_s:.0f} s left")
        return False
    log(f"{name}: {' '.join(command)} (limit {timeout_s:.0f} s)")
    start = time.perf_counter()
    with open(logs / f"{name}.log", "w", encoding="utf-8") as out:
        try:
            ok = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s).returncode == 0
            status = "exit 0" if ok else "failed"
        except subprocess.TimeoutExpired:
            ok, status = False, "timed out"
    log(f"{name}: {status} after {time.perf_counter() - start:.0f} s")
    print("\n".join("    " + line for line in (logs / f"{name}.log").read_text(errors="replace", encoding="utf-8").splitlines()[-8:]))
    return ok


def copy_back(path: Path, out: Path) -> None:
    """``path`` into ``out``, in parts of at most PART_BYTES when larger."""
    data = path.read_bytes()
    if len(data) <= PART_BYTES:
        shutil.copy(path, out / path.name)
        return
    for i in range(0, len(data), PART_BYTES):
        (out / f"{path.name}.part{i // PART_BYTES}").write_bytes(data[i : i + PART_BYTES])


def bring_in(back: Path, run_dir: Path) -> list[Path]:
    """The files a call brought back (``back``: ``copy_back``'s parts joined again) over the run's own in
    ``run_dir`` (checkpoint files into its checkpoint folder); returns the files written. Raises
    FileNotFoundError where ``back`` lacks one of ``TRAVELS``, before anything is written."""
    parts: dict[str, list[tuple[int, Path]]] = {}
    for path in back.iterdir():
        head, sep, index = path.name.rpartition(".part")
        whole = bool(sep and index.isdigit())
        if path.is_file():
            parts.setdefault(head if whole else path.name, []).append((int(index) if whole else 0, path))
    missing = [name for name in TRAVELS if Path(name).name not in parts]
    if missing:
        raise FileNotFoundError(f"{back} lacks {', '.join(missing)}: not what a GPU session brings back")
    written = []
    for relative in TRAVELS:
        target = run_dir / relative
        target.write_bytes(b"".join(p.read_bytes() for _, p in sorted(parts[Path(relative).name])))
        written.append(target)
    return written


def train_command(python: str, data: str, device: str, batch_size: int, minutes: float,
                  overrides: Sequence[str] = ()) -> list[str]:
    """The canonical run resumed on ``device`` for ``minutes`` (the trainer stops after the epoch that
    passes them); deformed pairs are made on the GPU.

    Without the registration bank: its files (GBs, not carried) would be registered again inside the lease
    (elastix is not on the GPU machine either), so that stretch draws as many synthetic pairs per epoch as the
    run draws synthetic and bank pairs together (the canonical run draws bank pairs only: without this its
    epochs would hold no pair). Synthetic pairs have pulled the run off the registration judge before
    (canonical.toml, ``pool_pairs``); ``select_by`` keeps the best-judged weights for the export whatever
    the stretch does, and the next CPU stretch may set the run back to them (``--rewind-to best``). The
    selection is off for the stretch: held-out blocks made there would start a new count and overwrite the
    run's best weights with the stretch's first epoch. Its validation rows are of synthetic pairs of
    ``HELD_OUT`` (the 1.5 mm chest crop, which it does not train on), under their own ``val_judge``; the
    next CPU epoch is judged on the registration judge again."""
    from trainer.config import TrainConfig  # here: after the stand-in SimpleITK, where there is none

    canonical = TrainConfig.from_toml(CANONICAL)
    pairs = canonical.pool_pairs + canonical.bank_pairs
    return [python, "-m", "trainer.train", "--config", str(CANONICAL), "--resume", "--data", data,
            "--device", device, "--batch-size", str(batch_size), "--set", f"pool_on_device={str(device != 'cpu').lower()}",
            "--set", f"time_limit_minutes={minutes:.2f}", "--set", "bank_pairs=0", "--set", f"pool_pairs={pairs}",
            "--set", 'select_by=""', "--set", "phantoms=0", "--set", f'holdout=["{HELD_OUT}"]',
            "--set", "val_registrations=[]", *(a for o in overrides for a in ("--set", o))]


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="where the run's files and the logs come back ($OUT)")
    p.add_argument("--list-aside", action="store_true",
                   help="print the tracked files the stretch does not read (to move aside before the call) and stop")
    p.add_argument("--data", default="runs/cache", help="training data: the compact cache carried with the call")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to rehearse the session")
    p.add_argument("--throughput-s", type=float, default=0.0,
                   help="limit of a throughput measurement before the run (0: none; a call lasts at most 600 s)")
    p.add_argument("--train-s", type=float, default=550.0,
                   help="seconds for the canonical run, start-up included (550 came back after 508 s of a 600 s call)")
    p.add_argument("--batch-size", type=int, default=4, help="dense blocks per step on the GPU")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a further TrainConfig override for the run (a rehearsal's shorter epochs: steps_per_epoch=1)")
    p.add_argument("--bring-in", type=Path, metavar="DIR",
                   help="copy what a call brought back (its files_at folder) over the run's files, and stop")
    p.add_argument("--without-simpleitk", action="store_true",
                   help="use the stand-in SimpleITK even where the real one is installed (to rehearse the GPU machine)")
    args = p.parse_args(argv)
    if args.without_simpleitk or importlib.util.find_spec("SimpleITK") is None:
        without_simpleitk()
    from RegistrationMisalignmentLib.synthetic.images import scan_stem
    from trainer.cache import CACHE_SUFFIX
    from trainer.config import TrainConfig

    out = TrainConfig.from_toml(CANONICAL).out
    if args.list_aside:
        print("\n".join(aside(out)))
        return 0
    if args.bring_in:
        for path in bring_in(args.bring_in, REPO / out):
            log(f"brought in {path.relative_to(REPO)}")
        return 0
    if args.out is None:
        p.error("--out is required")
    run_dir = REPO / out
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if shutil.which("nvidia-smi"):
        with open(logs / "nvidia-smi.txt", "w", encoding="utf-8") as smi:
            subprocess.run(["nvidia-smi"], stdout=smi, stderr=subprocess.STDOUT)
    if args.throughput_s > 0:
        image = Path(args.data) / (scan_stem(HELD_OUT) + CACHE_SUFFIX)  # not phantoms: they need SimpleITK
        run("throughput", [sys.executable, "-m", "benchmarks.train_throughput", "--device", args.device, "--repeats", "2",
                           "--dense-batch", str(args.batch_size), "--decoders", "lstm", "--image", str(image),
                           "--out", str(args.out)],
            args.throughput_s, logs)
    minutes = max(0.5, (args.train_s - STARTUP_S) / 60.0)
    left = CALL_S - 20.0 - (time.perf_counter() - started)  # killed with the call, it would bring nothing back
    run("train", train_command(sys.executable, args.data, args.device, args.batch_size, minutes, args.set),
        min(args.train_s + 60.0, left), logs)
    for item in (run_dir / name for name in TRAVELS):  # what --bring-in puts back
        if item.is_file():
            copy_back(item, args.out)
    log(f"brought back {sorted(f.name for f in args.out.iterdir())}: here, python -m benchmarks.gpu_session "
        "--bring-in FILES_AT, then commit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
