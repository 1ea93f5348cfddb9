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
from .verification import calibrate_threshold

__all__ = [
    "EvalResult",
    "eval_distance",
    "evaluate_embeddings",
    "calibration_lines",
    "degenerate_verification",
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
    postprocess: dict[str, Any]  # the post-processing used and the retrieval metrics after it
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
    emb: torch.Tensor,
    labels: torch.Tensor,
    distance: str,
    seed: int = 0,
    target_far: float = 0.01,
    rule: str = "target-far",
) -> dict | None:
    """The verification threshold calibrated on validation pairs (held-out training classes,
    all of them) for ``target_far`` (or ``rule="best-accuracy"``), see
    :func:`~tripletlab.metrics.verification.calibrate_threshold`: ``{"threshold", "source":
    "validation", "rule", "target_far", "validation_far", "validation_far_ci",
    "validation_tar", "validation_tar_ci", "validation_accuracy", "validation_pairs",
    "validation_impostor_pairs", "validation_identities", "validation_interval",
    "validation_warning"}``, or None when the set has no same/different pairs. Pass it to
    :func:`evaluate_embeddings` as ``calibration`` so the test figures are measured *at* this
    threshold instead of at the test split's own best one.

    Example:
        >>> y = torch.arange(4).repeat_interleave(3)
        >>> cal = validation_threshold(torch.nn.functional.one_hot(y, 4).float(), y, "cosine")
        >>> cal["source"], cal["validation_far"], cal["validation_warning"] is not None
        ('validation', 0.0, True)
    """
    try:
        c = calibrate_threshold(
            emb, labels, distance=distance, target_far=target_far, rule=rule, seed=seed
        )
    except InputError:
        return None
    return {
        "threshold": c["threshold"],
        "source": "validation",
        "rule": c["rule"],
        "target_far": c["target_far"],
        "validation_far": c["far"],
        "validation_far_ci": c["far_ci"],
        "validation_tar": c["tar"],
        "validation_tar_ci": c["tar_ci"],
        "validation_accuracy": c["accuracy"],
        "validation_pairs": c["n_pairs_same"] + c["n_pairs_diff"],
        "validation_impostor_pairs": c["n_pairs_diff"],
        "validation_identities": c["n_identities"],
        "validation_interval": c["interval"],
        "validation_warning": c["warning"],
    }


def calibration_lines(v: dict) -> list[str]:
    """How a verification block's threshold was chosen, in one line (plus one warning line when
    its validation set is too small for its target), e.g. for ``tripletlab eval`` and ``train``.

    Example:
        >>> calibration_lines({"threshold": 0.5, "threshold_source": "validation",
        ...     "threshold_rule": "target-far", "target_far": 0.01, "validation_far": 0.01,
        ...     "validation_far_ci": [0.0, 0.05], "validation_identities": 5})[0][:56]
        'threshold 0.5000 for FAR 0.01 on 5 validation identities'
    """
    if v.get("threshold_source") != "validation":
        return [f"threshold {v['threshold']:.4f} {v.get('threshold_source', 'in-sample')}"]
    rule = v.get("threshold_rule")
    how = (
        f"for FAR {v.get('target_far', 0.01):g}"
        if rule == "target-far"
        else "for best accuracy"
        if rule == "best-accuracy"
        else "calibrated"
    )
    n_id = v.get("validation_identities")
    on = f"on {n_id} validation identities" if n_id else "on the validation split"
    ci = v.get("validation_far_ci")
    interval = f", 95% interval {ci[0]:.3f}-{ci[1]:.3f}" if ci else ""
    lines = [
        f"threshold {v['threshold']:.4f} {how} {on} (FAR there {v['validation_far']:.3f}{interval})"
    ]
    if v.get("validation_warning"):
        lines.append(f"WARNING: {v['validation_warning']}")
    return lines


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
        **{
            ("threshold_rule" if k == "rule" else k): calibration[k]
            for k in ("rule", "target_far")
            if k in calibration
        },
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
    postprocess: dict | str | None = None,
    groups=None,
) -> EvalResult:
    """Retrieval + verification (+ few-shot when there are enough classes) on one set.

    ``calibration`` (see :func:`validation_threshold`): verification accuracy, TAR and FAR are
    reported at its threshold (``verification.threshold_source``); without it the threshold is
    the best one on these pairs, which is in-sample and optimistic. ``groups`` (one per item:
    camera, session): retrieval excludes each query's own group (see
    :func:`~tripletlab.metrics.retrieval_metrics`; mAP and mINP come with the automatic full
    ranking); verification and few-shot do not use them. ``postprocess``: a spec
    (``"dba:k=3"``) or a run's record of one (``eval.json["postprocess"]``); the result then
    holds ``"postprocess"``: that record plus the retrieval metric keys after it (see
    :func:`postprocess_block`), beside the raw keys."""
    out: EvalResult = {
        "n_items": int(emb.shape[0]),
        "n_classes": int(torch.unique(labels).numel()),
    }
    out["retrieval"] = retrieval_metrics(
        emb, labels, ks=(1, 2, 4, 8), distance=distance, nmi=emb.shape[0] <= 20000, seed=seed,
        groups=groups,
    )  # fmt: skip
    if postprocess is not None:
        out["postprocess"] = postprocess_block(
            emb, labels, distance, postprocess, out["retrieval"], groups=groups
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


#: the retrieval keys a post-processed block repeats (after post-processing)
POSTPROCESS_KEYS = ("precision_at_1", "r_precision", "map_at_r", "mean_average_precision", "minp")


def postprocess_block(
    emb: torch.Tensor,
    labels: torch.Tensor,
    distance: str,
    post: dict | str,
    raw: dict,
    groups: Any = None,
) -> dict:
    """``post`` (a spec, or a record with ``"spec"``) plus the leave-one-out retrieval metrics
    after it (:func:`~tripletlab.metrics.postprocess_select.postprocessed_metrics`); for
    ``none`` the raw ones (``raw``, the :func:`retrieval_metrics` result of the same set).

    Example:
        >>> y = torch.arange(4).repeat_interleave(3)
        >>> emb = torch.nn.functional.one_hot(y, 4).float()
        >>> postprocess_block(emb, y, "cosine", "aqe:k=1", {})["spec"]
        'aqe:k=1,alpha=3.0'
    """
    from .postprocess import parse_postprocess
    from .postprocess_select import postprocessed_metrics

    record = dict(post) if isinstance(post, dict) else {}
    spec = parse_postprocess(record.get("spec", post) if record else post)
    if not record:
        record = {"method": spec.method, "params": dict(spec.params), "spec": str(spec)}
    if spec.method == "none":
        metrics = raw
    else:
        try:
            metrics = postprocessed_metrics(emb, labels, spec, distance=distance, groups=groups)
        except InputError as e:
            return {**record, "skipped": str(e)}
    keys = [k for k in metrics if k in POSTPROCESS_KEYS or k.startswith("recall_at_")]
    return {**record, **{k: metrics[k] for k in keys}}


def postprocess_line(post: dict, raw: dict) -> str:
    """One line: the post-processing, how it was chosen and what it changed.

    Example:
        >>> postprocess_line({"spec": "none", "chosen_by": "validation", "best_candidate":
        ...  "dba:k=3,alpha=3.0", "validation_gain": 0.002, "validation_gain_se": 0.004}, {})[:63]
        'post-processing: none (chosen on validation: the best candidate'
    """
    spec, by = post.get("spec", "none"), post.get("chosen_by")
    gain, se = post.get("validation_gain"), post.get("validation_gain_se")
    # SE: None (JSON null) where fewer than 2 validation classes gave no estimate of the noise
    if post.get("skipped"):
        how = f"({post['skipped']})"
    elif by == "validation" and spec == "none" and isinstance(gain, float):
        bar = (
            f"within the noise, 2 x SE {se:.4f}"
            if isinstance(se, float)
            else "one validation class: no estimate of the noise, nothing kept"
        )
        how = (
            f"(chosen on validation: the best candidate, {post.get('best_candidate')}, gained "
            f"{gain:+.4f} MAP@R there, {bar})"
        )
    elif by == "validation" and isinstance(gain, float):
        how = f"(chosen on validation: {gain:+.4f} MAP@R there, bootstrap SE {se:.4f})"
    elif by == "user":
        how = "(given)" + (f", {gain:+.4f} MAP@R on validation" if isinstance(gain, float) else "")
    else:
        how = f"({by})" if by else ""
    line = f"post-processing: {spec} {how}".rstrip()
    if spec != "none" and isinstance(post.get("map_at_r"), float) and "map_at_r" in raw:
        line += (
            f"; MAP@R {raw['map_at_r']:.4f} -> {post['map_at_r']:.4f}, P@1 "
            f"{raw['precision_at_1']:.4f} -> {post['precision_at_1']:.4f}"
        )
    return line


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


def degenerate_verification(v: dict, eps: float = 0.02) -> str | None:
    """A sentence when the verification at the threshold is degenerate: TAR and FAR both ~1
    (everything accepted) or both ~0 (everything rejected), e.g. inputs prepared unlike the
    training images; else None.

    Example:
        >>> degenerate_verification({"tar_at_threshold": 1.0, "far_at_threshold": 0.995})[:30]
        'degenerate result: TAR 1.000 a'
        >>> degenerate_verification({"tar_at_threshold": 0.9, "far_at_threshold": 0.01}) is None
        True
    """
    tar, far = v.get("tar_at_threshold"), v.get("far_at_threshold")
    if not isinstance(tar, float) or not isinstance(far, float):
        return None
    if tar >= 1 - eps and far >= 1 - eps:
        what = "accepts almost every pair"
    elif tar <= eps and far <= eps:
        what = "rejects almost every pair"
    else:
        return None
    return (
        f"degenerate result: TAR {tar:.3f} and FAR {far:.3f} - the threshold {what}; are these "
        "inputs like the training images (size, crop, kind)?"
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
    # `tripletlab eval --data DIR` scores a folder of the user's, not the run's test split
    label = "test" if result.get("split", "test") == "test" else "data"
    where = f" ({result['data']})" if label == "data" and result.get("data") else ""
    lines.append(
        f"{label}{where}: {result.get('n_items', 0)} items, {result.get('n_classes', 0)} "
        f"classes, distance {result.get('distance')}"
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
        keys = ("precision_at_1", "recall_at_4", "r_precision", "map_at_r")
        keys += ("mean_average_precision", "minp", "nmi")
        short = {"mean_average_precision": "mAP", "minp": "mINP"}
        lines.append(
            "retrieval: "
            + ", ".join(
                f"{short.get(k, k)}={r[k]:.4f}" for k in keys if isinstance(r.get(k), float)
            )
            + (
                f" ({r['groups']} groups: each query's own group left out of its gallery)"
                if r.get("groups")
                else ""
            )
        )
    post = result.get("postprocess")
    if post:
        lines.append(postprocess_line(post, r))
    v = result.get("verification", {})
    if "roc_auc" in v:
        tar = v.get("tar_at_far", {})
        lines.append(
            f"verification: ROC AUC={v['roc_auc']:.4f}, EER={100 * v['eer']:.2f}%, "
            + ", ".join(f"TAR@FAR={float(k):g}: {t:.3f}" for k, t in tar.items())
        )
        cal = calibration_lines(v)
        lines.append(
            f"{cal[0]}: {label} accuracy={v['accuracy']:.4f}, "
            f"TAR={v.get('tar_at_threshold', float('nan')):.3f}, "
            f"FAR={v.get('far_at_threshold', float('nan')):.3f}"
        )
        lines.extend(cal[1:])
    fs = result.get("few_shot")
    if fs:
        lines.append(
            f"few-shot: {fs['n_way']}-way {fs['k_shot']}-shot accuracy "
            f"{fs['accuracy']:.4f} ± {fs['ci95']:.4f}"
        )
    degenerate = degenerate_verification(v)
    if degenerate:
        lines.append(f"WARNING: {degenerate}")
    leak = result.get("training_items")
    if leak:  # after the table, not inside it
        lines.append(
            f"WARNING: {leak} of these {result.get('n_items', 0)} items were used in training "
            "(compared with the run's split.json): the metrics are inflated"
        )
    if result.get("collapse"):
        lines.append(f"WARNING: embedding collapse detected: {result['collapse']}")
    if result.get("skipped_nonfinite_steps"):
        lines.append(f"skipped {result['skipped_nonfinite_steps']} non-finite steps")
    return lines
