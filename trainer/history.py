"""A run's ``history.jsonl``: one row per epoch, appended and never rewritten, and a drop row where a stage
was begun again (``regmis-train --drop-stage``); read by the ledger, the curves and the model card."""

from __future__ import annotations

import json
from pathlib import Path

HISTORY_FILE = "history.jsonl"
"""Its name in a run's ``out`` folder, beside ``checkpoint/``."""


def read_history(history_path: Path) -> list[dict]:
    """The epoch rows in order, each with ``"attempt"``: its stage, or "<stage>, attempt k, dropped after
    epoch N" for the rows of an attempt that a later drop row forgot (the checkpoint holds only a stage's
    last attempt; the hours of all of them count)."""
    rows: list[dict] = []
    since_drop: dict[str, list[dict]] = {}  # stage -> its epoch rows since its last drop
    drops: dict[str, int] = {}
    for line in history_path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        stage = row["stage"]
        if row.get("event") == "drop":
            drops[stage] = drops.get(stage, 0) + 1
            for dropped in since_drop.pop(stage, []):
                dropped["attempt"] = f"{stage}, attempt {drops[stage]}, dropped after epoch {row['epoch']}"
            continue
        row["attempt"] = stage
        since_drop.setdefault(stage, []).append(row)
        rows.append(row)
    return rows


def record_drop(history_path: Path, stage: str, epoch: int) -> None:
    """Append the drop row of ``stage``, whose attempt had reached ``epoch``."""
    with open(history_path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": "drop", "stage": stage, "epoch": epoch}) + "\n")
