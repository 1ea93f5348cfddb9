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


class MissingDependencyError(TripletLabError, ImportError):
    """An optional package (an extra of ``pip install 'tripletlab[extra]'``) is not installed;
    the message names the feature, the package and the install line."""


#: the optional packages (import name -> (pip name, the extra that installs it; None: a core
#: dependency, reinstall tripletlab))
OPTIONAL_PACKAGES: dict[str, tuple[str, str | None]] = {
    "onnx": ("onnx", "serve"),
    "onnxruntime": ("onnxruntime", "serve"),
    "fastapi": ("fastapi", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "multipart": ("python-multipart", "serve"),
    "httpx": ("httpx", "serve"),
    "optuna": ("optuna", "tune"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "transformers": ("transformers", "text"),
    "sentence_transformers": ("sentence-transformers", "text"),
    "datasets": ("datasets", "text"),
    "pytorch_metric_learning": ("pytorch-metric-learning", "bench"),
    "faiss": ("faiss-cpu", None),
}


def missing_dependency(module: str, feature: str) -> MissingDependencyError:
    """The one error for a missing optional package: what needs it and the ``pip install``
    line (``module``: the import name, its top-level package is looked up in
    :data:`OPTIONAL_PACKAGES`).

    Example:
        >>> str(missing_dependency("onnx", "tripletlab export")).split(": ")[-1]
        "pip install 'tripletlab[serve]'"
    """
    top = module.split(".")[0]
    pip_name, extra = OPTIONAL_PACKAGES.get(top, (top, None))
    line = f"pip install 'tripletlab[{extra}]'" if extra else f"pip install {pip_name}"
    return MissingDependencyError(
        f"{feature} needs the Python package {pip_name!r}, which is not installed: {line}"
    )


def require(module: str, feature: str):
    """``importlib.import_module(module)``, or :func:`missing_dependency`'s error when it (or
    a package it needs) is not installed.

    Example:
        >>> require("json", "reading JSON").__name__
        'json'
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise missing_dependency(getattr(e, "name", None) or module, feature) from None
