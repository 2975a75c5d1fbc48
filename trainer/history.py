"""A run's ``history.jsonl``: one row per epoch, appended and never rewritten, read by the ledger and the curves."""

from __future__ import annotations

import json
from pathlib import Path


def read_history(history_path: Path) -> list[dict]:
    return [json.loads(line) for line in history_path.read_text(encoding="utf-8").splitlines() if line.strip()]


def attempt_labels(rows: list[dict]) -> list[str]:
    """Each row's stage, or "<stage>, dropped after epoch N" for the rows of a stage that was begun again
    (``regmis-train --drop-stage``): a resumed run never repeats an epoch, so a stage's epoch falling back
    marks a new attempt, and only its last attempt is the one the checkpoint holds."""
    attempts: list[tuple[str, int]] = []   # per row: (stage, index of its attempt)
    last: dict[str, tuple[int, int]] = {}  # stage -> (its latest attempt, the epoch that attempt reached)
    for row in rows:
        attempt, epoch = last.get(row["stage"], (0, 0))
        if row["epoch"] <= epoch:
            attempt += 1
        last[row["stage"]] = (attempt, row["epoch"])
        attempts.append((row["stage"], attempt))
    reached = {key: row["epoch"] for key, row in zip(attempts, rows)}
    return [stage if attempt == last[stage][0] else f"{stage}, dropped after epoch {reached[(stage, attempt)]}"
            for stage, attempt in attempts]
