"""Is a candidate model better than the shipped one on the protocol, or within the landmarks' noise?

Both studies must have classed the same landmarks (same cases, settings and truth: ``landmarks.csv`` of two
``regmis benchmark`` runs). elastix is not bit-identical from run to run (threads, CPU), so two studies of the
same protocol may class a few landmarks' truth differently (3 of 3000 rows, one setting, for epochs 255 and 317,
the truth 0.004 mm apart on average): those rows (up to ``MAX_TRUTH_MISMATCH`` of them) are left out of both and
counted in the report; more, and the studies are refused as not the same. The difference in mean F1, kappa and
cw (candidate minus baseline) is measured on all settings together and per setting, with a paired bootstrap:
landmarks (labels) are drawn with replacement,
a landmark carrying its rows of every case and setting (its truth and both models' classes; the chest-CT
study's cases are the same scan's landmarks under other breathing fields), so that the two models are always
scored on the same draw (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13: percentile
intervals). Within a draw both models' mean F1 averages the same classes: those in the drawn truth or in
either model's classes (a class one model never predicts and the draw never holds scores 0 for it, as for the
other). The interval covers which landmarks were picked, not which scans or breathing fields.

    python benchmarks/compare_protocols.py benchmarks/results/protocol_chest_ct_stage2_e115 \\
        benchmarks/results/protocol_chest_ct_stage2_e194        # seconds; writes compare_<baseline>.md beside it
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from RegistrationMisalignmentLib.benchmark.elastix import SETTINGS as ELASTIX_SETTINGS  # noqa: E402
from RegistrationMisalignmentLib.config import CLASS_NAMES  # noqa: E402
from RegistrationMisalignmentLib.metrics import cohen_kappa, f1_per_class  # noqa: E402

LSTM = "regmis_lstm_631"
SCORES = ("mean F1 %", "kappa", "cw")
MAX_TRUTH_MISMATCH = 0.01  # share of rows whose truth may differ between two studies of the same protocol


@dataclass
class Classed:
    """One model's classes at the study's landmarks: arrays over rows (landmark x setting), aligned across studies."""

    case: np.ndarray
    setting: np.ndarray
    label: np.ndarray
    true: np.ndarray
    predicted: np.ndarray


def read_classes(study: Path, method: str) -> Classed:
    """``method``'s rows of ``study/landmarks.csv``, sorted by (case, setting, label).

    Raises ``ValueError`` when the study holds no row of ``method``."""
    index = {name: i for i, name in enumerate(CLASS_NAMES)}
    with open(study / "landmarks.csv", newline="", encoding="utf-8") as handle:
        rows = sorted((r["case"], r["setting"], int(r["label"]), index[r["true_class"]], index[r["predicted_class"]])
                      for r in csv.DictReader(handle) if r["method"] == method)
    if not rows:
        raise ValueError(f"{study / 'landmarks.csv'} has no row of {method!r}: give the method it names (--method)")
    case, setting, label, true, predicted = (np.array(column) for column in zip(*rows))
    return Classed(case, setting, label, true, predicted)


def paired_scores(true: np.ndarray, baseline: np.ndarray, candidate: np.ndarray,
                  weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Baseline's and candidate's (resamples, 3): mean F1 %, kappa and cw of each row of ``weights`` (resamples,
    rows: how often a row is drawn); mean F1 over the same classes for both (the module's doc)."""
    out = np.empty((2, len(weights), 3))
    for i, w in enumerate(weights):
        confusions = [np.bincount(true * 3 + p, weights=w, minlength=9).reshape(3, 3) for p in (baseline, candidate)]
        shown = confusions[0].sum(axis=1) + confusions[0].sum(axis=0) + confusions[1].sum(axis=0) > 0
        for k, confusion in enumerate(confusions):
            f1 = np.nan_to_num(f1_per_class(confusion))[shown]
            out[k, i] = 100 * f1.mean(), cohen_kappa(confusion), confusion[0, 2] + confusion[2, 0]
    return out[0], out[1]


def draw_weights(label: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples + 1, len(label)): the first row all ones (the measured scores), then bootstrap draws of the
    landmarks, every row of a drawn landmark (each case and setting) counted as often as it is drawn."""
    labels, position = np.unique(label, return_inverse=True)
    counts = rng.multinomial(len(labels), np.full(len(labels), 1 / len(labels)), size=resamples)
    return np.concatenate([np.ones((1, len(label))), counts[:, position]])


def same_truth(baseline: Classed, candidate: Classed) -> tuple[Classed, Classed, int]:
    """Both studies' rows whose truth agrees, and how many were left out (module doc: elastix's run-to-run noise).

    Raises ``ValueError`` when the studies hold other landmarks, or when more than ``MAX_TRUTH_MISMATCH`` of the
    rows' truth differs."""
    for field in ("case", "setting", "label"):
        if not np.array_equal(getattr(baseline, field), getattr(candidate, field)):
            raise ValueError(f"the studies differ in their landmarks' {field}: compare studies of the same cases, "
                             "settings and landmarks (regmis benchmark with the same --cases, --landmarks, --settings)")
    same = baseline.true == candidate.true
    if np.mean(~same) > MAX_TRUTH_MISMATCH:
        raise ValueError(f"the studies differ in their landmarks' true class at {int((~same).sum())} of {len(same)} "
                         f"rows (more than {MAX_TRUTH_MISMATCH:.0%}): compare studies of the same cases, settings "
                         "and landmarks (regmis benchmark with the same --cases, --landmarks, --settings)")
    keep = [Classed(*(getattr(study, f.name)[same] for f in fields(Classed))) for study in (baseline, candidate)]
    return keep[0], keep[1], int((~same).sum())


def compare(baseline: Classed, candidate: Classed, resamples: int, seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Per scope (all settings, then each setting): (scope, baseline scores, candidate scores), each
    (resamples + 1, 3), the first row the measured one, on the rows whose truth agrees (``same_truth``).

    Raises ``ValueError`` when the two studies did not class the same landmarks, or differ in the truth of more
    than ``MAX_TRUTH_MISMATCH`` of their rows."""
    baseline, candidate, _ = same_truth(baseline, candidate)
    rng = np.random.default_rng(seed)
    scopes = [("all settings", np.ones(len(baseline.true), dtype=bool))]
    present = set(baseline.setting)
    order = [s for s in ELASTIX_SETTINGS if s in present] + sorted(present - set(ELASTIX_SETTINGS))
    scopes += [(s, baseline.setting == s) for s in order]
    out = []
    for scope, rows in scopes:
        weights = draw_weights(baseline.label[rows], resamples, rng)
        out.append((scope, *paired_scores(baseline.true[rows], baseline.predicted[rows], candidate.predicted[rows],
                                          weights)))
    return out


def report(baseline: Path, candidate: Path, method: str, resamples: int, seed: int) -> str:
    base, cand, left_out = same_truth(read_classes(baseline, method), read_classes(candidate, method))
    cases = np.unique(base.case)
    mismatch = (f" {left_out} row(s) whose truth differs between the two studies (elastix is not bit-identical "
                "from run to run) are left out of both." if left_out else "")
    command = (f"python benchmarks/compare_protocols.py {baseline} {candidate} --method {method} "
               f"--resamples {resamples} --seed {seed}")
    lines = [f"# {candidate.name} against {baseline.name}: paired bootstrap on the protocol's landmarks", "",
             f"`{command}`", "",
             f"{len(np.unique(base.label))} landmarks x {len(np.unique(base.setting))} settings in {len(cases)} "
             f"case(s) ({', '.join(cases)}). Difference = candidate - baseline (cw: fewer is better); 95 % "
             f"percentile interval over {resamples} paired draws of the landmarks (each with its rows of every case "
             "and setting); 'better / worse in' = share of draws where the candidate is better / worse. The "
             "interval covers the choice of landmarks, not of scans or breathing fields; mean F1 averages, in each "
             "draw, the classes its truth or either model holds." + mismatch, "",
             "| scope | N | " + " | ".join(f"{s} base / cand | diff [95 %] | better / worse in" for s in SCORES) + " |",
             "|---|---|" + "---|---|---|" * len(SCORES)]
    for scope, b, c in compare(base, cand, resamples, seed):
        cells = []
        for k, name in enumerate(SCORES):
            diff = c[1:, k] - b[1:, k]
            lo, hi = np.nanpercentile(diff, [2.5, 97.5]) if np.isfinite(diff).any() else (np.nan, np.nan)
            gain = -diff if name == "cw" else diff
            better, worse = np.mean(gain > 0), np.mean(gain < 0)
            fmt = "{:.3f}" if name == "kappa" else "{:.1f}" if name != "cw" else "{:.0f}"
            cells.append(f"{fmt.format(b[0, k])} / {fmt.format(c[0, k])} | {fmt.format(c[0, k] - b[0, k])} "
                         f"[{fmt.format(lo)}, {fmt.format(hi)}] | {100 * better:.0f} / {100 * worse:.0f} %")
        rows = base.setting == scope if scope != "all settings" else np.ones(len(base.true), bool)
        lines.append(f"| {scope} | {int(rows.sum())} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("baseline", type=Path, help="study folder of the shipped model (holds landmarks.csv)")
    p.add_argument("candidate", type=Path, help="study folder of the candidate")
    p.add_argument("--method", default=LSTM, help=f"method compared, as landmarks.csv names it (default {LSTM})")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="markdown file (default: compare_<baseline>.md in the candidate's folder)")
    args = p.parse_args(argv)
    text = report(args.baseline, args.candidate, args.method, args.resamples, args.seed)
    out = args.out or args.candidate / f"compare_{args.baseline.name}.md"
    out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
