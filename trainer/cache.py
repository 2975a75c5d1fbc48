"""A compact copy of the training data, for a lent GPU machine that takes at most 64 MiB with the call.

Every scan is resampled once to the 1 mm training grid, clipped to the network's HU window and stored
as uint8 (steps of 7.8 HU, below the 5 HU noise the trainer adds plus the scanner's own), one compressed
NRRD per scan; its window is written into the header (``regmis_hu_window``), and ``synthetic.images``
maps the values back to HU when it reads such a file. What the network sees differs from the full data
only by that rounding: the window clips everything outside it anyway.

    python -m trainer.cache --data ../shared/data --out runs/cache [--scans lidc_0001_chest_ct chest_ct_1.5mm ...]

Size: all six scans of ../shared/data take 71 MiB (LIDC 13.6 each, POPI 19.0, the abdomen 15.7 at 1 mm),
and a call to a lent GPU carries at most 64 MiB *with* the tracked working tree (68 MiB of it on
2026-12-02: the canonical checkpoint alone is 38 MiB, its three finished RegNet files 17 of them, which a
stage-2 resume does not read). So a GPU stretch takes a subset (``--scans``), and large tracked files the
run does not need (the RegNet files, old study CSVs, the shipped models) are moved aside for the call.
The GPU machine has no SimpleITK, which this module and the trainer import (README, "On a lent GPU"). xz
compression saves only ~20 % (CT noise fills the low bits), so it is not used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from RegistrationMisalignmentLib.config import DEFAULT_CONFIG, MisalignmentConfig
from trainer.config import DEFAULT_SHARED_DATA
from RegistrationMisalignmentLib.io import read_image
from RegistrationMisalignmentLib.synthetic.images import HU_WINDOW_KEY, to_training_image
from trainer.data import list_image_files

LEVELS = 255


def to_uint8(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return np.rint((np.clip(hu, lo, hi) - lo) * (LEVELS / (hi - lo))).astype(np.uint8)


def write_cache(source: str | Path, out: str | Path, config: MisalignmentConfig = DEFAULT_CONFIG,
                scans: list[str] | None = None) -> list[Path]:
    """One ``<scan>.nrrd`` per CT of ``source`` (or of those whose name starts with one of ``scans``) under
    ``out``; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    files = [p for p in list_image_files(source) if not scans or any(p.name.startswith(s) for s in scans)]
    for path in files:
        image = to_training_image(read_image(path, str(path)), path.name, config)
        cached = sitk.GetImageFromArray(to_uint8(image.hu, config.hu_window))
        cached.SetSpacing((config.spacing_mm,) * 3)
        cached.SetMetaData(HU_WINDOW_KEY, " ".join(f"{v:g}" for v in config.hu_window))
        target = out / (image.name.removesuffix(".nii.gz").removesuffix(".nii") + ".nrrd")
        sitk.WriteImage(cached, str(target), True)
        written.append(target)
        print(f"{path.name} -> {target} ({target.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_SHARED_DATA), help="folder (or list file) of CT images")
    parser.add_argument("--out", default="runs/cache")
    parser.add_argument("--scans", nargs="+", help="only the scans whose file name starts with one of these")
    args = parser.parse_args(argv)
    files = write_cache(args.data, args.out, scans=args.scans)
    total = sum(f.stat().st_size for f in files) / 2**20
    print(f"{len(files)} scans, {total:.1f} MiB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
