"""The benchmark's outputs: per-landmark CSV, scores per method and setting, JSON, Markdown and PNGs.

Every number of the report is computed by ``summarize`` from the per-landmark rows with
``metrics.evaluate_classes``, so the CSV alone reproduces the report (a test does exactly that).
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from RegistrationMisalignmentLib.config import CLASS_NAMES
from RegistrationMisalignmentLib.evaluation import OUTSIDE, OUTSIDE_NAME
from RegistrationMisalignmentLib.metrics import evaluate_classes

ALL = "all"
"""Key of the scores over all settings together."""
CSV_NAME = "landmarks.csv"
CSV_COLUMNS = ("case", "setting", "method", "label", "x", "y", "z", "tre_mm", "true_class", "predicted_class")
PUBLISHED_LABEL = "published (not re-measured)"
PUBLISHED = {
    "source": "Sokooti et al., IEEE Access 9 (2021), DIR-Lab 4DCT: 10 cases x 300 landmarks x 5 settings "
              "(the team's summary in shared/design/method.md)",
    "note": "The B-spline 2000 numbers are given without a decoder in method.md; they are shown for the proposed "
            "LSTM. These numbers were not re-measured here: other data, other registrations.",
    ALL: {"lstm": {"mean_f1": 0.731, "cw": 77}, "multiscale": {"mean_f1": 0.759},
          "singlescale": {"mean_f1": 0.739}, "regnet-t": {"cw": 197}},
    "bspline2000": {"lstm": {"mean_f1": 0.639, "cw": 22}},
}


@dataclass
class ProtocolRow:
    """One landmark of one case, registered by one setting, classed by one method."""

    case: str
    setting: str
    method: str
    label: str
    position_lps: tuple[float, float, float]
    tre_mm: float
    true_class: int
    predicted_class: int


def _class_name(index: int) -> str:
    return OUTSIDE_NAME if index == OUTSIDE else CLASS_NAMES[index]


def write_rows(rows: list[ProtocolRow], path: Path) -> Path:
    """The per-landmark table; classes as words (correct/poor/wrong, outside = not predicted)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow([r.case, r.setting, r.method, r.label, *(repr(float(v)) for v in r.position_lps),
                             repr(float(r.tre_mm)), _class_name(r.true_class), _class_name(r.predicted_class)])
    return path


def read_rows(path: Path) -> list[ProtocolRow]:
    """Read back what ``write_rows`` wrote (floats round-trip exactly: they are written with repr)."""
    classes = {**{name: i for i, name in enumerate(CLASS_NAMES)}, OUTSIDE_NAME: OUTSIDE}
    with path.open(newline="", encoding="utf-8") as f:
        return [ProtocolRow(r["case"], r["setting"], r["method"], r["label"],
                            (float(r["x"]), float(r["y"]), float(r["z"])), float(r["tre_mm"]),
                            classes[r["true_class"]], classes[r["predicted_class"]])
                for r in csv.DictReader(f)]


def _scores(rows: list[ProtocolRow]) -> dict:
    inside = [r for r in rows if r.predicted_class != OUTSIDE]
    return evaluate_classes(np.array([r.true_class for r in inside], dtype=np.int64),
                            np.array([r.predicted_class for r in inside], dtype=np.int64)).to_dict()


def _truth(rows: list[ProtocolRow]) -> dict:
    tre = np.array([r.tre_mm for r in rows])
    counts = np.bincount([r.true_class for r in rows], minlength=3)
    return {"n": len(rows), "counts": counts.tolist(), "fractions": (counts / max(len(rows), 1)).tolist(),
            "class_names": list(CLASS_NAMES), "tre_mean_mm": float(tre.mean()) if len(tre) else None,
            "tre_median_mm": float(np.median(tre)) if len(tre) else None}


def summarize(rows: list[ProtocolRow], settings: list[str], methods: list[str]) -> dict:
    """Scores per method (per setting and over all settings) and the truth's class distribution."""
    results = {}
    for method in methods:
        mine = [r for r in rows if r.method == method]
        results[method] = {**{s: _scores([r for r in mine if r.setting == s]) for s in settings}, ALL: _scores(mine)}
    # The truth does not depend on the method: count each (case, setting, landmark) once.
    first = [r for r in rows if r.method == methods[0]] if methods else []
    truth = {**{s: _truth([r for r in first if r.setting == s]) for s in settings}, ALL: _truth(first)}
    return {"results": results, "truth": truth}


# ---- Markdown ------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _published(kind: str, setting: str, key: str) -> str:
    value = PUBLISHED.get(setting, {}).get(kind, {}).get(key)
    return "–" if value is None else (_pct(value) if key == "mean_f1" else str(value))


def _score_cells(s: dict) -> list[str]:
    f1c, f1p, f1w = s["f1"]
    return [str(s["n"]), _pct(s["accuracy"]), _pct(f1c), _pct(f1p), _pct(f1w), _pct(s["mean_f1"]),
            _num(s["kappa"]), str(s["cw"])]


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(c) + " |" for c in lines]


SCORE_HEADER = ["N", "accuracy %", "F1c %", "F1p %", "F1w %", "mean F1 %", "kappa", "cw"]


def markdown(report: dict) -> str:
    """The human-readable report (all numbers from ``report``, i.e. from the per-landmark rows)."""
    settings, methods = report["settings"], report["methods"]
    results, truth = report["results"], report["truth"]
    title = {"phantom": "chest phantoms", "chest-ct": "a whole held-out chest CT with breathing fields",
             "dirlab": "DIR-Lab", "pairs": "user pairs"}[report["study"]]
    out = [f"# Misalignment benchmark on the paper's protocol: {title}", "",
           f"Produced by `{report['command']}` on {report['created']} "
           f"({report['environment']['device']}, torch {report['environment']['torch']}, "
           f"itk-elastix {report['environment']['itk_elastix']}, network in "
           f"{report['environment'].get('network_precision', 'an unrecorded precision')}).", ""]
    if not report.get("complete", True):
        out += [f"**Unfinished: {len(report['cases'])} of {report['cases_planned']} cases.** Run the same command "
                "with `--resume` to continue it.", ""]
    if report["tiny"]:
        out += [f"**CI-size run (`--tiny`)**: {'; '.join(report['tiny_changes'])}. The numbers only show "
                "that the pipeline works; they say nothing about the method.", ""]
    out += ["## Data and truth", ""]
    if report.get("held_out_scan"):
        out += [f"Held-out scan: `{report['held_out_scan']}`, never trained on (the canonical training run holds it "
                "out: `trainer/configs/canonical.toml`, `holdout`).", ""]
    out += [f"- {c['name']}: {c['description']}" for c in report["cases"]] + [
        "", report["truth_definition"], "",
        "## Registration settings (elastix) and the truth they leave", "",
        f"Parameter files in `{report['elastix']['directory']}`; each B-spline setting starts from the affine one.", ""]
    out += _table(["setting", "files", "N", "correct %", "poor %", "wrong %", "mean TRE mm", "median TRE mm"],
                  [[s, " + ".join(report["elastix"]["files"].get(s, [])) or "–", str(truth[s]["n"]),
                    *(_pct(f) for f in truth[s]["fractions"]), _num(truth[s]["tre_mean_mm"], 2),
                    _num(truth[s]["tre_median_mm"], 2)] for s in [*settings, ALL]])
    out += ["", f"elastix-t re-registers the fixed and the deformed moving image with "
            f"`{report['elastix']['elastix_t']}` and classes |displacement| at each landmark.", "",
            "## All settings together", ""]
    out += _table(["method", "kind", *SCORE_HEADER, f"mean F1 % {PUBLISHED_LABEL}", f"cw {PUBLISHED_LABEL}"],
                  [[m, methods[m]["kind"], *_score_cells(results[m][ALL]),
                    _published(methods[m]["kind"], ALL, "mean_f1"), _published(methods[m]["kind"], ALL, "cw")]
                   for m in methods])
    out += ["", f"Published: {PUBLISHED['source']}. {PUBLISHED['note']}", "", "## Per setting", ""]
    for m in methods:
        kind = methods[m]["kind"]
        out += [f"### {m} ({kind})", ""]
        out += _table(["setting", *SCORE_HEADER, f"mean F1 % {PUBLISHED_LABEL}", f"cw {PUBLISHED_LABEL}"],
                      [[s, *_score_cells(results[m][s]), _published(kind, s, "mean_f1"), _published(kind, s, "cw")]
                       for s in [*settings, ALL]])
        out += ["", f"![confusion matrices of {m}]({report['figures']['confusion'][m]})", ""]
    out += ["## Figures", "", f"![mean F1 by setting]({report['figures']['mean_f1_by_setting']})", ""]
    if report["figures"].get("overlay"):
        out += [f"![overlay]({report['figures']['overlay']}) {report['figures']['overlay_caption']}", ""]
    runtime = report["runtime"]
    out += ["## Runtime (s)", ""]
    out += _table(["case", "build", "elastix settings", *methods, "total"],
                  [[c["name"], f"{c['seconds']['build']:.1f}", f"{sum(c['seconds']['registration'].values()):.1f}",
                    *(f"{sum(c['seconds']['methods'][m].values()):.1f}" for m in methods),
                    f"{c['seconds']['total']:.1f}"]
                   for c in report["cases"]])
    out += ["", "Build: making or reading the case. elastix settings: the shared affine stage plus each B-spline "
            "stage. Methods: every setting's prediction (elastix-t: its registration).", "",
            f"Total {runtime['total_s']:.0f} s. Per method, mean per case: "
            + ", ".join(f"{m} {runtime['methods'][m]['per_case_mean_s']:.1f} s" for m in methods)
            + "; per case and setting (one prediction): "
            + ", ".join(f"{m} {runtime['methods'][m]['per_case_mean_s'] / max(len(settings), 1):.1f} s"
                        for m in methods) + ".", ""]
    return "\n".join(out)


# ---- figures -------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def safe_name(method: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", method)


def confusion_png(method: str, scores: dict, settings: list[str], path: Path) -> Path:
    """One panel per setting and one over all: counts, coloured by the share of each true class."""
    plt = _pyplot()
    keys = [*settings, ALL]
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 2.9), squeeze=False)
    for ax, key in zip(axes[0], keys):
        cm = np.array(scores[key]["confusion"], dtype=float)
        share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, f"{int(v)}", ha="center", va="center", color="white" if share[i, j] > 0.5 else "black",
                    fontsize=8)
        ax.set_xticks(range(3), [n[0] for n in CLASS_NAMES])
        ax.set_yticks(range(3), [n[0] for n in CLASS_NAMES])
        ax.set_title(f"{key}\nmean F1 {_pct(scores[key]['mean_f1'])} %", fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
    axes[0][0].set_ylabel("true", fontsize=8)
    fig.suptitle(method, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def mean_f1_png(report: dict, path: Path) -> Path:
    """Mean F1 per setting, one line per method; published values as open markers."""
    plt = _pyplot()
    settings = report["settings"]
    keys = [*settings, ALL]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for m, info in report["methods"].items():
        values = [report["results"][m][k]["mean_f1"] for k in keys]
        line, = ax.plot(range(len(keys)), [np.nan if v is None else 100 * v for v in values], "o-", label=m)
        published = [PUBLISHED.get(k, {}).get(info["kind"], {}).get("mean_f1") for k in keys]
        if any(v is not None for v in published):
            ax.plot(range(len(keys)), [np.nan if v is None else 100 * v for v in published], "s", mfc="none",
                    color=line.get_color(), ms=9, label=f"{m}: {PUBLISHED_LABEL}")
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylabel("mean F1 (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"mean F1 by registration setting ({report['study']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out: Path, rows: list[ProtocolRow], report: dict, overlay: dict | None) -> dict:
    """Write CSV, figures, JSON and Markdown under ``out``; ``report`` holds everything but the scores.

    ``overlay`` (fixed, labelmap, points, agree, caption) draws one labelmap with its landmarks; without
    it, overlay entries already in ``report["figures"]`` (a resumed study's, drawn earlier) are kept.
    """
    from RegistrationMisalignmentLib.figures import overlay_png

    out.mkdir(parents=True, exist_ok=True)
    write_rows(rows, out / CSV_NAME)
    report = {**report, **summarize(rows, report["settings"], list(report["methods"])), "published": PUBLISHED,
              "files": {"landmarks_csv": CSV_NAME, "json": "report.json", "markdown": "report.md"}}
    figures = {**report.get("figures", {}), "confusion": {}, "mean_f1_by_setting": "mean_f1_by_setting.png"}
    for m in report["methods"]:
        figures["confusion"][m] = f"confusion_{safe_name(m)}.png"
        confusion_png(m, report["results"][m], report["settings"], out / figures["confusion"][m])
    mean_f1_png(report, out / figures["mean_f1_by_setting"])
    if overlay is not None:
        figures["overlay"], figures["overlay_caption"] = "overlay.png", overlay["caption"]
        overlay_png(overlay["fixed"], overlay["labelmap"], out / "overlay.png", title=overlay["caption"],
                    points_lps=overlay["points"], point_agree=overlay["agree"])
    report["figures"] = figures
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    return report


__all__ = ["ProtocolRow", "PUBLISHED", "PUBLISHED_LABEL", "CSV_NAME", "CSV_COLUMNS", "ALL", "write_rows", "read_rows",
           "summarize", "markdown", "write_report", "safe_name"]
