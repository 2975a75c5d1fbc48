"""The ledger of a growing run: what it has cost and what it has reached, rewritten after every epoch.

Read from the run's ``history.jsonl`` (one row per epoch, never rewritten), so the ledger of a run that
was resumed on several machines adds up every stretch: CPU hours and GPU minutes, epochs and samples per
stage, and the last validation numbers, beside the curves.
"""

from __future__ import annotations

from pathlib import Path

from trainer.export import plot_curves
from trainer.history import read_events, read_history
from trainer.config import SETTING_GROUPS


def totals(rows: list[dict]) -> dict:
    """Wall hours per device type, CPU core-hours (the process's CPU time), and per stage (a dropped
    attempt of a stage on its own line): epochs, samples, hours, last validation row."""
    hours: dict[str, float] = {}
    core_hours = 0.0
    stages: dict[str, dict] = {}
    for row in rows:
        device = row.get("device", "unknown")
        hours[device] = hours.get(device, 0.0) + row["seconds"] / 3600.0
        core_hours += row.get("cpu_seconds", 0.0) / 3600.0
        entry = stages.setdefault(row["attempt"], {"epochs": 0, "samples": 0, "hours": 0.0})
        entry["epochs"] = row["epoch"]
        entry["samples"] += row.get("samples", 0)
        entry["hours"] += row["seconds"] / 3600.0
        entry["last"] = row
    return {"hours": hours, "core_hours": core_hours, "stages": stages}


def _validation(row: dict) -> str:
    if "val_mean_f1" in row:
        text = (f"mean F1 {100 * row['val_mean_f1']:.1f} %, kappa {row['val_kappa']:.3f}, "
                f"F1 c/p/w {' / '.join(f'{100 * f:.1f}' for f in row['val_f1'])} %, cw {row['val_cw']} voxels")
        if "val_live_kappa" in row:  # the numbers above are the weights' running average (ema_decay)
            text += f" (weights averaged; the last step's own: kappa {row['val_live_kappa']:.3f})"
        if "val_shipped_kappa" in row:
            # per-class F1, not the mean: a class neither predicts nor holds is left out of a mean F1 (nan)
            text += (f"; the shipped model ({row['val_shipped_sha256']}) on the same blocks: kappa "
                     f"{row['val_shipped_kappa']:.3f}, F1 c/p/w "
                     f"{' / '.join(f'{100 * f:.1f}' for f in row['val_shipped_f1'])} %"
                     + (f", cw {row['val_shipped_cw']} voxels" if "val_shipped_cw" in row else ""))
        for group in (g for g in SETTING_GROUPS if f"val_{g}_kappa" in row):  # rows from epoch 505 on
            scores = [(f"val_{group}_", ""), *([(f"val_shipped_{group}_", "the shipped model ")]
                                              if f"val_shipped_{group}_kappa" in row else [])]
            text += f"; {group} blocks: " + ", ".join(
                f"{who}kappa {row[key + 'kappa']:.3f}, mean F1 {100 * row[key + 'mean_f1']:.1f} %, cw {row[key + 'cw']}"
                for key, who in scores)
        if "train_dvf_epe_mm" in row:  # dvf_loss_weight: the encoders' auxiliary DVF heads, on the training blocks
            text += (f"; DVF heads on the training blocks: EPE {row['train_dvf_epe_mm']:.2f} mm vs "
                     f"{row['train_dvf_zero_epe_mm']:.2f} mm for the zero predictor")
        if "val_blocks" in row:  # older rows do not say (the canonical run's before its epoch 34: 6 uniform blocks)
            text += (f"; judged on {row['val_blocks']} blocks of "
                     f"{' / '.join(f'{100 * s:.0f}' for s in row['val_truth_share'])} % c/p/w")
        return text
    if "val_endpoint_error_mm" in row:
        text = (f"EPE {row['val_endpoint_error_mm']:.2f} mm vs {row['val_target_magnitude_mm']:.2f} mm "
                "for the zero predictor")
        if "val_live_endpoint_error_mm" in row:
            text += f" (weights averaged; the last step's own: {row['val_live_endpoint_error_mm']:.2f} mm)"
        if "val_weighted_endpoint_error_mm" in row:
            text += (f"; class-weighted {row['val_weighted_endpoint_error_mm']:.2f} vs "
                     f"{row['val_weighted_target_magnitude_mm']:.2f} mm")
        return text
    return ""


def _model(event: dict) -> str:
    """What a rewind row set the weights to (rows before "best" existed give the export's path and hash apart)."""
    return f"`{event['to']}` ({event['sha256']})" if "sha256" in event else event["to"]


def write_ledger(history_path: Path, out: Path) -> Path:
    """``ledger.md`` and ``curves.png`` beside the history; returns the ledger's path."""
    rows = read_history(history_path)
    summary = totals(rows)
    hours = summary["hours"]
    lines = ["# Training ledger", "",
             f"CPU: **{hours.get('cpu', 0.0):.2f} h** of wall time on the CPU ({summary['core_hours']:.2f} core-hours "
             f"of the process's CPU time: the run is nice'd and yields to other work); GPU: "
             f"**{60 * hours.get('cuda', 0.0):.1f} min**. {len(rows)} epochs in all; one row per epoch in "
             "`history.jsonl`.", "",
             "| stage | epochs | samples | hours | last validation (held-out pairs) |", "|---|---|---|---|---|"]
    for stage, entry in summary["stages"].items():
        lines.append(f"| {stage} | {entry['epochs']} | {entry['samples']} | {entry['hours']:.2f} | "
                     f"{_validation(entry['last'])} |")
    notes = [f"- {event['stage']} set back after its epoch {event['epoch']} to {_model(event)}, Adam's moments cleared; "
             "its epochs count on (`--rewind-to`)"
             for event in read_events(history_path) if event["event"] == "rewind"]
    last = summary["stages"].get("misalignment", {}).get("last", {})
    if "selected_epoch" in last and last["selected_epoch"] is None:
        notes.append("- misalignment's export: no epoch selected yet on these held-out blocks (`select_by`: "
                     "none qualifies); an export takes the last weights")
    elif "selected_epoch" in last:
        selected = next((r for r in rows if r["attempt"] == "misalignment" and r["epoch"] == last["selected_epoch"]), None)
        notes.append(f"- misalignment's export: epoch {last['selected_epoch']}, the best-validated since epoch "
                     f"{last.get('selected_since', '?')} (`select_by`): "
                     + (_validation(selected) if selected else "(no history row of it)"))
    lines += [*([""] + notes if notes else []), "", "![curves](curves.png)", ""]
    path = out / "ledger.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    plot_curves(history_path, out / "curves.png")
    return path
