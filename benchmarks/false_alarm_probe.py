"""Where on the whole-chest protocol does the model call truly correct landmarks poor or wrong?

    python benchmarks/false_alarm_probe.py --out benchmarks/results/training/false_alarm_probe.md

Why: after a B-spline registration the shipped model calls 7-20 % of the truly correct landmarks poor
or wrong, many of them with a residual under 1 mm (``prior_shift_probe.py``), where elastix-t calls none.
This rebuilds the protocol's case (the same held-out scan, breathing field and landmarks as
``regmis benchmark --chest-ct``) and compares, per setting, those false alarms with the truly correct
landmarks the model got right: how far the breathing field had moved them (the registration's task),
the field's Jacobian determinant there (the sponge model's density change), their depth inside the lung and
their height in the box. A difference tells which property of real registrations training lacks.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.publish import publish  # noqa: E402
from RegistrationMisalignmentLib.benchmark.cases import chest_case, load_chest_scan  # noqa: E402
from RegistrationMisalignmentLib.synthetic.deform import jacobian_determinant  # noqa: E402

SETTINGS = ("bspline20", "bspline100", "bspline500", "bspline2000")


def quartiles(values: np.ndarray) -> str:
    return " / ".join(f"{v:.2f}" for v in np.percentile(values, [25, 50, 75])) if len(values) else "–"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", type=Path, default=Path("benchmarks/results/protocol_chest_ct_stage2_e115"),
                        help="a whole-chest protocol study folder (landmarks.csv) made with 300 landmarks")
    parser.add_argument("--method", default="regmis_lstm_631")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    scan = load_chest_scan(300, tiny=False)
    case = chest_case(scan, 0, tiny=False)
    index = np.array([scan.fixed.TransformPhysicalPointToIndex(tuple(map(float, p)))[::-1]
                      for p in scan.landmarks.points_lps])
    dvf = np.asarray(case.truth.dvf)
    properties = {
        "breathing |u| mm": np.linalg.norm(dvf[(slice(None),) + tuple(index.T)], axis=0),
        "det J": jacobian_determinant(torch.from_numpy(dvf), scan.fixed.GetSpacing()).numpy()[tuple(index.T)],
        "depth in lung mm": ndimage.distance_transform_edt(scan.box.lung)[tuple(index.T)],
        "height in box (slice)": index[:, 0].astype(float),
    }
    with open(args.protocol / "landmarks.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f)  # the study's first case: the one rebuilt above
                if r["case"] == case.name and r["method"] == args.method and r["true_class"] == "correct"]
    lines = [f"# Where the false alarms are: `python benchmarks/false_alarm_probe.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"Case {case.name}, {len(index)} landmarks; {args.method} in `{args.protocol}`. Truly correct landmarks "
             "(residual < 3 mm) that the model called poor or wrong (false alarms) against those it called correct; "
             "quartiles 25 / 50 / 75 %:", "",
             "| setting | false alarms / truly correct | " + " | ".join(f"{p}: alarms | {p}: hits" for p in properties) + " |",
             "|---|---|" + "---|---|" * len(properties)]
    for setting in SETTINGS:
        chosen = [r for r in rows if r["setting"] == setting]
        alarms = np.array([int(r["label"]) - 1 for r in chosen if r["predicted_class"] != "correct"], dtype=int)
        hits = np.array([int(r["label"]) - 1 for r in chosen if r["predicted_class"] == "correct"], dtype=int)
        cells = [f"{quartiles(values[alarms])} | {quartiles(values[hits])}" for values in properties.values()]
        lines.append(f"| {setting} | {len(alarms)} / {len(chosen)} | " + " | ".join(cells) + " |")
    lung = scan.box.lung
    motion = np.linalg.norm(dvf, axis=0)
    per_slice = np.array([motion[k][lung[k]].mean() if lung[k].any() else 0.0 for k in range(lung.shape[0])])
    lungs = np.flatnonzero(lung.any(axis=(1, 2)))
    lines += ["", f"The box has {lung.shape[0]} slices (index 0 first in the file), lung on slices {lungs[0]}-{lungs[-1]}; "
              f"the breathing field moves the lung most on slice {int(per_slice.argmax())} (mean |u| "
              f"{per_slice.max():.1f} mm there, {per_slice[lungs].mean():.1f} mm over the lung's slices).", "",
              f"Wall time {time.perf_counter() - started:.0f} s."]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
