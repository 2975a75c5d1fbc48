"""A NIfTI-1 header's two orientations, qform and sform, compared: when both are set and disagree, ITK reads the
sform without a word (FSL, SPM and ANTs users meet files where one of them was edited and the other not), and the
image may lie elsewhere than its author saw it. The header layout is the NIfTI-1 standard's (nifti1.h)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

HEADER_BYTES = 348
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


def orientation_disagreement(path: str | Path) -> str | None:
    """A sentence when ``path`` is a NIfTI-1 file whose qform and sform are both set and place the image's corners
    more than ``MAX_AGREEMENT_MM`` apart (ITK then uses the sform); None otherwise (or for any other file)."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    try:
        with (gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")) as f:
            header = f.read(HEADER_BYTES)
    except (OSError, EOFError):
        return None
    if len(header) < HEADER_BYTES:
        return None
    for endian in ("<", ">"):
        if struct.unpack(endian + "i", header[:4])[0] == HEADER_BYTES:
            break
    else:
        return None  # NIfTI-2 or not NIfTI: ITK says what it is
    qform, sform, qform_code, sform_code = _affines(header, endian)
    if qform_code <= 0 or sform_code <= 0:
        return None
    dim = struct.unpack(endian + "8h", header[40:56])
    size = [max(int(n), 1) for n in dim[1:4]]
    corners = np.array([[i, j, k, 1.0] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    apart = float(np.linalg.norm((corners @ qform.T - corners @ sform.T)[:, :3], axis=1).max())
    if apart <= MAX_AGREEMENT_MM:
        return None
    return (f"{path.name}: its NIfTI header holds two orientations that place the image up to {apart:.1f} mm apart "
            f"(qform code {qform_code}, sform code {sform_code}); ITK used the sform. If the image lies wrong, fix "
            "the header (e.g. fslorient, or nibabel's set_qform / set_sform) so that both agree.")


__all__ = ["MAX_AGREEMENT_MM", "orientation_disagreement"]
