"""Face-verification metrics on pairs: ROC AUC, EER, TAR@FAR, accuracy and LFW 10-fold accuracy.

A pair (i, j) is declared "same identity" when its distance is at most a threshold t. With
same-identity pairs as positives: TAR(t) = P(d <= t | same), FAR(t) = P(d <= t | different).

* ``roc_auc``: area under the ROC curve of the score -d (equals scikit-learn's roc_auc_score).
* ``eer``: the rate where FAR = 1 - TAR (linear interpolation on the ROC curve).
* ``tar_at_far[f]``: the largest TAR whose FAR <= f.
* ``accuracy`` / ``threshold``: the best accuracy over all thresholds on all pairs, and that
  (distance) threshold — the calibrated value a deployment would use.
* ``accuracy_10fold_mean/std``: the LFW protocol (Huang et al. 2007): the pairs are split into 10
  seeded folds; for each fold the best threshold on the other 9 is applied to it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from ._common import as_embeddings, as_labels, check_distance

__all__ = ["best_threshold", "pair_distances", "pairs_from_labels", "verification_metrics"]


def pairs_from_labels(labels, *, max_pairs: int | None = None, seed: int = 0) -> np.ndarray:
    """All pairs i < j (M, 2), or ``max_pairs`` distinct pairs drawn uniformly with ``seed``."""
    y = np.asarray(labels)
    n = y.shape[0]
    total = n * (n - 1) // 2
    if max_pairs is None or total <= max_pairs:
        i, j = np.triu_indices(n, k=1)
        return np.stack([i, j], axis=1)
    rng = np.random.default_rng(seed)
    chosen = np.unique(rng.integers(0, total, size=int(max_pairs * 1.2) + 16))
    while chosen.size < max_pairs:
        chosen = np.unique(np.concatenate([chosen, rng.integers(0, total, size=max_pairs)]))
    chosen = np.sort(rng.choice(chosen, size=max_pairs, replace=False))
    # invert the row-major numbering of the upper triangle
    i = (n - 2 - np.floor(np.sqrt(-8 * chosen + 4 * n * (n - 1) - 7) / 2.0 - 0.5)).astype(np.int64)
    j = (chosen + i + 1 - n * (n - 1) // 2 + (n - i) * ((n - i) - 1) // 2).astype(np.int64)
    return np.stack([i, j], axis=1)


def pair_distances(embeddings, pairs, distance: str = "cosine") -> np.ndarray:
    """Distances of the given index pairs (M,) in float64."""
    check_distance(distance)
    emb = as_embeddings(embeddings).double()
    p = torch.as_tensor(np.asarray(pairs), dtype=torch.long)
    if p.numel() == 0:
        return np.zeros(0)
    if p.dim() != 2 or p.shape[1] != 2:
        raise InputError(f"pairs must have shape (M, 2), got {tuple(p.shape)}")
    if int(p.min()) < 0 or int(p.max()) >= emb.shape[0]:
        raise InputError(f"pair indices out of range [0, {emb.shape[0]})")
    a, b = emb[p[:, 0]], emb[p[:, 1]]
    if distance == "cosine":
        a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-300)
        b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return (1.0 - (a * b).sum(1)).clamp(0, 2).numpy()
    return (a - b).norm(dim=1).numpy()


def best_threshold(d: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """Distance threshold maximising accuracy of ``same <=> d <= t``; returns (t, accuracy)."""
    order = np.argsort(d, kind="stable")
    ds, ss = d[order], same[order].astype(np.int64)
    n = len(ds)
    n_diff = n - int(ss.sum())
    # accept the first i items (all with d <= ds[i-1]); only cut between distinct distances
    tp = np.concatenate([[0], np.cumsum(ss)])
    fp = np.concatenate([[0], np.cumsum(1 - ss)])
    correct = tp + (n_diff - fp)
    cut_ok = np.ones(n + 1, dtype=bool)
    cut_ok[1:n] = ds[1:] > ds[:-1]
    correct = np.where(cut_ok, correct, -1)
    i = int(np.argmax(correct))
    if i == 0:
        t = float(ds[0]) - 1e-12 if n else 0.0
    elif i == n:
        t = float(ds[-1])
    else:
        t = float((ds[i - 1] + ds[i]) / 2.0)
    return t, float(correct[i]) / max(n, 1)


def _roc(d: np.ndarray, same: np.ndarray):
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, thr = roc_curve(same.astype(int), -d, drop_intermediate=False)
    auc = float(roc_auc_score(same.astype(int), -d))
    return fpr, tpr, -thr, auc


def _eer(fpr: np.ndarray, tpr: np.ndarray) -> float:
    fnr = 1.0 - tpr
    diff = fpr - fnr  # increasing along the curve
    k = int(np.searchsorted(diff, 0.0))
    if k == 0:
        return float((fpr[0] + fnr[0]) / 2)
    if k >= len(diff):
        return float((fpr[-1] + fnr[-1]) / 2)
    x0, x1 = diff[k - 1], diff[k]
    w = 0.0 if x1 == x0 else -x0 / (x1 - x0)
    return float(fpr[k - 1] + w * (fpr[k] - fpr[k - 1]))


def verification_metrics(
    embeddings=None,
    labels=None,
    *,
    distance: str = "cosine",
    pairs=None,
    pair_labels=None,
    distances=None,
    max_pairs: int | None = 2_000_000,
    seed: int = 0,
    fars=(1e-3, 1e-2),
    n_folds: int = 10,
    return_curve: bool = False,
) -> dict:
    """Verification metrics from embeddings + labels (all pairs, or ``max_pairs`` sampled), from
    explicit ``pairs`` (M, 2) with ``pair_labels`` (1 = same), or from precomputed ``distances``.

    Example:
        >>> import torch
        >>> from tripletlab.metrics import verification_metrics
        >>> emb = torch.nn.functional.normalize(torch.randn(40, 8), dim=1)
        >>> m = verification_metrics(emb, torch.arange(8).repeat(5))
        >>> 0.0 <= m["roc_auc"] <= 1.0
        True
    """
    check_distance(distance)
    if distances is not None:
        d = np.asarray(distances, dtype=np.float64)
        same = np.asarray(pair_labels).astype(bool)
    else:
        emb = as_embeddings(embeddings)
        if pairs is None:
            y = as_labels(labels, emb.shape[0]).numpy()
            pairs = pairs_from_labels(y, max_pairs=max_pairs, seed=seed)
            same = y[pairs[:, 0]] == y[pairs[:, 1]]
        else:
            pairs = np.asarray(pairs)
            if pair_labels is None:
                y = as_labels(labels, emb.shape[0]).numpy()
                same = y[pairs[:, 0]] == y[pairs[:, 1]]
            else:
                same = np.asarray(pair_labels).astype(bool)
        d = pair_distances(emb, pairs, distance)
    if d.shape != same.shape:
        raise InputError(f"{d.shape[0]} distances but {same.shape[0]} pair labels")
    if not np.isfinite(d).all():
        raise InputError("pair distances contain NaN or Inf")
    n_same, n_diff = int(same.sum()), int((~same).sum())
    if n_same == 0 or n_diff == 0:
        raise InputError(
            f"verification needs same and different pairs (got {n_same} same, {n_diff} different)"
        )
    fpr, tpr, thr, auc = _roc(d, same)
    tar = {float(f): float(tpr[fpr <= f].max()) if (fpr <= f).any() else 0.0 for f in fars}
    t, acc = best_threshold(d, same)
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(d)) % n_folds
    accs = []
    for f in range(n_folds):
        test = fold == f
        if test.sum() == 0 or (~test).sum() == 0:
            continue
        tf, _ = best_threshold(d[~test], same[~test])
        accs.append(float(((d[test] <= tf) == same[test]).mean()))
    out = {
        "roc_auc": auc,
        "eer": _eer(fpr, tpr),
        "tar_at_far": tar,
        "accuracy": acc,
        "threshold": t,
        "accuracy_10fold_mean": float(np.mean(accs)),
        "accuracy_10fold_std": float(np.std(accs)),
        "n_pairs_same": n_same,
        "n_pairs_diff": n_diff,
        "distance": distance,
        "d_same_mean": float(d[same].mean()),
        "d_diff_mean": float(d[~same].mean()),
    }
    if return_curve:
        out.update(fpr=fpr, tpr=tpr, thresholds=thr, pair_distances=d, pair_same=same)
    return out
