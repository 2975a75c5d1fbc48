"""Check every output path before any work, so a mistake costs seconds, not a 20-minute prediction.

A labelmap or probability map is 3-D: it is refused in a format that holds one slice (PNG, JPEG...)
or in one SimpleITK cannot write. An output that resolves to one of the inputs (or lands inside an
input DICOM folder) is refused, so a user's CT is never overwritten, and so is one that a reader would take
for an input or another file (``X.nii`` beside the input, output or existing ``X.nii.gz``: ITK reads the one for
the other). An existing folder where a file is asked for, a file where a folder is asked for, a parent that is a
file or not writable, two outputs on one path and an upper-case NIfTI or MetaImage suffix (``.NII.GZ``,
``.MHA``: ITK's writers know only lower case) are refused too. Every refusal is an ``InputError`` naming the
option and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.nifti_header import nifti_stem, nifti_twins

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
"""Formats that hold a 3-D image (and a 3-component vector image) with its geometry."""
SLICE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
"""Formats that hold one 2-D slice: SimpleITK would write the middle slice and drop the rest."""
CASE_SENSITIVE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd")
"""ITK's writers for these take only lower case (its NRRD writer takes any)."""
KINDS = {"image": IMAGE_SUFFIXES, "csv": (".csv",), "json": (".json",), "folder": ()}


@dataclass(frozen=True)
class Output:
    """One output the command will write: its option name (for messages), path and kind (``KINDS``)."""

    option: str
    path: str | os.PathLike | None
    kind: str


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _writable_parent(path: Path, option: str) -> None:
    """The first existing ancestor of ``path`` must be a folder this process can write into."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{option}: '{parent}' is a file, so '{path}' cannot be created below it; choose another path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option}: the folder '{parent}' is not writable; choose a folder you can write to.")


def _check_one(output: Output, path: Path) -> None:
    option, kind = output.option, output.kind
    if kind == "folder":
        if path.exists() and not path.is_dir():
            raise InputError(f"{option}: '{path}' is a file; give a folder (it is created when missing).")
        _writable_parent(path / "x", option)
        return
    if path.is_dir():
        example = path / ("result" + KINDS[kind][0])
        raise InputError(f"{option}: '{path}' is a folder; give a file name such as '{example}'.")
    suffix = _suffix(path)
    accepted = ", ".join(KINDS[kind])
    if kind == "image" and suffix in SLICE_SUFFIXES:
        raise InputError(f"{option}: '{path.name}' is a 2-D format ({suffix}) that holds one slice; a labelmap "
                         f"needs a 3-D format: {accepted}.")
    if suffix not in KINDS[kind]:
        raise InputError(f"{option}: '{path.name}' has {f'the extension {suffix}' if suffix else 'no extension'}; "
                         f"use {accepted}.")
    stale = nifti_twins(path) if kind == "image" else []
    if stale:
        raise InputError(f"{option}: '{stale[0]}' already lies beside '{path.name}'; ITK (and Slicer), asked for the "
                         ".nii.gz of the two, reads the .nii, so one would be read for the other. Delete or rename it, "
                         "or choose another name.")
    if suffix in CASE_SENSITIVE_SUFFIXES and not path.name.endswith(suffix):
        raise InputError(f"{option}: '{path.name}' has an upper-case extension, which ITK's NIfTI and MetaImage "
                         f"writers do not recognise (they fail after the work, or write .mhd + .raw); name it "
                         f"'{path.name[: -len(suffix)]}{suffix}'.")
    _writable_parent(path, option)


def check_outputs(outputs: Iterable[Output], inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Raise ``InputError`` for the first output that cannot or must not be written (see the module)."""
    given = [o for o in outputs if o.path]
    sources = [Path(p).expanduser().resolve() for p in inputs if p]
    seen: dict[Path, str] = {}
    twins: dict[Path, str] = {}
    for output in given:
        path = Path(output.path).expanduser()
        resolved = path.resolve()
        for source in sources:
            if resolved == source:
                raise InputError(f"{output.option}: '{path}' is an input of this command; writing it would overwrite "
                                 "that input. Choose another output path.")
            twin = nifti_stem(resolved)
            if twin is not None and twin == nifti_stem(source):
                raise InputError(f"{output.option}: '{path.name}' differs from the input '{source.name}' only by its "
                                 "suffix; NIfTI readers (ITK's) may then read the one for the other, and the input "
                                 "would seem changed. Choose another output name.")
            if source.is_dir() and output.kind != "folder" and source in resolved.parents:
                raise InputError(f"{output.option}: '{path}' is inside the input folder '{source}'; writing there would "
                                 "change that input (a DICOM folder). Choose a path outside it.")
        if resolved in seen:
            raise InputError(f"{output.option} and {seen[resolved]} name the same file '{path}'; give two paths.")
        stem = nifti_stem(resolved) if output.kind == "image" else None
        if stem is not None and stem in twins:
            raise InputError(f"{output.option} and {twins[stem]} differ only by their NIfTI suffix ('{path.name}'); "
                             "NIfTI readers (ITK's, Slicer's) would then read the one for the other. Give two names.")
        seen[resolved] = output.option
        if stem is not None:
            twins[stem] = output.option
        _check_one(output, path)
