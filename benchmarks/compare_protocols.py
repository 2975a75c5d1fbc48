"""Is a candidate model better than the shipped one on the protocol, or within the landmarks' noise?

Both studies must have classed the same landmarks (same cases, settings and truth: ``landmarks.csv`` of two
``regmis benchmark`` runs). The difference in mean F1, kappa and cw (candidate minus baseline) is measured on
all settings together and per setting, with a paired bootstrap: landmarks are drawn with replacement within
each case, a landmark carrying its rows of every setting (its truth and both models' classes), so that the two
models are always scored on the same draw (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993,
ch. 13: percentile intervals). The interval covers which landmarks were picked, not which scans or breathing
fields: with one case it understates the protocol's noise.

    python benchmarks/compare_protocols.py benchmarks/results/protocol_chest_ct_stage2_e115 \\
        benchmarks/results/protocol_chest_ct_stage2_e194        # seconds; writes compare_<baseline>.md beside it
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from RegistrationMisalignmentLib.benchmark.elastix import SETTINGS as ELASTIX_SETTINGS  # noqa: E402
from RegistrationMisalignmentLib.config import CLASS_NAMES  # noqa: E402
from RegistrationMisalignmentLib.metrics import cohen_kappa, f1_per_class  # noqa: E402

LSTM = "regmis_lstm_631"
SCORES = ("mean F1 %", "kappa", "cw")


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


def scores(true: np.ndarray, predicted: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(resamples, 3): mean F1 %, kappa and cw of each row of ``weights`` (resamples, rows: how often a row is drawn)."""
    flat = true * 3 + predicted
    out = np.empty((len(weights), 3))
    for i, w in enumerate(weights):
        confusion = np.bincount(flat, weights=w, minlength=9).reshape(3, 3)
        f1 = f1_per_class(confusion)
        out[i] = 100 * np.nanmean(f1), cohen_kappa(confusion), confusion[0, 2] + confusion[2, 0]
    return out


def draw_weights(baseline: Classed, rows: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples + 1, rows.sum()): the first row all ones (the measured scores), then bootstrap draws of the
    landmarks of each case, every setting's row of a drawn landmark counted as often as it is drawn."""
    weights = np.ones((resamples + 1, int(rows.sum())))
    case, label = baseline.case[rows], baseline.label[rows]
    for name in np.unique(case):
        in_case = case == name
        labels, position = np.unique(label[in_case], return_inverse=True)
        counts = rng.multinomial(len(labels), np.full(len(labels), 1 / len(labels)), size=resamples)
        weights[1:, np.nonzero(in_case)[0]] = counts[:, position]
    return weights


def compare(baseline: Classed, candidate: Classed, resamples: int, seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Per scope (all settings, then each setting): (scope, baseline scores, candidate scores), each
    (resamples + 1, 3), the first row the measured one.

    Raises ``ValueError`` when the two studies did not class the same landmarks with the same truth."""
    for field in ("case", "setting", "label", "true"):
        if not np.array_equal(getattr(baseline, field), getattr(candidate, field)):
            raise ValueError(f"the studies differ in their landmarks' {field}: compare studies of the same cases, "
                             "settings and landmarks (regmis benchmark with the same --cases, --landmarks, --settings)")
    rng = np.random.default_rng(seed)
    scopes = [("all settings", np.ones(len(baseline.true), dtype=bool))]
    present = set(baseline.setting)
    order = [s for s in ELASTIX_SETTINGS if s in present] + sorted(present - set(ELASTIX_SETTINGS))
    scopes += [(s, baseline.setting == s) for s in order]
    out = []
    for scope, rows in scopes:
        weights = draw_weights(baseline, rows, resamples, rng)
        out.append((scope, scores(baseline.true[rows], baseline.predicted[rows], weights),
                    scores(candidate.true[rows], candidate.predicted[rows], weights)))
    return out


def report(baseline: Path, candidate: Path, method: str, resamples: int, seed: int) -> str:
    base, cand = read_classes(baseline, method), read_classes(candidate, method)
    cases = ", ".join(np.unique(base.case))
    lines = [f"# {candidate.name} against {baseline.name}: paired bootstrap on the protocol's landmarks", "",
             f"`python benchmarks/compare_protocols.py {baseline} {candidate} --method {method} --resamples {resamples} "
             f"--seed {seed}`", "",
             f"{len(np.unique(base.label))} landmarks x {len(np.unique(base.setting))} settings in {len(np.unique(base.case))} "
             f"case(s) ({cases}). Difference = candidate - baseline (cw: fewer is better); 95 % percentile interval "
             f"over {resamples} paired draws of the landmarks within each case; 'better / worse in' = share of draws "
             "where the candidate is better / worse. The interval covers the choice of landmarks, not of scans or breathing fields.", "",
             "| scope | N | " + " | ".join(f"{s} base / cand | diff [95 %] | better / worse in" for s in SCORES) + " |",
             "|---|---|" + "---|---|---|" * len(SCORES)]
    for scope, b, c in compare(base, cand, resamples, seed):
        cells = []
        for k, name in enumerate(SCORES):
            diff = c[1:, k] - b[1:, k]
            lo, hi = np.nanpercentile(diff, [2.5, 97.5])
            better, worse = np.mean(-diff > 0 if name == "cw" else diff > 0), np.mean(diff > 0 if name == "cw" else diff < 0)
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
