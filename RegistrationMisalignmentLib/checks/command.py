"""``regmis qa``: the learned map beside the classical registration checks, one summary table.

    regmis qa --fixed F --moving D [--transform T] [--inverse-transform Tinv] [--mask M | --no-body-mask]
              [--checks learned,confidence,jacobian,inverse-consistency,intensity,reregistration]
              [--fixed-landmarks f --moving-landmarks m] [--out-<map> PATH ...] [--out-json J] [--out-csv C]

The arguments and the command live here so that ``cli.py`` only registers them (``add_qa_parser``). Every
output path is checked before any image is read (``outputs.check_outputs``), and so is every choice that
cannot work (an output for a map no chosen check makes, a check without the input it needs): exit code 2
with a message naming the option and the fix, nothing written.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from RegistrationMisalignmentLib.errors import InputError

MAP_OUTPUTS: dict[str, str] = {
    "learned": "--out-labelmap", "confidence": "--out-confidence", "entropy": "--out-entropy",
    "jacobian": "--out-jacobian", "inverse_consistency": "--out-inverse-consistency", "intensity": "--out-intensity",
    "residual": "--out-residual", "reregistration": "--out-reregistration",
}
"""Map key -> the option that writes it."""


def jacobian_range(text: str) -> tuple[float, float]:
    from RegistrationMisalignmentLib.checks.jacobian import check_range

    try:
        low, high = (float(v) for v in text.split(","))
        return check_range((low, high))
    except (ValueError, InputError) as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH with 0 <= LOW < 1 < HIGH (e.g. 0.5,2)") from error


def add_qa_parser(sub, model_flags: Callable, input_flags: Callable, positive_int: Callable, tile_size: Callable) -> None:
    """Add the ``qa`` subcommand to ``regmis``'s subparsers (the flag helpers are ``cli.build_parser``'s)."""
    from RegistrationMisalignmentLib.checks.jacobian import PLAUSIBLE_RANGE
    from RegistrationMisalignmentLib.checks.maps import MAPS
    from RegistrationMisalignmentLib.checks.run import CHECKS

    p = sub.add_parser("qa", help="the learned map beside the classical checks (confidence, Jacobian, inverse "
                       "consistency, intensity difference, re-registration residual), one summary")
    p.add_argument("--fixed", required=True, help="fixed image (any SimpleITK format or DICOM folder)")
    p.add_argument("--moving", required=True, help="moving image after registration (deformed moving)")
    p.add_argument("--transform", help="the registration transform, fixed -> moving (ITK/Slicer .tfm/.h5/.txt or a "
                   "displacement field): the Jacobian, inverse consistency and the landmarks' TRE")
    p.add_argument("--inverse-transform", help="the registration of the other direction, moving -> fixed (run with "
                   "the images swapped): inverse consistency")
    p.add_argument("--mask", help="summarise (and predict) inside this fixed-image mask (default: the body)")
    p.add_argument("--no-body-mask", action="store_true", help="without --mask, use the whole image")
    p.add_argument("--checks", help=f"comma-separated subset of {','.join(CHECKS)} (default: learned, confidence, "
                   "intensity, and jacobian / inverse-consistency when the transforms are given)")
    p.add_argument("--jacobian-range", type=jacobian_range, default=PLAUSIBLE_RANGE, metavar="LOW,HIGH",
                   help=f"plausible Jacobian determinant (default {PLAUSIBLE_RANGE[0]:g},{PLAUSIBLE_RANGE[1]:g}); "
                   "det <= 0 is always folding")
    p.add_argument("--reregistration-iterations", type=positive_int, metavar="N",
                   help="elastix iterations per resolution of the re-registration (default: the parameter file's 500)")
    p.add_argument("--threads", type=positive_int, help="ITK threads of the re-registration (default: all cores)")
    p.add_argument("--fixed-landmarks", help="landmarks on the fixed image (.mrk.json, .fcsv, DIR-Lab .txt, .csv)")
    p.add_argument("--moving-landmarks", help="the corresponding moving landmarks (in the moving image's space with "
                   "--transform, else already in the registered space)")
    p.add_argument("--reference", help="image whose grid converts fixed DIR-Lab voxel indices (default: --fixed)")
    p.add_argument("--moving-reference", help="the moving image, whose grid converts moving DIR-Lab voxel indices")
    for key, flag in MAP_OUTPUTS.items():
        p.add_argument(flag, metavar="PATH", help=f"write the {MAPS[key].title} ({MAPS[key].unit})")
    p.add_argument("--out-json", help="the summary as JSON")
    p.add_argument("--out-csv", help="per landmark: TRE, true class and every map's value")
    p.add_argument("--tile-size", type=tile_size, help="the learned map's tile side in 1 mm voxels (see predict)")
    input_flags(p)
    model_flags(p)
    p.set_defaults(func=cmd_qa)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def cmd_qa(args: argparse.Namespace) -> int:
    from RegistrationMisalignmentLib.checks.maps import MAPS
    from RegistrationMisalignmentLib.checks.run import MAPS_OF, default_checks, parse_checks, run_checks
    from RegistrationMisalignmentLib.cli import _model_for, _read_pair, check_grid_outputs, progress_bar, say
    from RegistrationMisalignmentLib.io import read_image, write_image
    from RegistrationMisalignmentLib.landmarks import read_landmark_pair, read_transform
    from RegistrationMisalignmentLib.outputs import Output, check_outputs

    checks = parse_checks(args.checks) if args.checks else default_checks(bool(args.transform),
                                                                          bool(args.inverse_transform))
    outputs = [Output(flag, getattr(args, _dest(flag)), "image") for flag in MAP_OUTPUTS.values()]
    check_outputs([*outputs, Output("--out-json", args.out_json, "json"), Output("--out-csv", args.out_csv, "csv")],
                  inputs=[args.fixed, args.moving, args.transform, args.inverse_transform, args.mask,
                          args.fixed_landmarks, args.moving_landmarks, args.reference, args.moving_reference, args.model])
    produced = {key for check in checks for key in MAPS_OF[check]}
    for key, flag in MAP_OUTPUTS.items():
        if getattr(args, _dest(flag)) and key not in produced:
            source = next(c for c, keys in MAPS_OF.items() if key in keys)
            raise InputError(f"{flag}: the {MAPS[key].title} comes from the {source} check, which --checks leaves out "
                             f"({','.join(checks)}); add {source} to --checks or drop {flag}.")
    if bool(args.fixed_landmarks) != bool(args.moving_landmarks):
        raise InputError("give both --fixed-landmarks and --moving-landmarks, or neither.")
    if args.out_csv and not args.fixed_landmarks:
        raise InputError("--out-csv writes the landmark table; give --fixed-landmarks and --moving-landmarks.")

    def note(message: str) -> None:
        say(f"note: {message}")

    model = _model_for(args) if {"learned", "confidence"} & set(checks) else None
    fixed, moving = _read_pair(args)
    check_grid_outputs(fixed, outputs)
    mask = read_image(args.mask, "mask", finite=False) if args.mask else None
    transform = read_transform(args.transform, log=note) if args.transform else None
    inverse = read_transform(args.inverse_transform, log=note) if args.inverse_transform else None
    pairs = None
    if args.fixed_landmarks:
        reference = read_image(args.reference, "reference image") if args.reference else fixed
        moving_reference = read_image(args.moving_reference, "moving reference image") if args.moving_reference else None
        pairs = read_landmark_pair(args.fixed_landmarks, args.moving_landmarks, fixed_reference=reference,
                                   moving_reference=moving_reference, moving_on_own_grid=transform is not None)
        note(pairs.describe())
    with progress_bar("checks") as update:
        results = run_checks(fixed, moving, checks, transform=transform, inverse_transform=inverse, mask=mask,
                             body_only=not args.no_body_mask, pairs=pairs, model=model, device=args.device,
                             tile_size=args.tile_size, hu_offset=args.hu_offset, plausible_range=args.jacobian_range,
                             reregistration_iterations=args.reregistration_iterations, threads=args.threads,
                             progress=update, log=note)
    for key, flag in MAP_OUTPUTS.items():
        path = getattr(args, _dest(flag))
        if path:
            print(f"wrote {write_image(results.maps[key], path, flag)}")
    print(results.summary.format_table())
    if args.out_json:
        document = results.summary.to_dict() | {"checks": list(checks), "seconds": results.seconds}
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out_json}")
    if args.out_csv:
        print(f"wrote {results.summary.landmarks.write_csv(args.out_csv)}")
    return 0


__all__ = ["MAP_OUTPUTS", "add_qa_parser", "cmd_qa"]
