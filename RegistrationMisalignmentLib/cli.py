"""``regmis``: predict, evaluate, qa, demo, benchmark and info from the command line.

Exit codes: 0 success, 2 bad input (the message says which input and what to do), 1 internal error
(set REGMIS_DEBUG=1 to see its traceback).
The flag names of ``predict`` are an interface: scripts and the benchmarks call them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from RegistrationMisalignmentLib.config import PRECISIONS
from RegistrationMisalignmentLib.errors import InputError, PredictionCancelled
from RegistrationMisalignmentLib.outputs import Output, check_outputs

DECODER_CHOICES = ("lstm", "multiscale", "singlescale", "regnet-t")
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def say(message: str) -> None:
    """A console line on stderr that never shares a line with a progress bar (tqdm clears and redraws it)."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


@contextmanager
def progress_bar(description: str = "") -> Iterator[Callable[[float, str], None]]:
    """A tqdm bar driven by the Lib's (fraction, message) progress callback, closed on the way out."""
    from tqdm import tqdm

    bar = tqdm(total=1000, desc=description or None, file=sys.stderr,
               bar_format="{desc}{percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")

    def update(fraction: float, message: str) -> None:
        bar.n = int(1000 * fraction)
        bar.set_postfix_str(message)

    try:
        yield update
    finally:
        bar.close()


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return value


def tile_size(text: str) -> int:
    value = positive_int(text)
    if value % 16:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 16 (e.g. {max(16, value // 16 * 16)} or "
                                         f"{(value // 16 + 1) * 16})")
    return value


def hu_offset(text: str) -> float | tuple[float, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(np.isfinite(values)):
        raise argparse.ArgumentTypeError(f"{text!r} is not one number or two separated by a comma (fixed,moving)")
    return values[0] if len(values) == 1 else (values[0], values[1])


def _model_for(args: argparse.Namespace):
    from RegistrationMisalignmentLib.weights import available_models, load_model

    if args.model:
        return load_model(args.model)
    if args.decoder:
        for path in available_models():
            model = load_model(path)
            if model.decoder == args.decoder:
                return model
        raise InputError(f"no shipped model has decoder {args.decoder!r}; shipped: "
                         f"{', '.join(p.stem for p in available_models()) or 'none'} (or pass --model PATH)")
    return load_model()


def cmd_predict(args: argparse.Namespace) -> int:
    from RegistrationMisalignmentLib.inference import predict
    from RegistrationMisalignmentLib.io import read_image, write_image

    outputs = [Output("--out", args.out, "image"), Output("--probabilities", args.probabilities, "image"),
               Output("--confidence", args.confidence, "image"), Output("--entropy", args.entropy, "image")]
    check_outputs(outputs, inputs=[args.fixed, args.moving, args.mask, args.model])
    model = _model_for(args)
    fixed, moving = _read_pair(args)
    check_grid_outputs(fixed, outputs)
    mask = read_image(args.mask, "mask", finite=False) if args.mask else None
    with progress_bar(model.name) as update:
        prediction = predict(fixed, moving, model, mask=mask, device=args.device,
                             with_probabilities=bool(args.probabilities or args.confidence or args.entropy),
                             progress=update,
                             log=lambda m: say(f"note: {m}"), tile_size=args.tile_size, hu_offset=args.hu_offset,
                             body_only=not args.no_body_mask, precision=args.precision)
    out = write_image(prediction.labelmap, args.out, "labelmap")
    if args.probabilities:
        write_image(prediction.probabilities, args.probabilities, "probabilities")
    if args.confidence or args.entropy:
        from RegistrationMisalignmentLib.checks.confidence import confidence_maps

        confidence, entropy = confidence_maps(prediction.probabilities, prediction.labelmap)
        for path, image, name in ((args.confidence, confidence, "confidence"), (args.entropy, entropy, "entropy")):
            if path:
                write_image(image, path, name)
    counts = np.bincount(np.asarray(_array(prediction.labelmap)).ravel(), minlength=4)[1:]
    total = max(int(counts.sum()), 1)
    shares = ", ".join(f"{n} {100 * c / total:.1f} %" for n, c in zip(("correct", "poor", "wrong"), counts))
    computed, tiles = prediction.tiles
    skipped = f", {tiles - computed} of {tiles} tiles outside the {'mask' if mask else 'body'} skipped" if tiles else ""
    print(f"{out}: {shares} ({model.name}, {prediction.seconds:.1f} s{skipped})")
    return 0


def _array(image):
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(image)


def check_grid_outputs(fixed, outputs: list[Output]) -> None:
    """``io.check_nifti_grid`` for every image output given, before the work: they all lie on the fixed grid."""
    from RegistrationMisalignmentLib.io import check_nifti_grid

    for output in outputs:
        if output.path:
            check_nifti_grid(fixed, output.path, output.option)


def _read_pair(args: argparse.Namespace):
    """--fixed and --moving, each with its DICOM series choice."""
    from RegistrationMisalignmentLib.io import read_image

    def note(message: str) -> None:
        say(f"note: {message}")

    if Path(args.fixed).expanduser().resolve() == Path(args.moving).expanduser().resolve() \
            and args.fixed_series == args.moving_series:
        note(f"--fixed and --moving are the same image ({args.fixed}): aligned everywhere by construction")
    return (read_image(args.fixed, "fixed image", series=args.fixed_series, log=note),
            read_image(args.moving, "moving image", series=args.moving_series, log=note))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from RegistrationMisalignmentLib.evaluation import (
        coordinate_warning, evaluate_landmarks, none_inside_message, write_rows_csv,
    )
    from RegistrationMisalignmentLib.io import read_image
    from RegistrationMisalignmentLib.landmarks import read_landmark_pair, read_transform

    if not args.labelmap and not (args.fixed and args.moving):
        raise InputError("evaluate needs --labelmap, or --fixed and --moving to predict one")
    if args.labelmap and (args.fixed or args.moving):
        raise InputError("evaluate was given --labelmap and --fixed / --moving, which predict a labelmap when none "
                         "is given: drop them to score the labelmap, or drop --labelmap to predict one (the image "
                         "DIR-Lab indices refer to is --reference)")
    check_outputs([Output("--out-csv", args.out_csv, "csv"), Output("--out-json", args.out_json, "json")],
                  inputs=[args.labelmap, args.fixed, args.moving, args.fixed_landmarks, args.moving_landmarks,
                          args.transform, args.reference, args.moving_reference, args.model])
    if args.labelmap:
        from RegistrationMisalignmentLib.inference import FILE_NOTES_KEY, LABELMAP_NOTE

        labelmap = read_image(args.labelmap, "labelmap")
        notes = labelmap.GetMetaData(FILE_NOTES_KEY) if labelmap.HasMetaDataKey(FILE_NOTES_KEY) else ""
        if not notes.startswith(LABELMAP_NOTE.split(":")[0]):
            say(f"note: {args.labelmap} does not say it is a misalignment map (its file notes, NIfTI descrip, as "
                "regmis predict writes since 2026-12; Slicer's saved labelmaps do not): scoring it as one (1 correct, "
                "2 poor, 3 wrong); make sure it is not a segmentation")
    else:
        from RegistrationMisalignmentLib.inference import predict

        model = _model_for(args)
        fixed, moving = _read_pair(args)
        with progress_bar(model.name) as update:
            labelmap = predict(fixed, moving, model, device=args.device, progress=update,
                               hu_offset=args.hu_offset, log=lambda m: say(f"note: {m}")).labelmap
    reference = read_image(args.reference, "reference image") if args.reference else labelmap
    if not args.reference and Path(args.fixed_landmarks).suffix.lower() == ".txt":
        say(f"note: the DIR-Lab indices of {args.fixed_landmarks} are converted on the labelmap's grid (size "
            f"{reference.GetSize()}, spacing {tuple(round(v, 4) for v in reference.GetSpacing())} mm); if they were "
            "placed on another image, give it as --reference")
    moving_reference = read_image(args.moving_reference, "moving reference image") if args.moving_reference else None
    pairs = read_landmark_pair(args.fixed_landmarks, args.moving_landmarks, fixed_reference=reference,
                               moving_reference=moving_reference, moving_on_own_grid=bool(args.transform))
    transform = read_transform(args.transform, log=lambda m: say(f"note: {m}")) if args.transform else None
    rows, report = evaluate_landmarks(labelmap, pairs.fixed, pairs.moving, transform)
    if rows and report.n == 0:
        raise InputError(f"no landmark to score: {none_inside_message(labelmap, pairs.fixed)}.")
    print(pairs.describe())
    print(report.format_table())
    if Path(args.fixed_landmarks).suffix.lower() == ".csv" and (warning := coordinate_warning(labelmap, pairs.fixed)):
        say(f"warning: {warning}")
    if args.out_csv:
        print(f"wrote {write_rows_csv(rows, args.out_csv)}")
    if args.out_json:
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out_json}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from RegistrationMisalignmentLib.weights import available_models, load_model, models_dir

    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"CUDA {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}")
    print(f"models in {models_dir()}: {', '.join(p.stem for p in available_models()) or 'none'}")
    if args.model or available_models():
        model = load_model(args.model) if args.model else load_model()
        card = {k: v for k, v in model.card.items() if k not in ("config", "training")}
        print(json.dumps(card, indent=2))
        training = model.card.get("training", {})
        print("trained on:", ", ".join(training.get("images", [])) or "n/a")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from RegistrationMisalignmentLib.demo import run_demo

    check_outputs([Output("--out", args.out, "folder")])
    run_demo(args.out, device=args.device, progress_bar=progress_bar, log=say)
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from RegistrationMisalignmentLib.benchmark.study import BenchmarkOptions, run_benchmark
    from RegistrationMisalignmentLib.benchmark.elastix import parse_settings

    check_outputs([Output("--out", args.out, "folder")], inputs=[args.dirlab, args.pairs])
    study = next(s for s in ("phantom", "chest_ct", "dirlab", "pairs") if getattr(args, s))
    options = BenchmarkOptions(study=study.replace("_", "-"), source=args.dirlab or args.pairs, cases=args.cases,
                               landmarks=args.landmarks, settings=parse_settings(args.settings), tiny=args.tiny,
                               out=args.out, device=args.device, models_dir=args.models_dir, threads=args.threads,
                               resume=args.resume, tile_size=args.tile_size)
    try:
        report = run_benchmark(options, log=say)
    except KeyboardInterrupt:
        print(f"regmis: interrupted; the cases finished so far are in {Path(args.out) / 'report.md'}: run the same "
              "command with --resume to continue", file=sys.stderr)
        return 130
    for method, scores in report["results"].items():
        mean_f1 = scores["all"]["mean_f1"]
        print(f"{method}: mean F1 {'n/a' if mean_f1 is None else f'{100 * mean_f1:.1f} %'} over all settings, "
              f"cw {scores['all']['cw']}, N {scores['all']['n']}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regmis", description="Voxel-wise registration misalignment (correct / "
                                     "poor / wrong) for a fixed CT and a registered moving CT.")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="model .pt file or shipped model name (default: the shipped LSTM 6-3-1)")
        p.add_argument("--decoder", choices=DECODER_CHOICES, help="pick the shipped model with this decoder")
        device_flag(p)

    def input_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--fixed-series", metavar="UID", help="Series Instance UID to read when --fixed is a DICOM "
                       "folder holding several series")
        p.add_argument("--moving-series", metavar="UID", help="the same for --moving")
        p.add_argument("--hu-offset", type=hu_offset, default=0.0, metavar="OFFSET[,OFFSET]",
                       help="add this to the voxel values to get HU: one number for both images, or fixed,moving "
                       "(e.g. -1024 for a CT stored as HU + 1024 without its rescale intercept; write "
                       "--hu-offset=-1024,0 when the first is negative)")

    def device_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="auto (CUDA when present), cpu or cuda")

    p = sub.add_parser("predict", help="predict the misalignment labelmap of a registered pair")
    p.add_argument("--fixed", required=True, help="fixed image (any SimpleITK format or DICOM folder)")
    p.add_argument("--moving", required=True, help="moving image after registration (deformed moving)")
    p.add_argument("--out", required=True, help="output labelmap (0 outside, 1 correct, 2 poor, 3 wrong)")
    p.add_argument("--probabilities", help="also write the 3-class probabilities (vector image)")
    p.add_argument("--confidence", help="also write the map's confidence: the largest class probability (1/3..1; 0 "
                   "where the map is 0)")
    p.add_argument("--entropy", help="also write the entropy of the class probabilities in bits (0..1.585)")
    p.add_argument("--mask", help="restrict the output to this fixed-image mask (e.g. lungs; default: the body)")
    p.add_argument("--no-body-mask", action="store_true",
                   help="without --mask, predict the whole image, air and table included (default: the body only)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 where the GPU or CPU computes it natively (2-3x faster on the CPU, the same "
                   "labels within 1 %%); float32: always float32")
    input_flags(p)
    p.add_argument("--tile-size", type=tile_size, help="1 mm voxels per tile side, a multiple of 16 (default: the model's, 128 on CPU, 192 on CUDA; "
                   "smaller needs less memory, larger re-reads less context)")
    model_flags(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="score a labelmap at landmarks: per-landmark CSV + metrics JSON")
    p.add_argument("--labelmap", help="labelmap from `regmis predict` (or give --fixed and --moving)")
    p.add_argument("--fixed")
    p.add_argument("--moving")
    p.add_argument("--fixed-landmarks", required=True, help=".mrk.json, .fcsv, DIR-Lab .txt or .csv (LPS)")
    p.add_argument("--moving-landmarks", required=True)
    p.add_argument("--transform", help="registration transform (fixed -> moving): an ITK transform file "
                   "(.tfm/.h5/.txt), a displacement field image, or elastix's TransformParameters.N.txt (needs "
                   "itk-elastix); "
                   "omit when the moving landmarks are already in the deformed space")
    p.add_argument("--reference", help="image whose geometry converts DIR-Lab voxel indices (default: the labelmap)")
    p.add_argument("--moving-reference", help="the moving image, whose grid converts the moving DIR-Lab voxel indices "
                   "(required for index files with --transform; default without it: --reference)")
    input_flags(p)
    p.add_argument("--out-csv")
    p.add_argument("--out-json")
    model_flags(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="known deformation of the held-out real CT, predicted and scored")
    p.add_argument("--out", default="regmis_demo", help="output folder (created when missing)")
    device_flag(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("benchmark", help="the paper's evaluation protocol: elastix settings x methods at landmarks")
    study = p.add_mutually_exclusive_group(required=True)
    study.add_argument("--phantom", action="store_true", help="chest phantoms deformed by known respiratory DVFs")
    study.add_argument("--chest-ct", "--real-ct", dest="chest_ct", action="store_true",
                       help="the whole held-out chest CT (POPI phase 00, cut to its lungs' box) moved by physiological "
                       "breathing fields that slide at the lung surface, Forstner landmarks on distinct points of the "
                       "lungs (--real-ct: its former name)")
    study.add_argument("--dirlab", metavar="FOLDER", help="DIR-Lab 4DCT / COPDgene files (.img + landmark .txt)")
    study.add_argument("--pairs", metavar="CSV",
                       help="table case,fixed,moving,fixed_landmarks,moving_landmarks (paths relative to it)")
    p.add_argument("--cases", type=positive_int, help="synthetic: number of cases (phantom 10, chest CT 2); external: "
                   "the first N")
    p.add_argument("--landmarks", type=positive_int, default=300, help="lung landmarks per synthetic case (default 300)")
    p.add_argument("--settings", default="affine,bspline20,bspline100,bspline500,bspline2000",
                   help="comma-separated registration settings (default: all five)")
    p.add_argument("--tiny", action="store_true", help="CI size: synthetic images 32 x 32 x 32 mm (chest CT: a box "
                   "in the right lung), elastix "
                   "iterations / 10 and at most 512 samples; the numbers then mean nothing")
    p.add_argument("--out", default="regmis_benchmark", help="output folder (report.md, report.json, CSV, PNGs)")
    device_flag(p)
    p.add_argument("--models-dir", help="folder of models to compare (default: the shipped models)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch and elastix (default: all cores)")
    p.add_argument("--tile-size", type=tile_size, help="predict's tile side in 1 mm voxels, a multiple of 16 (default: "
                   "the model's); the labels are the same. Larger tiles re-read less context but hold more memory; on 2 "
                   "CPU cores 192 was no faster than the default 128 on a whole chest CT")
    p.add_argument("--resume", action="store_true", help="continue the unfinished (or extend the finished) study in "
                   "--out: its finished cases are read back, not recomputed")
    p.set_defaults(func=cmd_benchmark)

    from RegistrationMisalignmentLib.checks.command import add_qa_parser

    add_qa_parser(sub, model_flags, input_flags, positive_int, tile_size)

    p = sub.add_parser("info", help="model card and device")
    p.add_argument("--model")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"regmis: error: {exc}", file=sys.stderr)
        return 2
    except PredictionCancelled:
        print("regmis: cancelled, nothing written", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("regmis: interrupted, nothing written", file=sys.stderr)
        return 130
    except Exception as exc:  # the promise is exit code 1 with a readable line, not a traceback
        if os.environ.get("REGMIS_DEBUG"):
            raise
        print(f"regmis: internal error: {type(exc).__name__}: {exc} (please report it with the command line)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
