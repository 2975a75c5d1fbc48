"""A compact copy of the training data, for a lent GPU machine that takes at most 64 MiB with the call.

Every scan is resampled once to the 1 mm training grid, clipped to the network's HU window and stored
as uint8 (steps of 7.8 HU, below the 5 HU noise the trainer adds plus the scanner's own), one compressed
NumPy archive per scan (``<scan>.npz``: ``hu`` the uint8 array, ``hu_window`` the HU that 0 and 255 stand
for, ``spacing_mm`` the grid's, ``name`` the source file's name, so that ``holdout`` and the history name the
scan as before). What the network sees differs from the full data only by that rounding: the window clips
everything outside it anyway.
NumPy, not NRRD: the GPU machine's image has no SimpleITK (README, "On a lent GPU"), so reading the cache
(``read_cache``, ``trainer.data.load_images``) calls NumPy alone.

    python -m trainer.cache --data ../shared/data --out runs/cache [--scans lidc_0001_chest_ct chest_ct_1.5mm ...]

Size: the two LIDC scans take 13.3 MiB each, the 1.5 mm chest crop 5.8 (32.4 MiB for the three a GPU stretch
carries), and a call to a lent GPU carries at most 64 MiB *with* the tracked working tree it needs, so a
stretch takes a subset (``--scans``). xz compression saves only ~20 % (CT noise fills the low bits).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from RegistrationMisalignmentLib.config import DEFAULT_CONFIG, MisalignmentConfig
from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.io import read_image
from RegistrationMisalignmentLib.synthetic.images import TrainingImage, scan_stem, to_training_image
from trainer.config import DEFAULT_SHARED_DATA

LEVELS = 255
CACHE_SUFFIX = ".npz"


def to_uint8(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return np.rint((np.clip(hu, lo, hi) - lo) * (LEVELS / (hi - lo))).astype(np.uint8)


def read_cache(path: str | Path, config: MisalignmentConfig = DEFAULT_CONFIG) -> TrainingImage:
    """A cached scan back in HU (float32, (D, H, W) on ``config``'s grid), named as its source file; NumPy only.

    Raises InputError for an .npz that is not such a copy, or one made for another grid or HU window."""
    with np.load(path) as cached:
        missing = {"hu", "hu_window", "spacing_mm", "name"} - set(cached.files)
        if missing:
            raise InputError(f"{path} is not a compact copy of a scan (no {', '.join(sorted(missing))}): make one with "
                             "python -m trainer.cache, or move other .npz files out of the training data folder")
        window, spacing = tuple(float(v) for v in cached["hu_window"]), float(cached["spacing_mm"])
        if window != tuple(config.hu_window) or spacing != config.spacing_mm:
            raise InputError(f"{path} was made for a {spacing:g} mm grid and HU window {window}, this run uses "
                             f"{config.spacing_mm:g} mm and {tuple(config.hu_window)}: make the cache again")
        lo, hi = window
        hu = cached["hu"].astype(np.float32) * np.float32((hi - lo) / LEVELS) + np.float32(lo)
        return TrainingImage(str(cached["name"]), hu)


def write_cache(source: str | Path, out: str | Path, config: MisalignmentConfig = DEFAULT_CONFIG,
                scans: list[str] | None = None) -> list[Path]:
    """One ``<scan>.npz`` per CT of ``source`` (or of those whose name starts with one of ``scans``) under
    ``out``; returns the files written."""
    from trainer.data import list_image_files  # here: trainer.data reads the cache with read_cache

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    files = [p for p in list_image_files(source) if not p.name.endswith(CACHE_SUFFIX)
             and (not scans or any(p.name.startswith(s) for s in scans))]
    for path in files:
        image = to_training_image(read_image(path, str(path)), path.name, config)
        target = out / (scan_stem(image.name) + CACHE_SUFFIX)
        np.savez_compressed(target, hu=to_uint8(image.hu, config.hu_window),
                            hu_window=np.asarray(config.hu_window, dtype=np.float64),
                            spacing_mm=np.float64(config.spacing_mm), name=np.asarray(image.name))
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
