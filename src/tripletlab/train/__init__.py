"""Training: the :class:`Trainer` loop, its configuration (:class:`TrainConfig`, recipes), the
automatic defaults, the frozen-feature cache, the explicit-triplet trainer and the search over
recipes (``tune``)."""

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
from .collapse import CollapseDetector
from .config import TrainConfig, resolve_config
from .trainer import Trainer

__all__ = [
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
