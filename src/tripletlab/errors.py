"""Exception types raised by tripletlab.

Every error that a user can cause (bad input, bad file, bad option) is a :class:`TripletLabError`,
so the command line can print its message and exit 1 without a traceback. Subclasses also derive
from the matching built-in type (``ValueError``, ``TypeError``, ``FileNotFoundError``) so that
plain Python code can catch them the usual way.
"""

from __future__ import annotations


class TripletLabError(Exception):
    """Base class of all errors tripletlab raises on purpose."""


class InputError(TripletLabError, ValueError):
    """An argument has the wrong shape, dtype, value or name (e.g. NaN embeddings)."""


class UsageError(InputError):
    """A command was called wrongly (missing or conflicting arguments); the CLI exits 2."""


class InputTypeError(TripletLabError, TypeError):
    """An argument has the wrong type (e.g. float labels where integer labels are required)."""


class FileFormatError(TripletLabError, ValueError):
    """A file exists but is unreadable, truncated, corrupt or of the wrong kind."""


class MissingFileError(TripletLabError, FileNotFoundError):
    """A required file or directory does not exist."""


class NonFiniteError(TripletLabError):
    """The loss or a gradient became NaN/Inf during training."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training was stopped with Ctrl-C (SIGINT); the message gives the step of the saved
    checkpoint and the command that continues the run. A ``KeyboardInterrupt``, so code that
    stops on Ctrl-C keeps doing so."""

    def __init__(self, message: str, step: int, run_dir: str) -> None:
        super().__init__(message)
        self.step = step
        self.run_dir = run_dir
