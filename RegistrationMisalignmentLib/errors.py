"""The two exceptions a caller has to tell apart from a bug.

``InputError`` is anything the *user* can fix (a missing file, a 2-D image, images that do not
overlap...). Its message names the input and the fix; the CLI turns it into exit code 2 and the
Slicer panel into a message box. Every other exception is an internal error (exit code 1).
"""


class InputError(ValueError):
    """Bad user input: the message says which input and what to do about it."""


class PredictionCancelled(RuntimeError):
    """The caller's cancel flag was raised; nothing was written."""
