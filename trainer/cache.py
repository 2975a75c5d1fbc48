"""A compact copy of the training data, for a lent GPU machine that takes at most 64 MiB with the call.

Every scan is resampled once to the 1 mm training grid, clipped to the network's HU window and stored
as uint8 (steps of 7.8 HU, below the 5 HU noise the trainer adds plus the scanner's own), one compressed
NRRD per scan; its window is written into the header (``regmis_hu_window``), and ``synthetic.images``
maps the values back to HU when it reads such a file. What the network sees differs from the full data
only by that rounding: the window clips everything outside it anyway.

    python -m trainer.cache --data ../shared/data --out runs/cache
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from RegistrationMisalignmentLib.config import DEFAULT_CONFIG, MisalignmentConfig
from trainer.config import DEFAULT_SHARED_DATA
from RegistrationMisalignmentLib.synthetic.images import HU_WINDOW_KEY
from trainer.data import list_image_files, load_images

LEVELS = 255


def to_uint8(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return np.rint((np.clip(hu, lo, hi) - lo) * (LEVELS / (hi - lo))).astype(np.uint8)


def write_cache(source: str | Path, out: str | Path, config: MisalignmentConfig = DEFAULT_CONFIG) -> list[Path]:
    """One ``<scan>.nrrd`` per CT of ``source`` under ``out``; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, image in zip(list_image_files(source), load_images(source, config)):
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
    args = parser.parse_args(argv)
    files = write_cache(args.data, args.out)
    total = sum(f.stat().st_size for f in files) / 2**20
    print(f"{len(files)} scans, {total:.1f} MiB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
