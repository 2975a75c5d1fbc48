"""External landmark data for the benchmark: DIR-Lab 4DCT, DIR-Lab COPDgene, or any pairs listed in a CSV.

Nothing is downloaded: the user points at a folder (``--dirlab``) or a table (``--pairs``). A case
folder that is incomplete is refused with the list of what is missing, before any work starts.

DIR-Lab images are headerless ``.img`` files of int16; their sizes and spacings come from the public
case tables (dir-lab.com, "Reference Data"; the same values as hsokooti/RegNet,
functions/preprocessing/dirlab.py). As in that code the superior-inferior axis is flipped (slice 0
of the file is the head end) and HU = value - 1024. Landmarks are ``.txt`` files of 1-based voxel
indices of the file; they are read through ``landmarks.read_landmarks`` with a reference image whose
geometry encodes the flip, so every point lands on the same voxel of the flipped image.
Fixed = inhale (T00, iBH), moving = exhale (T50, eBH).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.landmarks import read_landmarks
from RegistrationMisalignmentLib.benchmark.cases import Case, LandmarkTruth

Geometry = tuple[tuple[int, int, int], tuple[float, float, float]]
"""(size x, y, z), (spacing x, y, z mm) of a headerless DIR-Lab image."""

DIRLAB_4DCT: dict[int, Geometry] = {
    1: ((256, 256, 94), (0.97, 0.97, 2.5)), 2: ((256, 256, 112), (1.16, 1.16, 2.5)),
    3: ((256, 256, 104), (1.15, 1.15, 2.5)), 4: ((256, 256, 99), (1.13, 1.13, 2.5)),
    5: ((256, 256, 106), (1.10, 1.10, 2.5)), 6: ((512, 512, 128), (0.97, 0.97, 2.5)),
    7: ((512, 512, 136), (0.97, 0.97, 2.5)), 8: ((512, 512, 128), (0.97, 0.97, 2.5)),
    9: ((512, 512, 128), (0.97, 0.97, 2.5)), 10: ((512, 512, 120), (0.97, 0.97, 2.5)),
}
DIRLAB_COPDGENE: dict[int, Geometry] = {
    1: ((512, 512, 121), (0.625, 0.625, 2.5)), 2: ((512, 512, 102), (0.645, 0.645, 2.5)),
    3: ((512, 512, 126), (0.652, 0.652, 2.5)), 4: ((512, 512, 126), (0.590, 0.590, 2.5)),
    5: ((512, 512, 131), (0.647, 0.647, 2.5)), 6: ((512, 512, 119), (0.633, 0.633, 2.5)),
    7: ((512, 512, 112), (0.625, 0.625, 2.5)), 8: ((512, 512, 115), (0.586, 0.586, 2.5)),
    9: ((512, 512, 116), (0.644, 0.644, 2.5)), 10: ((512, 512, 135), (0.742, 0.742, 2.5)),
}
HU_OFFSET = 1024
RAW_RANGE = (-2100, 5200)
"""Plausible stored values (HU + 1024, -2000 outside the scan's circle); byte-swapped int16 CT is not."""
PAIRS_COLUMNS = ("case", "fixed", "moving", "fixed_landmarks", "moving_landmarks")

# Per collection: the four files of case n as (role, regular expression on the lower-case name, shown name).
_PATTERNS = {
    "DIR-Lab 4DCT": (DIRLAB_4DCT, (
        ("fixed image", r"case{n}_t00(_s)?\.img", "case{n}_T00_s.img (cases 6-10: case{n}_T00.img)"),
        ("moving image", r"case{n}_t50(_s)?\.img", "case{n}_T50_s.img (cases 6-10: case{n}_T50.img)"),
        ("fixed landmarks", r"case{n}_(300|dirlab300)_t00_xyz\.txt",
         "case{n}_300_T00_xyz.txt (cases 6-10: case{n}_dirLab300_T00_xyz.txt)"),
        ("moving landmarks", r"case{n}_(300|dirlab300)_t50_xyz\.txt",
         "case{n}_300_T50_xyz.txt (cases 6-10: case{n}_dirLab300_T50_xyz.txt)"),
    )),
    "DIR-Lab COPDgene": (DIRLAB_COPDGENE, (
        ("fixed image", r"copd{n}_ibhct\.img", "copd{n}_iBHCT.img"),
        ("moving image", r"copd{n}_ebhct\.img", "copd{n}_eBHCT.img"),
        ("fixed landmarks", r"copd{n}_300_ibh_xyz_r1\.txt", "copd{n}_300_iBH_xyz_r1.txt"),
        ("moving landmarks", r"copd{n}_300_ebh_xyz_r1\.txt", "copd{n}_300_eBH_xyz_r1.txt"),
    )),
}


@dataclass
class CaseFiles:
    """Where one external case's four files are; ``geometry`` only for headerless DIR-Lab images."""

    name: str
    fixed: Path
    moving: Path
    fixed_landmarks: Path
    moving_landmarks: Path
    geometry: Geometry | None = None


def find_dirlab_cases(folder: str | Path, tables: dict[str, dict[int, Geometry]] | None = None) -> list[CaseFiles]:
    """Complete DIR-Lab cases anywhere under ``folder`` (any sub-folder layout), by case number.

    ``tables`` maps a collection name to its case table (default: the public 4DCT and COPDgene tables).
    A case with some but not all of its files is an error that lists the missing ones.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--dirlab {folder}: not a folder; give the folder that holds the DIR-Lab case files")
    files = {p.name.lower(): p for p in folder.rglob("*") if p.is_file()}
    cases, problems = [], []
    for collection, (default_table, patterns) in _PATTERNS.items():
        table = default_table if tables is None else tables.get(collection, {})
        for n, geometry in sorted(table.items()):
            found = {role: next((files[k] for k in sorted(files) if re.fullmatch(rx.format(n=n), k)), None)
                     for role, rx, _ in patterns}
            if not any(found.values()):
                continue
            missing = [shown.format(n=n) + f" ({role})" for role, _, shown in patterns if found[role] is None]
            if missing:
                problems.append(f"{collection} case {n} is incomplete, missing: {'; '.join(missing)}")
                continue
            cases.append(CaseFiles(f"{'copd' if 'COPD' in collection else 'case'}{n}", found["fixed image"],
                                   found["moving image"], found["fixed landmarks"], found["moving landmarks"],
                                   geometry))
    if problems:
        raise InputError(f"--dirlab {folder}: " + ". ".join(problems) + ". Put every file of a case under the "
                         "folder (any sub-folders) or remove the case's files.")
    if not cases:
        raise InputError(f"--dirlab {folder}: no DIR-Lab case found; expected files like case1_T00_s.img, "
                         "case1_T50_s.img, case1_300_T00_xyz.txt, case1_300_T50_xyz.txt (4DCT) or copd1_iBHCT.img, "
                         "copd1_eBHCT.img, copd1_300_iBH_xyz_r1.txt, copd1_300_eBH_xyz_r1.txt (COPDgene)")
    return cases


def _decode_int16(path: Path, voxels: int) -> np.ndarray:
    """The file's int16 values, little-endian (DIR-Lab's) unless only big-endian gives plausible CT."""
    data = path.read_bytes()
    if len(data) != 2 * voxels:
        raise InputError(f"{path}: {len(data)} bytes, but the DIR-Lab case table gives {voxels} int16 voxels "
                         f"({2 * voxels} bytes); is the file complete and named for the right case?")
    for order in ("<i2", ">i2"):
        values = np.frombuffer(data, dtype=order)
        if np.mean((values >= RAW_RANGE[0]) & (values <= RAW_RANGE[1])) > 0.99:
            return values
    raise InputError(f"{path}: the values are not CT in either byte order; is it a DIR-Lab .img file?")


def raw_reference(geometry: Geometry) -> sitk.Image:
    """Geometry of the file's own voxel order: index k of the file is flipped slice (nz - 1 - k)."""
    (nx, ny, nz), spacing = geometry
    ref = sitk.Image([nx, ny, nz], sitk.sitkUInt8)
    ref.SetSpacing(spacing)
    ref.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    ref.SetOrigin((0.0, 0.0, (nz - 1) * spacing[2]))
    return ref


def read_dirlab_image(path: Path, geometry: Geometry) -> sitk.Image:
    """A DIR-Lab .img as an HU image (float32): z flipped so slice 0 is the feet end, identity direction."""
    (nx, ny, nz), spacing = geometry
    values = _decode_int16(path, nx * ny * nz).reshape(nz, ny, nx)[::-1]
    image = sitk.GetImageFromArray(np.maximum(values.astype(np.float32) - HU_OFFSET, -HU_OFFSET))
    image.SetSpacing(spacing)
    return image


def read_pairs_csv(path: str | Path) -> list[CaseFiles]:
    """A table ``case,fixed,moving,fixed_landmarks,moving_landmarks`` (paths relative to the table)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--pairs {path}: file not found; give a CSV with columns {','.join(PAIRS_COLUMNS)}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing_columns = set(PAIRS_COLUMNS) - set(reader.fieldnames or [])
        if missing_columns:
            raise InputError(f"--pairs {path} line 1: missing columns {sorted(missing_columns)}; the header must "
                             f"name {','.join(PAIRS_COLUMNS)}")
        rows = list(reader)
    cases, problems = [], []
    for line, row in enumerate(rows, start=2):
        paths = {key: (path.parent / row[key].strip()) for key in PAIRS_COLUMNS[1:]}
        missing = [f"{key} {p}" for key, p in paths.items() if not p.exists()]
        if missing:
            problems.append(f"line {line} (case {row['case']!r}) misses {'; '.join(missing)}")
            continue
        cases.append(CaseFiles(row["case"].strip(), *paths.values()))
    if problems:
        raise InputError(f"--pairs {path}: " + ". ".join(problems) + ". Fix the paths (relative to the CSV's folder).")
    if not cases:
        raise InputError(f"--pairs {path}: no rows; add one line per case")
    return cases


def load_case(files: CaseFiles) -> Case:
    """Read the images and landmarks of one external case (DIR-Lab when ``files.geometry`` is set)."""
    from RegistrationMisalignmentLib.io import read_image

    if files.geometry is not None:
        fixed, moving = read_dirlab_image(files.fixed, files.geometry), read_dirlab_image(files.moving, files.geometry)
        fixed_ref = moving_ref = raw_reference(files.geometry)
    else:
        fixed, moving = read_image(files.fixed, "fixed image"), read_image(files.moving, "moving image")
        fixed_ref, moving_ref = fixed, moving
    fixed_points = read_landmarks(files.fixed_landmarks, fixed_ref)
    moving_points = read_landmarks(files.moving_landmarks, moving_ref)
    if len(fixed_points) != len(moving_points):
        raise InputError(f"{files.fixed_landmarks} and {files.moving_landmarks} hold {len(fixed_points)} and "
                         f"{len(moving_points)} points; they must pair one to one")
    return Case(files.name, fixed, moving, fixed_points, LandmarkTruth(moving_points),
                f"{files.fixed.name} (fixed) / {files.moving.name} (moving), {len(fixed_points)} landmark pairs")


__all__ = ["CaseFiles", "DIRLAB_4DCT", "DIRLAB_COPDGENE", "find_dirlab_cases", "read_dirlab_image",
           "raw_reference", "read_pairs_csv", "load_case"]
