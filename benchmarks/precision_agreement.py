"""Measures bf16 against float32 prediction on real chest CT: label agreement, class shares, time (issue 21).

Each case is a region of a real whole chest CT from ../shared/data, deformed as a whole by a seeded
respiratory DVF (``demo.make_demo_pair``), predicted by the shipped default model twice on the CPU:
precision "auto" (bf16 autocast where the CPU computes bf16 natively) and "float32". Reports, over the
body's voxels, the share of equal labels, each class's share under both, the largest probability
difference and both times. Writes JSON + Markdown to --out. Pause other work on the machine first.

    python benchmarks/precision_agreement.py --threads 2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from RegistrationMisalignmentLib.config import CLASS_NAMES
from RegistrationMisalignmentLib.demo import DEMO_REGION, DEMO_SCAN, make_demo_pair
from RegistrationMisalignmentLib.inference import cpu_has_native_bf16, predict
from RegistrationMisalignmentLib.weights import load_model

CASES = (
    (DEMO_SCAN, DEMO_REGION, 987_654),
    ("lidc_0001_chest_ct.nii.gz", ((150, 278), (60, 220), (40, 200)), 987_655),
)
"""(scan, (z, y, x) region of its 1 mm grid, DVF seed): POPI's right lower lung (the demo's, held out of all
training) and LIDC-IDRI-0001's right lung base."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model()
    rows = []
    for scan, region, seed in CASES:
        fixed, moving, _, description = make_demo_pair(seed=seed, scan_name=scan, region_zyx=region)
        runs = {p: predict(fixed, moving, model, device="cpu", precision=p, with_probabilities=True)
                for p in ("float32", "auto")}
        labels = {p: sitk.GetArrayFromImage(r.labelmap) for p, r in runs.items()}
        body = labels["float32"] > 0
        shares = {p: (np.bincount(l[body], minlength=4)[1:] / body.sum()).tolist() for p, l in labels.items()}
        probs = {p: sitk.GetArrayFromImage(r.probabilities)[body] for p, r in runs.items()}
        rows.append({"case": description, "scan": scan, "region_zyx": region, "seed": seed,
                     "voxels": int(labels["float32"].size), "body_voxels": int(body.sum()),
                     "label_agreement": float((labels["auto"][body] == labels["float32"][body]).mean()),
                     "class_shares": shares,
                     "max_share_difference_points": 100 * float(np.abs(np.subtract(*shares.values())).max()),
                     "max_probability_difference": float(np.abs(probs["auto"] - probs["float32"]).max()),
                     "seconds": {p: r.seconds for p, r in runs.items()},
                     "tiles": {p: list(r.tiles) for p, r in runs.items()}})
        print(json.dumps(rows[-1]), flush=True)
    result = {"command": "python benchmarks/precision_agreement.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(),
              "model": model.name, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision_agreement_cpu.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    lines = ["# bf16 against float32 on the CPU, real chest CT", "", f"Command: `{result['command']}`  ",
             f"torch {result['torch']}, {result['threads']} threads, native bf16: {result['native_bf16']}, model "
             f"{result['model']}. Over the body's voxels of each case; precision auto = bf16 autocast here.", "",
             "| case | body voxels | equal labels | class shares float32 (c / p / w) | class shares bf16 | "
             "max share diff (points) | max prob diff | s float32 | s bf16 | speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v: " / ".join(f"{100 * x:.2f}" for x in v)  # noqa: E731
        lines.append(f"| {r['case']} | {r['body_voxels']:,} | {100 * r['label_agreement']:.2f} % | "
                     f"{fmt(r['class_shares']['float32'])} | {fmt(r['class_shares']['auto'])} | "
                     f"{r['max_share_difference_points']:.2f} | {r['max_probability_difference']:.3f} | "
                     f"{r['seconds']['float32']:.1f} | {r['seconds']['auto']:.1f} | "
                     f"{r['seconds']['float32'] / r['seconds']['auto']:.2f}x |")
    lines += ["", f"Classes: {', '.join(CLASS_NAMES)}."]
    (out / "precision_agreement_cpu.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
