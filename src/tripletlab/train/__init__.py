"""Training: the :class:`Trainer` loop (``trainer.py``), what it is built from (``build.py``),
its batches (``batches.py``), callbacks (``callbacks.py``: :data:`STOP` stops a run),
checkpoints (``checkpoint.py``) and evaluators (``evaluation.py``); its configuration
(:class:`TrainConfig`, recipes), the automatic defaults, the frozen-feature cache, the
explicit-triplet task and the search over recipes (``tune``)."""

from ..errors import NonFiniteError
from ..inference.embed import embed
from ..metrics.evaluate import eval_distance, evaluate_embeddings, summary_lines
from ..rundir import (
    load_checkpoint,
    load_dataset_for_run,
    load_run,
    model_fingerprint,
    save_checkpoint,
)
from .callbacks import STOP
from .collapse import CollapseDetector
from .config import TrainConfig, resolve_config
from .trainer import Trainer

__all__ = [
    "STOP",
    "CollapseDetector",
    "NonFiniteError",
    "TrainConfig",
    "Trainer",
    "embed",
    "eval_distance",
    "evaluate_embeddings",
    "load_checkpoint",
    "load_dataset_for_run",
    "load_run",
    "model_fingerprint",
    "resolve_config",
    "save_checkpoint",
    "summary_lines",
]
