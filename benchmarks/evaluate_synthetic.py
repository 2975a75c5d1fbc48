"""Measures every shipped model voxel-wise on held-out synthetic pairs: real CT regions training never saw.

Pairs: the validation slab of every real scan in ../shared/data (the lowest-z 25 % of slices that
``trainer.train.split_holdout`` keeps out of training) deformed by each DVF kind, plus phantoms of
seeds far from training, with seeds disjoint from training (7_000_000+). Truth: the class of |DVF|
at every voxel inside the body (HU > -950). Each shipped model predicts the whole pair through the
public ``predict``; scores are voxel-wise. A model is not scored on a pair whose slices its card's
``training.images`` lists (the canonical run holds out POPI phase 00 whole and trains on every slice of
these crops): its row then counts only the pairs held out for it. Writes JSON + Markdown to --out.

    python benchmarks/evaluate_synthetic.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
from RegistrationMisalignmentLib.inference import predict
from RegistrationMisalignmentLib.metrics import evaluate_classes
from RegistrationMisalignmentLib.weights import available_models, load_model
from trainer.config import DEFAULT_SHARED_DATA
from RegistrationMisalignmentLib.synthetic.deform import deform_pair
from RegistrationMisalignmentLib.synthetic.images import TrainingImage, phantom_images
from trainer.data import load_images
from trainer.train import split_holdout

SEED = 7_000_000
BODY_HU = -950.0
KINDS = ("single", "mixed", "respiratory", "identity")


def held_out_images(max_slices: int, only: list[str]) -> list[TrainingImage]:
    """Validation slabs of the shared real CT (names containing one of ``only``) and a phantom."""
    images: list[TrainingImage] = []
    if DEFAULT_SHARED_DATA.exists():
        _, val = split_holdout(load_images(DEFAULT_SHARED_DATA, DEFAULT_CONFIG), 0.25)
        images += [v.crop_z(0, max_slices) if v.hu.shape[0] > max_slices else v for v in val
                   if v.hu.shape[0] >= 24 and any(o in v.name for o in only)]
    if "phantom" in only:
        images += phantom_images(1, (160.0, 128.0, 64.0), SEED, DEFAULT_CONFIG)
    return images


def slices_of(name: str) -> tuple[str, int, float]:
    """(scan, first, stop) of an image name such as ``chest.nii.gz[z0:62]`` (``crop_z``'s names, nested
    crops composed); a whole scan is (scan, 0, inf)."""
    scan = re.sub(r"(\[z\d+:\d+\])+$", "", name)
    first, stop = 0, float("inf")
    for start, end in re.findall(r"\[z(\d+):(\d+)\]", name[len(scan):]):
        first, stop = first + int(start), min(stop, first + int(end))
    return scan, first, stop


def trained_on(card: dict, image_name: str) -> bool:
    """Whether a model card's training images hold any slice of ``image_name`` (same scan, overlapping z)."""
    scan, first, stop = slices_of(image_name)
    for entry in card.get("training", {}).get("images", []):
        other, other_first, other_stop = slices_of(entry)
        if other == scan and other_first < stop and first < other_stop:
            return True
    return False


def to_image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((DEFAULT_CONFIG.spacing_mm,) * 3)
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--max-slices", type=int, default=64, help="cap on the slab thickness (1 mm slices)")
    parser.add_argument("--only", default="chest,phantom",
                        help="images to use, by name: chest, abdomen, phantom (the abdomen slab is 7 M voxels)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", type=Path,
                        help="model files (.pt with the card beside it) to compare; default the shipped models")
    parser.add_argument("--update-cards", action="store_true",
                        help="record the aggregate scores in each model's card (metrics.heldout_synthetic)")
    args = parser.parse_args(argv)
    models = [load_model(p) for p in (args.models or available_models())]
    names = [m.path.stem for m in models]  # file stems, so two candidates with one card name stay apart
    if len(set(names)) < len(names):
        raise SystemExit(f"--models: two files share a name ({names}); rename one")
    images = held_out_images(args.max_slices, args.only.split(","))
    per_model: dict[str, dict[str, list[np.ndarray]]] = {n: {"true": [], "pred": []} for n in names}
    cases, seconds = [], {n: 0.0 for n in names}
    for i, image in enumerate(images):
        for j, kind in enumerate(args.kinds.split(",")):
            seed = SEED + 100 * i + j
            moving, dvf = deform_pair(torch.from_numpy(image.hu), kind, (1.0, 1.0, 1.0), torch.Generator().manual_seed(seed))
            fixed_img, moving_img = to_image(image.hu), to_image(moving.numpy())
            body = image.hu > BODY_HU
            truth = DEFAULT_CONFIG.classify_mm(torch.linalg.vector_norm(dvf, dim=0).numpy())[body]
            case = {"image": image.name, "kind": kind, "seed": seed, "voxels": int(body.sum()),
                    "truth_fractions": (np.bincount(truth, minlength=3) / max(len(truth), 1)).round(4).tolist()}
            for model, name in zip(models, names):
                if trained_on(model.card, image.name):
                    case[name] = None
                    continue
                start = time.perf_counter()
                labels = sitk.GetArrayFromImage(predict(fixed_img, moving_img, model, device=args.device,
                                                        body_only=False).labelmap)  # scored on its own body (HU > -950)
                seconds[name] += time.perf_counter() - start
                pred = labels.astype(np.int64)[body] - 1
                per_model[name]["true"].append(truth)
                per_model[name]["pred"].append(pred)
                case[name] = round(evaluate_classes(truth, pred).mean_f1, 4)
            cases.append(case)
            print(json.dumps(case), file=sys.stderr)
    results = {"command": "python benchmarks/evaluate_synthetic.py " + " ".join(argv or sys.argv[1:]),
               "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
               "cases": cases, "models": {}}
    for model, name in zip(models, names):
        if not per_model[name]["true"]:
            print(f"{name}: trained on every pair's image; not scored", file=sys.stderr)
            continue
        report = evaluate_classes(np.concatenate(per_model[name]["true"]), np.concatenate(per_model[name]["pred"]))
        results["models"][name] = {"decoder": model.decoder, "pairs": len(per_model[name]["true"]),
                                   "seconds": round(seconds[name], 1), **report.to_dict()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "synthetic_heldout.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    lines = ["# Held-out synthetic pairs, voxel-wise (inside the body)", "",
             "Each row counts only the pairs held out for its model (`pairs`): rows with other counts cover other pairs.", "",
             f"Command: `{results['command']}`  ", f"Machine: {results['machine']}", "",
             "| model | decoder | pairs | accuracy | F1c | F1p | F1w | mean F1 | kappa | cw | N | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        f1 = ["n/a" if v is None else f"{100 * v:.1f}" for v in r["f1"]]
        lines.append(f"| {name} | {r['decoder']} | {r['pairs']} | {100 * r['accuracy']:.1f} | {' | '.join(f1)} | "
                     f"{100 * r['mean_f1']:.1f} | {r['kappa']:.3f} | {r['cw']} | {r['n']} | {r['seconds']} |")
    lines += ["", "Per case (mean F1; \"trained on\": the model's card lists slices of that image, so it is not scored there):",
              "", "| image | DVF | truth c/p/w | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for c in cases:
        lines.append(f"| {c['image']} | {c['kind']} | {'/'.join(f'{100 * v:.0f}' for v in c['truth_fractions'])} | "
                     + " | ".join("trained on" if c[n] is None else f"{100 * c[n]:.1f}" for n in names) + " |")
    (out / "synthetic_heldout.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if args.update_cards:
        for model, name in zip(models, names):
            card_path = model.path.with_suffix(".json")
            card = json.loads(card_path.read_text(encoding="utf-8"))  # the .pt and its sha256 are untouched
            if name not in results["models"]:  # trained on every pair: an earlier score would mislead
                if card["metrics"].pop("heldout_synthetic", None) is not None:
                    card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
                continue
            summary = {k: v for k, v in results["models"][name].items() if k != "confusion"}
            card["metrics"]["heldout_synthetic"] = {**summary, "command": results["command"],
                                                    "unit": "voxels inside the body"}
            card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
