"""Evaluation: retrieval (P@1, Recall@K, R-Precision, MAP@R, NMI), verification (ROC AUC, EER,
TAR@FAR, 10-fold accuracy) and few-shot (N-way K-shot) metrics."""

from .fewshot import few_shot_accuracy
from .retrieval import knn_search, nmi_score, retrieval_metrics
from .verification import (
    best_threshold,
    calibrate_threshold,
    pair_distances,
    pairs_from_labels,
    verification_metrics,
)

__all__ = [
    "best_threshold",
    "calibrate_threshold",
    "few_shot_accuracy",
    "knn_search",
    "nmi_score",
    "pair_distances",
    "pairs_from_labels",
    "retrieval_metrics",
    "verification_metrics",
]
