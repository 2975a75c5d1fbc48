"""Run one long call on a worker thread while the GUI thread polls it.

Qt widgets and the MRML scene may only be touched from the GUI thread, so the worker only runs
pure computation (the Lib's ``predict``) and leaves its progress, log lines and outcome here; the
panel reads them from a QTimer and does all scene work itself once the job is done.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

Progress = Callable[[float, str], None]
Cancel = Callable[[], bool]
Log = Callable[[str], None]


class BackgroundJob:
    """``work(progress, cancel, log)`` on a daemon thread; result or exception kept for the caller."""

    def __init__(self, work: Callable[[Progress, Cancel, Log], Any]) -> None:
        self._work = work
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._progress: tuple[float, str] = (0.0, "")
        self._log: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="RegistrationMisalignment", daemon=True)
        self.result: Any = None
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        """Ask the work to stop at its next cancel check."""
        self._cancel.set()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the work ends (for scripts and tests); True if it has."""
        self._thread.join(timeout)
        return self.done()

    def progress(self) -> tuple[float, str]:
        """Latest (fraction done, message)."""
        with self._lock:
            return self._progress

    def log_lines(self) -> list[str]:
        """Log lines written since the last call."""
        lines = []
        while not self._log.empty():
            lines.append(self._log.get())
        return lines

    def _set_progress(self, fraction: float, message: str) -> None:
        with self._lock:
            self._progress = (float(fraction), message)

    def _run(self) -> None:
        try:
            self.result = self._work(self._set_progress, self._cancel.is_set, self._log.put)
        except BaseException as error:  # handed to the GUI thread, which reports it
            self.error = error
