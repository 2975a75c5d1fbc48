"""How long a new machine takes to rebuild the canonical run's registration bank from its kept elastix transforms,
against registering it, and whether it gets the same pairs.

For up to --cases cases whose transforms the run keeps (``OUT/bank_transforms/``, ``trainer.registration_bank``),
rebuilds the case into a temporary folder as a new machine would (``RegistrationBank.build``: breathing field,
transformix, residual), times it, and compares each pair with the run's own file in ``OUT/bank/`` where present:
largest difference of the registered image (int16 HU) and of the residual (mm), and how many voxels differ: the
registered image by more than 1 HU (rounding), the supervised mask (a point a hair inside or outside the image's
edge under float32 parameters).
Registration times come from the run's log (``--log``, its ``registration bank: case ... registered in N s``
lines). Pause the run first (``kill -STOP``): the times are the CPU's.

    python benchmarks/bank_restore.py --cases 2 --log runs/canonical.log
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from RegistrationMisalignmentLib.config import DEFAULT_CONFIG  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.data import load_images  # noqa: E402
from trainer.registration_bank import RegistrationBank  # noqa: E402
from trainer.train import split_by_name  # noqa: E402

CANONICAL = Path("trainer/configs/canonical.toml")


def registration_seconds(log: Path | None) -> dict[int, float]:
    """Breathing seed -> seconds its case took to register, the last such line of the run's log."""
    if log is None or not log.exists():
        return {}
    found = re.findall(r"breathing (\d+), (?:exhale|inhale)\) registered in (\d+) s", log.read_text(encoding="utf-8"))
    return {int(seed): float(seconds) for seed, seconds in found}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log", type=Path, default=Path("runs/canonical.log"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/training/bank_restore"))
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_toml(CANONICAL)
    out = Path(cfg.out)
    train, _ = split_by_name(load_images(cfg.data, DEFAULT_CONFIG), cfg.holdout)
    registered = registration_seconds(args.log)
    rows = []
    with tempfile.TemporaryDirectory(prefix="regmis_bank_restore_") as folder:
        bank = RegistrationBank(train, cfg.bank_registrations, cfg.bank_cases, Path(folder), DEFAULT_CONFIG,
                                args.threads, lambda line: None, cfg.bank_region, out / "bank_transforms")
        kept = [case for case in bank.cases if bank.has_kept_transforms(case)][: args.cases]
        for case in kept:
            bank.cases = [case]
            started = time.perf_counter()
            bank.build()
            seconds = time.perf_counter() - started
            hu, mm, off, flipped, voxels = 0.0, 0.0, 0, 0, 0
            for setting in bank.settings:
                own = case.path(out / "bank", setting)
                if not own.exists():
                    continue
                old, new = (torch.load(p, weights_only=True) for p in (own, case.path(Path(folder), setting)))
                difference = (old["deformed"].int() - new["deformed"].int()).abs()
                hu = max(hu, float(difference.max()))
                mm = max(mm, float((old["residual"].float() - new["residual"].float()).abs().max()))
                off += int((difference > 1).sum())
                flipped += int((old["supervised"] != new["supervised"]).sum())
                voxels += difference.numel()
            rows.append({"case": case.key, "scan": case.image.name, "seed": case.seed, "box": list(case.image.hu.shape),
                         "restored_s": round(seconds, 1), "registered_s": registered.get(case.seed),
                         "max_deformed_hu": hu, "max_residual_mm": mm, "voxels": voxels,
                         "deformed_over_1_hu": off, "supervised_flipped": flipped})
            print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"torch": torch.__version__, "threads": args.threads,
                                                         "rows": rows}, indent=1), encoding="utf-8")
    lines = ["# Rebuilding the registration bank from its kept elastix transforms", "",
             f"`python benchmarks/bank_restore.py --cases {args.cases} --log {args.log}` (the run paused), "
             f"{args.threads} threads. Registered: the run's log line for the case; restored: breathing field, "
             "transformix for every setting, residual, files written (`RegistrationBank.build`). Differences "
             "against the run's own bank files (int16 HU, float16 residual).", "",
             "| case | scan | registered s | restored s | voxels (all settings) | registered image: max diff HU, "
             "voxels > 1 HU | max residual diff mm | supervised voxels flipped |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['scan']} | {r['registered_s'] or '–'} | {r['restored_s']} | {r['voxels']:,} | "
              f"{r['max_deformed_hu']:.0f}, {r['deformed_over_1_hu']:,} | {r['max_residual_mm']:.4f} | "
              f"{r['supervised_flipped']:,} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
