"""Where the registration judge's misaligned voxels lie, per kind of registration, and whether the images show them.

    python benchmarks/judge_wrong_where.py --out benchmarks/results/training/judge_wrong_where.md

Why: after a B-spline registration no model the canonical run made calls any of the judge's "wrong" voxels (6 mm
or more) wrong (judge_group_confusion.md: F1 wrong 0, 168 k of 238 k called correct), while after an affine one
they find half of them. A misalignment the two images do not show (a shift along a vessel or inside uniform
tissue) cannot be seen by any image-based predictor; one they show can be learnt. For each group's blocks
(``trainer.config.SETTING_GROUPS``) and each true class this gives, over the blocks' scored voxels (the lungs):

- the image difference: mean |fixed - moving| over a 5 mm cube in HU (the images as the network sees them:
  clipped to the HU window), the evidence a misalignment leaves in the pair;
- the texture: the fixed image's standard deviation over the same cube in HU (what a shift can be seen against);
- the distance to the lungs' edge in mm (the sliding wall, the diaphragm) found within the block's label cube:
  an upper bound, infinite where the cube holds no edge;
- the share the shipped model calls each class.

The inputs are the judge's scale-1 blocks as the network sees them (1 mm grid, HU window). About 4 minutes
with the canonical run paused (beside it, two judges loaded can outgrow a 24 GB machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt, uniform_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.publish import publish  # noqa: E402
from RegistrationMisalignmentLib.config import CLASS_NAMES  # noqa: E402
from RegistrationMisalignmentLib.inference import NETWORK_MEMORY_FORMAT  # noqa: E402
from RegistrationMisalignmentLib.weights import load_model  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.train import Trainer  # noqa: E402

CUBE_MM = 5
"""Side of the cube the image difference and the texture are averaged over (1 mm voxels)."""
EDGE_BANDS_MM = ((0, 5), (5, 15), (15, float("inf")))
"""Bands of distance to the lungs' edge the last table splits the voxels by."""


def block_measures(block: np.ndarray, scored: np.ndarray, margin: int, hu_per_unit: float) -> dict[str, np.ndarray]:
    """``block`` (2, S, S, S): fixed and moving on the 1 mm grid, normalised; ``scored`` (T, T, T) bool, the
    labels' voxels, ``margin`` voxels in from the block's faces. Returns per scored voxel its image difference and
    texture (HU) and its distance to the edge of the scored region inside the label cube (mm; inf without one: the
    cube's faces are not an edge)."""
    fixed, moving = (c.astype(np.float64) * hu_per_unit for c in block)
    inner = (slice(margin, margin + scored.shape[0]),) * 3
    difference = uniform_filter(np.abs(fixed - moving), CUBE_MM)[inner]
    mean = uniform_filter(fixed, CUBE_MM)
    texture = np.sqrt(np.maximum(uniform_filter(fixed**2, CUBE_MM) - mean**2, 0))[inner]
    if scored.all():  # no background: distance_transform_edt has nothing to measure to
        edge = np.full(scored.shape, np.inf)
    else:
        edge = distance_transform_edt(np.pad(scored, 1, constant_values=True))[1:-1, 1:-1, 1:-1]
    return {"difference": difference[scored], "texture": texture[scored], "edge_mm": edge[scored]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model whose calls are shown (default: shipped)")
    parser.add_argument("--config", default="trainer/configs/canonical.toml")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    trainer = Trainer(TrainConfig.from_toml(args.config))
    batch = trainer.val_batch
    model = load_model(args.model, device=trainer.device)
    with torch.no_grad():
        _, predicted = trainer._held_out_classes(model.module.to(memory_format=NETWORK_MEMORY_FORMAT).probabilities)
    scored = batch.weights.numpy() > 0
    config = trainer.config
    margin, hu_per_unit = config.encoder_context + config.decoder_margin, (config.hu_window[1] - config.hu_window[0]) / 2
    measures = [block_measures(batch.inputs[1][i].numpy(), scored[i], margin, hu_per_unit) for i in range(len(scored))]
    values = {k: np.concatenate([m[k] for m in measures]) for k in measures[0]}
    truth = batch.final_labels.numpy()[scored]
    groups = np.full(len(truth), "", dtype=object)
    for group, mask in trainer._held_out_groups().items():
        groups[mask] = group
    no_edge = sum(bool(s.all()) for s in scored)
    lines = [f"# Where the judge's misaligned voxels lie: `python benchmarks/judge_wrong_where.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"Judge {trainer.val_judge} ({trainer.judge.blocks}); calls of {model.path.parent.name}/{model.path.name} "
             f"({model.card['sha256'][:12]}). Per group and true class, over the scored (lung) voxels: median and "
             f"quartiles of the image difference |fixed - moving| and of the fixed image's texture (std), both over a "
             f"{CUBE_MM} mm cube in HU; median distance to the lungs' edge within the block's label cube (an upper bound; "
             f"{no_edge} of {len(scored)} cubes hold no edge, their voxels counted as beyond every band); the share the "
             "model calls correct / poor / wrong.", "",
             "| group | true class | voxels | difference median [q1, q3] | texture median [q1, q3] | edge mm | "
             "called c / p / w % |", "|---|---|---|---|---|---|---|"]

    def quartiles(v: np.ndarray) -> str:
        q1, q2, q3 = np.percentile(v, [25, 50, 75])
        return f"{q2:.0f} [{q1:.0f}, {q3:.0f}]"

    for group in dict.fromkeys(groups):
        for k, name in enumerate(CLASS_NAMES):
            rows = (groups == group) & (truth == k)
            if not rows.any():
                continue
            called = np.bincount(predicted[rows], minlength=3) / rows.sum()
            lines.append(f"| {group} | {name} | {int(rows.sum()):,} | {quartiles(values['difference'][rows])} | "
                         f"{quartiles(values['texture'][rows])} | {np.median(values['edge_mm'][rows]):.0f} | "
                         + " / ".join(f"{100 * c:.1f}" for c in called) + " |")
    lines += ["", "Wrong voxels by their image difference (quartiles of the group's correct voxels' difference as "
              "the bins): the share in each bin, and of those the share the model calls wrong.", "",
              "| group | difference < q1 of correct | q1-q2 | q2-q3 | > q3 |", "|---|---|---|---|---|"]
    for group in dict.fromkeys(groups):
        correct = (groups == group) & (truth == 0)
        wrong = (groups == group) & (truth == 2)
        if not (wrong.any() and correct.any()):
            continue
        edges = np.percentile(values["difference"][correct], [25, 50, 75])
        bins = np.digitize(values["difference"][wrong], edges)
        cells = []
        for b in range(4):
            inside = bins == b
            share_wrong = (predicted[wrong][inside] == 2).mean() if inside.any() else float("nan")
            cells.append(f"{100 * inside.mean():.1f} % (called wrong {100 * share_wrong:.1f} %)")
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    lines += ["", "The same by distance to the lungs' edge (a sliding wall moves along itself, which a shift leaves "
              "unseen): per group and band, each true class's median image difference, and the share the model calls "
              "wrong.", "", "| group | edge band | voxels c / p / w | difference median c / p / w | called wrong "
              "c / p / w % |", "|---|---|---|---|---|"]
    for group in dict.fromkeys(groups):
        for low, high in EDGE_BANDS_MM:
            band = (groups == group) & (values["edge_mm"] >= low) & (values["edge_mm"] < high)
            rows = [band & (truth == k) for k in range(len(CLASS_NAMES))]
            lines.append(f"| {group} | {f'{low}-{high}' if np.isfinite(high) else f'>= {low}'} mm | "
                         + " / ".join(f"{int(r.sum()):,}" for r in rows) + " | "
                         + " / ".join(f"{np.median(values['difference'][r]):.0f}" if r.any() else "-" for r in rows)
                         + " | " + " / ".join(f"{100 * (predicted[r] == 2).mean():.1f}" if r.any() else "-"
                                              for r in rows) + " |")
    lines += ["", f"Wall time {time.perf_counter() - started:.0f} s."]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
