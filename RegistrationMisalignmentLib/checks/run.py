"""Compute any set of checks for a registered pair in one call: what ``regmis qa`` and the Slicer Logic run.

Checks (user-facing names, ``CHECKS``) and the maps they give (keys of ``maps.MAPS``):

========================  ==========================  =============================================
check                     maps                        needs
========================  ==========================  =============================================
``learned``               learned                     the model (``inference.predict``)
``confidence``            confidence, entropy         the model; the learned map comes with it
``jacobian``              jacobian                    the registration transform
``inverse-consistency``   inverse_consistency         the transform and the inverse registration
``intensity``             intensity                   nothing more
``reregistration``        residual, reregistration    itk-elastix (optional extra)
========================  ==========================  =============================================

All maps lie on the fixed image's grid; the summary reads them inside the mask, else the fixed CT's body
(``body_mask``), else the whole image. Inputs are validated before any work (``InputError`` naming the
input and the fix); ``progress`` / ``cancel`` cover the whole run (``PredictionCancelled``, nothing
returned, when cancelled).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import SimpleITK as sitk

from RegistrationMisalignmentLib.checks.fields import TransformLike, as_transform, field_coverage
from RegistrationMisalignmentLib.checks.jacobian import PLAUSIBLE_RANGE, check_range
from RegistrationMisalignmentLib.progress import Cancel, Progress, Reporter
from RegistrationMisalignmentLib.checks.summary import ChecksSummary, summarize
from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.landmarks import Pairing, check_field_covers

CHECKS: tuple[str, ...] = ("learned", "confidence", "jacobian", "inverse-consistency", "intensity", "reregistration")
MAPS_OF: dict[str, tuple[str, ...]] = {
    "learned": ("learned",), "confidence": ("learned", "confidence", "entropy"), "jacobian": ("jacobian",),
    "inverse-consistency": ("inverse_consistency",), "intensity": ("intensity",),
    "reregistration": ("residual", "reregistration"),
}
"""The maps each check gives."""
MIN_FIELD_COVERAGE = 0.999
"""Share of the checked region a displacement field must cover (its grid's edge aside)."""
WEIGHTS = {"learned": 6.0, "confidence": 6.5, "jacobian": 1.0, "inverse-consistency": 1.0, "intensity": 0.3,
           "reregistration": 6.0}
"""Rough relative run times, to spread the progress bar (confidence: the network run that also makes the
learned map)."""


def parse_checks(text: str | Iterable[str]) -> tuple[str, ...]:
    """'jacobian,intensity' (or an iterable of names) -> the checks in ``CHECKS`` order; refuses unknown names."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    names = ["inverse-consistency" if n == "inverse_consistency" else n for n in names]
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        raise InputError(f"checks {unknown or '(none given)'}: choose a comma-separated subset of {','.join(CHECKS)}")
    return tuple(c for c in CHECKS if c in names)


def default_checks(has_transform: bool, has_inverse: bool) -> tuple[str, ...]:
    """What the inputs allow, re-registration left out (minutes, and an optional extra): the learned map with
    its confidence, the intensity difference, the Jacobian with a transform, inverse consistency with both."""
    chosen = ["learned", "confidence", "intensity"]
    chosen += ["jacobian"] if has_transform else []
    chosen += ["inverse-consistency"] if has_transform and has_inverse else []
    return parse_checks(chosen)


@dataclass
class CheckResults:
    """The maps (keys of ``maps.MAPS``), the summary region and the summary."""

    maps: dict[str, sitk.Image]
    region: sitk.Image | None
    summary: ChecksSummary
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per check (s)."""


def _check_fields_cover(forward: sitk.Transform | None, backward: sitk.Transform | None, fixed: sitk.Image,
                        region: sitk.Image | None, region_name: str) -> None:
    """Raise ``InputError`` when a displacement field misses part of where the checks read it: the forward one
    the region's voxels x, the backward one the points T(x) they map to (on the moving side). Beyond its grid
    ITK applies no displacement (the identity), values the registration never gave."""
    for given, option, mapped in ((forward, "--transform", None), (backward, "--inverse-transform", forward)):
        if given is None or (option == "--inverse-transform" and forward is None):
            continue
        covered = field_coverage(given, fixed, region, mapped)
        if covered is not None and covered < MIN_FIELD_COVERAGE:
            where = "" if mapped is None else ", mapped by --transform into the moving image's space,"
            raise InputError(f"the displacement field given as {option} covers only {covered:.1%} of the "
                             f"{region_name}{where}; beyond its grid ITK applies no displacement (the identity), so "
                             "the checks would judge values the registration never gave. Give a field that covers "
                             f"{'it' if mapped is None else 'the moved region'}, or a mask within it (--mask).")


def run_checks(fixed: sitk.Image, moving: sitk.Image, checks: Iterable[str], *,
               transform: TransformLike | None = None, inverse_transform: TransformLike | None = None,
               mask: sitk.Image | None = None, body_only: bool = True, pairs: Pairing | None = None,
               landmarks_registered: bool = False,
               model=None, device: str = "auto", tile_size: int | None = None,
               hu_offset: float | tuple[float, float] = 0.0,
               plausible_range: tuple[float, float] = PLAUSIBLE_RANGE, reregistration_iterations: int | None = None,
               threads: int | None = None, python: str | None = None,
               progress: Progress | None = None, cancel: Cancel | None = None,
               log: Callable[[str], None] | None = None) -> CheckResults:
    """The maps of ``checks`` (names of ``CHECKS``) for ``fixed`` and the registered ``moving`` image.

    ``moving``: the moving image after registration (any grid overlapping the fixed one: resampled onto
    it). ``transform``: the registration, fixed -> moving points (LPS mm; a ``SimpleITK.Transform``, a
    displacement-field image or a file, see ``fields.as_transform``), needed by ``jacobian`` and
    ``inverse-consistency``, and used for the landmarks' TRE. ``inverse_transform``: the registration of
    the other direction (moving -> fixed points), for ``inverse-consistency``. ``mask`` (any label image):
    the region of the learned map, the re-registration classes and the summary; without it the fixed CT's
    body (``body_only``) or the whole image. ``pairs``: landmark pairs for the summary's landmark table, the
    moving ones in the moving image's space (TRE ||T(x_F) - x_M||), or already in the registered space when
    there is no ``transform`` or ``landmarks_registered`` says so (TRE ||x_F - x_M||).
    ``model``, ``device``, ``tile_size``: as ``inference.predict``. ``plausible_range``: of the Jacobian.
    ``reregistration_iterations``, ``threads``, ``python``: as ``reregistration.reregistration_residual``.
    Raises ``InputError`` before any work for a missing input a check needs, and ``PredictionCancelled``.
    """
    from RegistrationMisalignmentLib.body_mask import body_mask
    from RegistrationMisalignmentLib.io import prepare_mask, prepare_pair

    checks = parse_checks(checks)
    plausible_range = check_range(plausible_range)
    if "jacobian" in checks and transform is None:
        raise InputError("the Jacobian check needs the registration transform (--transform: a transform file or a "
                         "displacement field, fixed -> moving); give it or leave out the jacobian check.")
    if "inverse-consistency" in checks and (transform is None or inverse_transform is None):
        raise InputError("the inverse-consistency check needs both directions of the registration: --transform "
                         "(fixed -> moving) and --inverse-transform (moving -> fixed, the registration run with "
                         "the images swapped); give both or leave out inverse-consistency.")
    if "reregistration" in checks:
        from RegistrationMisalignmentLib.checks.reregistration import ELASTIX_REQUIREMENT, INSTALL_HINT, elastix_installed

        if not elastix_installed():
            raise InputError(f"the reregistration check needs itk-elastix ({ELASTIX_REQUIREMENT}); {INSTALL_HINT}.")
    report = Reporter(progress, cancel)
    report(0.0, "checking inputs")
    forward = as_transform(transform, "registration transform", log) if transform is not None else None
    backward = as_transform(inverse_transform, "inverse registration transform", log) \
        if inverse_transform is not None else None
    fixed_hu, moving_hu = prepare_pair(fixed, moving, log=log, hu_offset=hu_offset)
    if mask is not None:
        region, region_name = prepare_mask(mask, fixed_hu, log=log), "mask"
    elif body_only:
        region, region_name = body_mask(fixed_hu), "body"
    else:
        region, region_name = None, "whole image"
    _check_fields_cover(forward, backward, fixed_hu, region, region_name)
    if forward is not None and pairs is not None and not landmarks_registered:
        check_field_covers(forward, pairs.fixed)  # before the work, not in the summary after it

    steps = [c for c in checks if not (c == "learned" and "confidence" in checks)]  # one network run for both
    total = sum(WEIGHTS[c] for c in steps)
    done = 0.0
    maps: dict[str, sitk.Image] = {}
    seconds: dict[str, float] = {}

    def part(check: str) -> Reporter:
        nonlocal done
        lo = 0.02 + 0.96 * done / total
        done += WEIGHTS[check]
        return report.part(lo, 0.02 + 0.96 * done / total)

    for check in steps:
        start = time.perf_counter()
        if check in ("learned", "confidence"):
            from RegistrationMisalignmentLib.inference import predict

            step = part(check)
            prediction = predict(fixed_hu, moving_hu, model, mask=region, device=device,
                                 with_probabilities="confidence" in checks, progress=step, log=log,
                                 tile_size=tile_size, body_only=False)
            maps["learned"] = prediction.labelmap
            if check == "confidence":
                from RegistrationMisalignmentLib.checks.confidence import confidence_maps

                maps["confidence"], maps["entropy"] = confidence_maps(prediction.probabilities, region)
            del prediction
        elif check == "jacobian":
            from RegistrationMisalignmentLib.checks.jacobian import jacobian_determinant

            maps["jacobian"] = jacobian_determinant(forward, fixed_hu, progress=part(check))
        elif check == "inverse-consistency":
            from RegistrationMisalignmentLib.checks.inverse_consistency import inverse_consistency

            maps["inverse_consistency"] = inverse_consistency(forward, backward, fixed_hu, progress=part(check))
        elif check == "intensity":
            from RegistrationMisalignmentLib.checks.intensity import intensity_difference

            step = part(check)
            maps["intensity"] = intensity_difference(fixed_hu, moving_hu)
            step(1.0, "intensity difference")
        elif check == "reregistration":
            from RegistrationMisalignmentLib.checks.reregistration import reregistration_residual

            result = reregistration_residual(fixed_hu, moving_hu, mask=region, iterations=reregistration_iterations,
                                             threads=threads, python=python, progress=part(check), log=log)
            maps["residual"], maps["reregistration"] = result.residual_mm, result.classes
        seconds[check] = time.perf_counter() - start
    report(0.99, "summarising")
    summary = summarize(maps, region, region_name, plausible_range=plausible_range, pairs=pairs,
                        transform=None if landmarks_registered else forward)
    report(1.0, "done")
    return CheckResults(maps, region, summary, seconds)


__all__ = ["CHECKS", "MAPS_OF", "parse_checks", "default_checks", "CheckResults", "run_checks"]
