"""Every file of a run directory: ``config.json``, ``split.json``, weights (safetensors),
checkpoints, ``metrics.jsonl`` (``files.py``); the one sha256 manifest writer and verifier
(``manifest.py``); the environment block recorded with a run (``environment.py``)."""

from . import files
from .files import *  # noqa: F403 - the run-directory functions (files.__all__)

__all__ = list(files.__all__)
