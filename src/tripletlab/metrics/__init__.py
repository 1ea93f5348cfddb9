"""Evaluation: retrieval (P@1, Recall@K, R-Precision, MAP@R, NMI), verification (ROC AUC, EER,
TAR@FAR, 10-fold accuracy) and few-shot (N-way K-shot) metrics; retrieval post-processing (query
expansion, database-side augmentation, k-reciprocal re-ranking) and its choice on validation."""

from .fewshot import few_shot_accuracy
from .per_class import per_class_retrieval
from .postprocess import (
    PostProcess,
    alpha_query_expansion,
    apply_postprocess,
    database_augmentation,
    k_reciprocal_rerank,
    parse_postprocess,
)
from .postprocess_select import choose_postprocess, postprocessed_metrics
from .retrieval import knn_search, nmi_score, ranking_metrics, retrieval_metrics
from .verification import (
    best_threshold,
    calibrate_threshold,
    pair_distances,
    pairs_from_labels,
    verification_metrics,
)

__all__ = [
    "PostProcess",
    "alpha_query_expansion",
    "apply_postprocess",
    "best_threshold",
    "calibrate_threshold",
    "choose_postprocess",
    "database_augmentation",
    "few_shot_accuracy",
    "k_reciprocal_rerank",
    "knn_search",
    "nmi_score",
    "pair_distances",
    "pairs_from_labels",
    "parse_postprocess",
    "per_class_retrieval",
    "postprocessed_metrics",
    "ranking_metrics",
    "retrieval_metrics",
    "verification_metrics",
]
