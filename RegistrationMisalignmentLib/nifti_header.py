"""What ITK's NIfTI reader does not say: a header's two orientations, qform and sform, compared (when both are set
and disagree, ITK reads one of them without a word; FSL, SPM and ANTs users meet files where one was edited and
the other not, and the image may lie elsewhere than its author saw it), and float voxels that are NaN or Inf in the
file (ITK reads them as 0). The layout is the NIfTI-1 standard's (nifti1.h)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk

HEADER_BYTES = 348
FLOAT_DATATYPES = {16: "f4", 64: "f8"}
"""NIfTI datatype codes of float voxels (DT_FLOAT32, DT_FLOAT64): the ones that can hold NaN and Inf."""
MAX_AGREEMENT_MM = 0.5
"""The two orientations agree when they place every corner of the image within this distance of each other."""


def _affines(header: bytes, endian: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(qform 4x4, sform 4x4, qform_code, sform_code) in NIfTI's RAS+ world (mm)."""
    pixdim = struct.unpack(endian + "8f", header[76:108])
    qform_code, sform_code = struct.unpack(endian + "2h", header[252:256])
    b, c, d, qx, qy, qz = struct.unpack(endian + "6f", header[256:280])
    srow = np.array(struct.unpack(endian + "12f", header[280:328]), dtype=np.float64).reshape(3, 4)
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                         [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                         [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - b * b - c * c]])
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    scale = np.array([pixdim[1], pixdim[2], pixdim[3] * qfac])
    qform = np.eye(4)
    qform[:3, :3] = rotation * scale
    qform[:3, 3] = (qx, qy, qz)
    sform = np.eye(4)
    sform[:3] = srow
    return qform, sform, qform_code, sform_code


NIFTI_SUFFIXES = (".nii.gz", ".nii", ".hdr.gz", ".hdr", ".img.gz", ".img")
"""Names NIfTI/Analyze readers take for one another: asked for ``X.nii.gz`` ITK reads ``X.nii`` when both exist,
and ``X.hdr`` / ``X.img`` are one image's two files."""


def nifti_stem(path: Path) -> Path | None:
    """``path`` without its NIfTI/Analyze suffix (the name its readers look under), or None for another format."""
    name = path.name.lower()
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return None


def nifti_twins(path: Path) -> list[Path]:
    """The other of ``X.nii`` / ``X.nii.gz`` when both exist beside each other: ITK, asked for ``X.nii.gz``, reads
    ``X.nii`` (an Analyze ``X.hdr`` beside them it leaves alone); [] for other names."""
    stem = nifti_stem(path)
    if stem is None or not path.name.lower().endswith((".nii", ".nii.gz")):
        return []
    twins = []
    for suffix in (".nii.gz", ".nii"):
        twin = stem.with_name(stem.name + suffix)
        if twin.exists() and not (path.exists() and os.path.samefile(twin, path)) and twin.name != path.name:
            twins.append(twin)  # samefile: on a case-insensitive disk CT.NII.GZ finds itself as CT.nii.gz
    return twins


def _open(path: Path):
    """``path`` opened for reading, through gzip when its content is gzip whatever its name says (as ITK does)."""
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def _files(path: Path) -> tuple[Path, Path] | None:
    """(header file, voxel file) of the NIfTI-1 or Analyze image ``path`` names (.nii / .nii.gz: one file; .hdr /
    .img, each perhaps .gz: a pair); None for other formats or a pair with a half missing."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return path, path
    if not name.endswith((".hdr", ".hdr.gz", ".img", ".img.gz")):
        return None
    stem = nifti_stem(path)
    halves = [next((f for s in suffixes if (f := stem.with_name(stem.name + s)).exists()), None)
              for suffixes in ((".hdr", ".hdr.gz"), (".img", ".img.gz"))]
    return (halves[0], halves[1]) if all(halves) else None


def _header(path: Path) -> tuple[bytes, str] | None:
    """(the 348 header bytes, their byte order "<" or ">") of a NIfTI-1 or Analyze header file, else None."""
    try:
        with _open(path) as f:
            header = f.read(HEADER_BYTES)
    except (OSError, EOFError):
        return None
    if len(header) < HEADER_BYTES:
        return None
    for endian in ("<", ">"):
        if struct.unpack(endian + "i", header[:4])[0] == HEADER_BYTES:
            return header, endian
    return None  # NIfTI-2 or not NIfTI: ITK says what it is


def _corners(affine: np.ndarray, size: list[int]) -> np.ndarray:
    """(8, 3) RAS mm of the corner voxels' centres under a 4x4 voxel-to-world ``affine``."""
    corners = np.array([[i, j, k, 1.0] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    return (corners @ affine.T)[:, :3]


def orientation_disagreement(path: str | Path, image: "sitk.Image | None" = None) -> str | None:
    """A sentence when ``path`` is a NIfTI-1 file whose qform and sform are both set and place the image's corners
    more than ``MAX_AGREEMENT_MM`` apart; None otherwise (or for any other file). ``image``: what ITK read from it,
    to say which of the two ITK used (the sform, unless it is sheared or otherwise no rotation and scale)."""
    path = Path(path)
    files = _files(path)
    found = _header(files[0]) if files else None
    if found is None or found[0][344:347] not in (b"n+1", b"ni1"):  # Analyze holds no qform / sform
        return None
    header, endian = found
    qform, sform, qform_code, sform_code = _affines(header, endian)
    if qform_code <= 0 or sform_code <= 0:
        return None
    dim = struct.unpack(endian + "8h", header[40:56])
    size = [max(int(n), 1) for n in dim[1:4]]
    apart = float(np.linalg.norm(_corners(qform, size) - _corners(sform, size), axis=1).max())
    if apart <= MAX_AGREEMENT_MM:
        return None
    used = "sform, unless it is sheared (then the qform)"
    if image is not None and image.GetDimension() >= 3:
        extra = [0] * (image.GetDimension() - 3)
        read = np.array([image.TransformIndexToPhysicalPoint([i, j, k, *extra])[:3]
                         for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
        read[:, :2] *= -1  # ITK's LPS to NIfTI's RAS
        used = min(("qform", qform), ("sform", sform),
                   key=lambda form: np.linalg.norm(_corners(form[1], size) - read, axis=1).max())[0]
    return (f"{path.name}: its NIfTI header holds two orientations that place the image up to {apart:.1f} mm apart "
            f"(qform code {qform_code}, sform code {sform_code}); ITK used the {used}. If the image lies wrong, fix "
            "the header (e.g. fslorient, or nibabel's set_qform / set_sform) so that both agree.")


def nonfinite_voxels(path: str | Path) -> tuple[int, int]:
    """(NaN, Inf) voxel counts of a NIfTI-1 or Analyze image with float voxels, read from its file (ITK's reader
    turns them into 0); (0, 0) for integer voxels and other formats (whose readers keep them for
    ``validate_image``)."""
    files = _files(Path(path))
    found = _header(files[0]) if files else None
    if found is None:
        return 0, 0
    header, endian = found
    datatype = struct.unpack(endian + "h", header[70:72])[0]
    if datatype not in FLOAT_DATATYPES:
        return 0, 0
    dtype = np.dtype(endian + FLOAT_DATATYPES[datatype])
    dim = struct.unpack(endian + "8h", header[40:56])
    remaining = int(np.prod([max(int(n), 1) for n in dim[1 : 1 + max(1, min(int(dim[0]), 7))]])) * dtype.itemsize
    offset = max(0, int(struct.unpack(endian + "f", header[108:112])[0]))  # into the .nii, or the pair's .img
    nan = inf = 0
    try:
        with _open(files[1]) as f:
            f.read(offset)
            while remaining > 0:
                chunk = f.read(min(remaining, dtype.itemsize << 22))
                if not chunk:
                    break  # a short file: the gzip check and ITK say so
                remaining -= len(chunk)
                values = np.frombuffer(chunk[: len(chunk) - len(chunk) % dtype.itemsize], dtype=dtype)
                nan += int(np.count_nonzero(np.isnan(values)))
                inf += int(np.count_nonzero(np.isinf(values)))
    except (OSError, EOFError):
        pass  # damaged: ITK and the gzip check say so
    return nan, inf


__all__ = ["FLOAT_DATATYPES", "MAX_AGREEMENT_MM", "NIFTI_SUFFIXES", "nifti_stem", "nifti_twins", "nonfinite_voxels",
           "orientation_disagreement"]
