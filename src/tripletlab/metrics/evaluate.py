"""Evaluation of embeddings and of a trained run: one result type from train to report and CLI.

``evaluate_embeddings`` computes retrieval,
verification and (when there are enough classes) few-shot metrics on one labelled set;
:class:`EvalResult` is the dict written to ``eval.json``, returned by ``Trainer.fit`` and read
by the report, the CLI and :class:`tripletlab.inference.Inference`; ``summary_lines`` is its
one-screen text form.

Example:
    >>> import torch
    >>> from tripletlab.metrics.evaluate import evaluate_embeddings
    >>> y = torch.arange(4).repeat_interleave(5)
    >>> emb = torch.nn.functional.one_hot(y, 8).float() + 0.01 * torch.randn(20, 8)
    >>> r = evaluate_embeddings(emb, y, "cosine", few_shot=False)
    >>> r["n_classes"], r["retrieval"]["precision_at_1"]
    (4, 1.0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

import torch

from ..errors import InputError
from . import few_shot_accuracy, retrieval_metrics, verification_metrics

__all__ = [
    "EvalResult",
    "eval_distance",
    "evaluate_embeddings",
    "summary_lines",
    "validation_threshold",
]


class EvalResult(TypedDict, total=False):
    """What ``Trainer.fit`` returns and ``eval.json`` holds (keys absent where not computed)."""

    evaluated: bool  # False only with --no-eval
    split: str  # "test"
    distance: str  # the evaluation distance (see eval_distance)
    train_time_s: float
    train_samples_per_s: float | None
    steps: int
    best_step: int
    best_val_map_at_r: float | None
    skipped_nonfinite_steps: int
    collapse: dict | None  # {"step", "mean_distance", "loss"} when collapse was detected
    n_items: int
    n_classes: int
    retrieval: dict[str, Any]  # retrieval_metrics
    verification: dict[str, Any]  # verification_metrics, or {"skipped": reason}
    few_shot: dict[str, Any]  # few_shot_accuracy
    retrieval_test_to_train: dict[str, Any]  # predefined splits: test queries vs train items
    threshold: float  # the calibrated verification threshold (distance <= threshold: same)
    training_items: int  # `tripletlab eval --data`: items that were in the run's training split
    report: str  # path of report.html (CLI only)


def eval_distance(model_config: dict) -> str:
    """Cosine for L2-normalised heads (equivalent ranking, bounded scale), else euclidean.

    Example:
        >>> eval_distance({"normalize": True}), eval_distance({"normalize": False})
        ('cosine', 'euclidean')
    """
    return "cosine" if model_config.get("normalize", True) else "euclidean"


def validation_threshold(
    emb: torch.Tensor, labels: torch.Tensor, distance: str, seed: int = 0
) -> dict | None:
    """The verification threshold calibrated on validation pairs (held-out training classes):
    ``{"threshold", "source": "validation", "validation_far", "validation_tar",
    "validation_accuracy", "validation_pairs"}``, or None when the set has no same/different
    pairs. Pass it to :func:`evaluate_embeddings` as ``calibration`` so the test figures are
    measured *at* this threshold instead of at the test split's own best one.

    Example:
        >>> y = torch.arange(4).repeat_interleave(3)
        >>> cal = validation_threshold(torch.nn.functional.one_hot(y, 4).float(), y, "cosine")
        >>> cal["source"], cal["validation_far"]
        ('validation', 0.0)
    """
    try:
        v = verification_metrics(emb, labels, distance=distance, seed=seed)
    except InputError:
        return None
    return {
        "threshold": float(v["threshold"]),
        "source": "validation",
        "validation_far": v["far_at_threshold"],
        "validation_tar": v["tar_at_threshold"],
        "validation_accuracy": v["accuracy"],
        "validation_pairs": v["n_pairs_same"] + v["n_pairs_diff"],
    }


def _verification(
    emb: torch.Tensor, labels: torch.Tensor, distance: str, seed: int, calibration: dict | None
) -> dict:
    """Verification metrics; with ``calibration`` the accuracy/FAR/TAR are those at its
    threshold, and the in-sample best threshold of this set is kept only for reference."""
    try:
        v = dict(
            verification_metrics(
                emb, labels, distance=distance, seed=seed, return_curve=calibration is not None
            )
        )
    except InputError as e:
        return {"skipped": str(e)}
    if calibration is None:
        v["threshold_source"] = "in-sample (best accuracy on these pairs; no validation split)"
        return v
    d, same = v.pop("pair_distances"), v.pop("pair_same")
    for key in ("fpr", "tpr", "thresholds"):
        v.pop(key)
    t = float(calibration["threshold"])
    v["in_sample_best_accuracy"], v["in_sample_best_threshold"] = v["accuracy"], v["threshold"]
    v.update(
        threshold=t,
        accuracy=float(((d <= t) == same).mean()),
        far_at_threshold=float((d[~same] <= t).mean()),
        tar_at_threshold=float((d[same] <= t).mean()),
        threshold_source=calibration.get("source", "given"),
        **{k: val for k, val in calibration.items() if k.startswith("validation_")},
    )
    return v


def evaluate_embeddings(
    emb: torch.Tensor,
    labels: torch.Tensor,
    distance: str,
    few_shot: bool = True,
    seed: int = 0,
    calibration: dict | None = None,
) -> EvalResult:
    """Retrieval + verification (+ few-shot when there are enough classes) on one set.

    ``calibration`` (see :func:`validation_threshold`): verification accuracy, TAR and FAR are
    reported at its threshold (``verification.threshold_source``); without it the threshold is
    the best one on these pairs, which is in-sample and optimistic."""
    out: EvalResult = {
        "n_items": int(emb.shape[0]),
        "n_classes": int(torch.unique(labels).numel()),
    }
    out["retrieval"] = retrieval_metrics(
        emb, labels, ks=(1, 2, 4, 8), distance=distance, nmi=emb.shape[0] <= 20000, seed=seed
    )
    out["verification"] = _verification(emb, labels, distance, seed, calibration)
    if few_shot:
        counts = torch.bincount(labels)
        n_ok = int((counts >= 2).sum())
        if n_ok >= 2:
            out["few_shot"] = few_shot_accuracy(
                emb,
                labels,
                n_way=min(20 if n_ok >= 20 else 5, n_ok),
                k_shot=1,
                n_query=max(1, min(5, int(counts[counts >= 2].min()) - 1)),
                n_episodes=300,
                seed=seed,
                distance=distance,
            )
    return out


def _training_line(result: EvalResult) -> str:
    best = result.get("best_step")
    sps = result.get("train_samples_per_s")
    return (
        f"trained {result.get('steps')} steps in {result.get('train_time_s', 0):.1f}s "
        + (f"({sps:.0f} samples/s) " if isinstance(sps, float) else "")
        + (
            f"(best validation step {best})"
            if isinstance(best, int) and best >= 0
            else "(no validation: the final model is kept)"
        )
    )


def summary_lines(result: EvalResult, run_dir: str | Path, training: bool = True) -> list[str]:
    """A one-screen summary of a run's evaluation (``training=False``: metrics only, e.g. for
    ``tripletlab eval``)."""
    lines = [f"run: {run_dir}"]
    if training:
        lines.append(_training_line(result))
    if result.get("evaluated") is False:
        lines.append(
            f"evaluation skipped (--no-eval): `tripletlab eval --model {run_dir}` evaluates "
            "the test split; `tripletlab verify` then needs --threshold"
        )
        return lines
    lines.append(
        f"test: {result.get('n_items', 0)} items, {result.get('n_classes', 0)} classes, "
        f"distance {result.get('distance')}"
    )
    if "triplet_accuracy" in result:  # a triplet-file run
        lines.append(
            f"triplets: accuracy {result['triplet_accuracy']:.4f} (share with d(a,p) < d(a,n)) "
            f"over {result.get('n_triplets', 0)} held-out triplets; mean d(a,p) "
            f"{result.get('mean_d_ap', 0):.4f}, d(a,n) {result.get('mean_d_an', 0):.4f}"
        )
    r2 = result.get("retrieval_test_to_train")
    if r2:
        lines.append(
            "retrieval test -> train: "
            + ", ".join(f"{k}={r2[k]:.4f}" for k in ("recall_at_1", "recall_at_4", "map_at_r"))
        )
    r = result.get("retrieval", {})
    if r:
        keys = ("precision_at_1", "recall_at_4", "r_precision", "map_at_r", "nmi")
        lines.append(
            "retrieval: "
            + ", ".join(f"{k}={r[k]:.4f}" for k in keys if isinstance(r.get(k), float))
        )
    leak = result.get("training_items")
    if leak:
        lines.append(
            f"WARNING: {leak} of these {result.get('n_items', 0)} items were used in training "
            "(compared with the run's split.json): the metrics are inflated"
        )
    v = result.get("verification", {})
    if "roc_auc" in v:
        tar = v.get("tar_at_far", {})
        lines.append(
            f"verification: ROC AUC={v['roc_auc']:.4f}, EER={100 * v['eer']:.2f}%, "
            + ", ".join(f"TAR@FAR={float(k):g}: {t:.3f}" for k, t in tar.items())
        )
        src = v.get("threshold_source", "in-sample")
        where = (
            f"calibrated on the validation split (FAR there {v['validation_far']:.3f})"
            if src == "validation"
            else src
        )
        lines.append(
            f"threshold {v['threshold']:.4f} {where}: test accuracy={v['accuracy']:.4f}, "
            f"TAR={v.get('tar_at_threshold', float('nan')):.3f}, "
            f"FAR={v.get('far_at_threshold', float('nan')):.3f}"
        )
    fs = result.get("few_shot")
    if fs:
        lines.append(
            f"few-shot: {fs['n_way']}-way {fs['k_shot']}-shot accuracy "
            f"{fs['accuracy']:.4f} ± {fs['ci95']:.4f}"
        )
    if result.get("collapse"):
        lines.append(f"WARNING: embedding collapse detected: {result['collapse']}")
    if result.get("skipped_nonfinite_steps"):
        lines.append(f"skipped {result['skipped_nonfinite_steps']} non-finite steps")
    return lines
