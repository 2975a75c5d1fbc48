"""Training images from files: every CT of a folder (or list file), on the 1 mm grid in HU."""

from __future__ import annotations

from pathlib import Path

from RegistrationMisalignmentLib.config import MisalignmentConfig
from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.io import read_image
from RegistrationMisalignmentLib.synthetic.images import IMAGE_SUFFIXES, TrainingImage, scan_stem, to_training_image
from trainer.cache import CACHE_SUFFIX, read_cache


def list_image_files(source: str | Path) -> list[Path]:
    """CT files of a folder (images whose name holds 'mask' are skipped; compact copies, ``trainer.cache``, too),
    or the lines of a list file."""
    source = Path(source)
    if source.is_dir():
        files = [p for p in sorted(source.iterdir())
                 if p.name.endswith((*IMAGE_SUFFIXES, CACHE_SUFFIX)) and "mask" not in p.name.lower()]
        dicom = [p for p in sorted(source.iterdir()) if p.is_dir()]
        files += dicom
    elif source.is_file():
        files = [Path(line.strip()) for line in source.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
    else:
        raise InputError(f"training data {source} not found: give a folder of CT images or a text file listing them")
    if not files:
        raise InputError(f"training data {source} holds no CT image ({', '.join(IMAGE_SUFFIXES)}, {CACHE_SUFFIX} or DICOM folders)")
    return files


def load_images(source: str | Path, config: MisalignmentConfig) -> list[TrainingImage]:
    """Every image of ``source`` on the 1 mm grid in HU; a compact copy is read without SimpleITK. Raises
    InputError where two files hold the same scan (a scan beside its compact copy)."""
    images = [read_cache(p, config) if p.name.endswith(CACHE_SUFFIX)
              else to_training_image(read_image(p, str(p)), p.name, config) for p in list_image_files(source)]
    stems = [scan_stem(i.name) for i in images]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise InputError(f"training data {source} holds {', '.join(twice)} twice (a scan and its compact copy?): "
                         "keep one of each")
    return images
