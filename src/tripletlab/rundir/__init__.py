"""Every file of a run directory: ``config.json``, ``split.json``, weights (safetensors),
checkpoints, ``metrics.jsonl`` (``files.py``); the one sha256 manifest writer and verifier
(``manifest.py``); the environment block recorded with a run (``environment.py``)."""

from .files import (
    CHECKPOINT_FORMAT,
    append_metrics,
    load_checkpoint,
    load_dataset_for_run,
    load_run,
    load_weights,
    model_fingerprint,
    read_json,
    read_jsonl,
    save_checkpoint,
    save_weights,
    trim_metrics,
    write_run_config,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "append_metrics",
    "load_checkpoint",
    "load_dataset_for_run",
    "load_run",
    "load_weights",
    "model_fingerprint",
    "read_json",
    "read_jsonl",
    "save_checkpoint",
    "save_weights",
    "trim_metrics",
    "write_run_config",
]
