"""Progress and cancel for long work: one callback (fraction, message), one flag, checked the same way.

Shared by ``inference.predict`` and the registration checks; free of torch, so that the checks that need
no network (Jacobian, inverse consistency, intensity, re-registration) run where torch is missing.
``part`` maps a step's own 0..1 onto its share of a longer run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from RegistrationMisalignmentLib.errors import PredictionCancelled

Progress = Callable[[float, str], None]
Cancel = Callable[[], bool] | threading.Event


def is_cancelled(cancel: Cancel | None) -> bool:
    """Whether ``cancel`` (a callable returning bool, or a ``threading.Event``) is raised."""
    if cancel is None:
        return False
    return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())


class Reporter:
    """``reporter(fraction, message)`` raises ``PredictionCancelled`` when cancelled, else reports progress."""

    def __init__(self, progress: Progress | None = None, cancel: Cancel | None = None,
                 span: tuple[float, float] = (0.0, 1.0)):
        self.progress, self.cancel, self.span = progress, cancel, span

    def __call__(self, fraction: float, message: str) -> None:
        if is_cancelled(self.cancel):
            raise PredictionCancelled("cancelled")
        if self.progress is not None:
            lo, hi = self.span
            self.progress(lo + (hi - lo) * min(max(float(fraction), 0.0), 1.0), message)

    def part(self, lo: float, hi: float) -> "Reporter":
        """A reporter whose 0..1 covers [lo, hi] of this one's span."""
        a, b = self.span
        return Reporter(self.progress, self.cancel, (a + (b - a) * lo, a + (b - a) * hi))

    def cancelled(self) -> bool:
        return is_cancelled(self.cancel)
