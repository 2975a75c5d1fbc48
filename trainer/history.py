"""A run's ``history.jsonl``: one row per epoch, appended and never rewritten, and an event row where a stage
was begun again (``regmis-train --drop-stage``) or set back to an earlier model (``--rewind-to``); read by the
ledger, the curves and the model card."""

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
        if "event" in row:
            continue
        row["attempt"] = stage
        since_drop.setdefault(stage, []).append(row)
        rows.append(row)
    return rows


def read_events(history_path: Path) -> list[dict]:
    """The event rows (drops, rewinds) in order."""
    rows = (json.loads(line) for line in history_path.read_text(encoding="utf-8").splitlines() if line.strip())
    return [row for row in rows if "event" in row]


def record_event(history_path: Path, event: str, stage: str, epoch: int, **details) -> None:
    """Append an event row: ``"drop"`` of ``stage``, whose attempt had reached ``epoch``, or ``"rewind"`` of
    ``stage`` after ``epoch`` to the model that ``details`` name."""
    with open(history_path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": event, "stage": stage, "epoch": epoch, **details}) + "\n")


def rewind_label(event: dict) -> str:
    """A rewind row's model in a few characters: its export's hash, or the epoch of the run's own best weights."""
    if "sha256" in event:  # rows before "--rewind-to best" existed
        return event["sha256"]
    return event["to"].rsplit(" ", 1)[-1].strip("()") if event["to"].endswith(")") else event["to"].split(", ")[-1]
