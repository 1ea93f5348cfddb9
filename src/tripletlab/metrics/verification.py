"""Face-verification metrics on pairs: ROC AUC, EER, TAR@FAR, accuracy and LFW 10-fold accuracy.

A pair (i, j) is declared "same identity" when its distance is at most a threshold t. With
same-identity pairs as positives: TAR(t) = P(d <= t | same), FAR(t) = P(d <= t | different).

* ``roc_auc``: area under the ROC curve of the score -d (equals scikit-learn's roc_auc_score).
* ``eer``: the rate where FAR = 1 - TAR (linear interpolation on the ROC curve).
* ``tar_at_far[f]``: the largest TAR whose FAR <= f.
* ``accuracy`` / ``threshold``: the best accuracy over all thresholds on all pairs, and that
  (distance) threshold — the calibrated value a deployment would use.
* ``accuracy_10fold_mean/std``: the LFW protocol (Huang et al. 2007): the pairs are split into 10
  folds (pair m goes to fold ``numpy.random.default_rng(seed).permutation(M)[m] % 10``); each
  fold is scored with the best-accuracy threshold of the other 9 (population std over folds).

``tar_at_far`` keys are the requested FAR values as floats; ``eer`` interpolates linearly between
the two ROC points around FAR = FRR.
"""

from __future__ import annotations

import numpy as np
import torch

from ..distances import rowwise_distance
from ..errors import InputError
from ..validation import as_embeddings, as_labels, check_distance, is_int

__all__ = ["best_threshold", "pair_distances", "pairs_from_labels", "verification_metrics"]


_MAX_ALL_PAIRS = 200_000_000


def _check_pairs(pairs, n: int) -> np.ndarray:
    p = np.asarray(pairs)
    if p.size == 0:
        p = p.reshape(0, 2)
    if p.ndim != 2 or p.shape[1] != 2:
        raise InputError(f"pairs must have shape (M, 2), got {p.shape}")
    if p.dtype.kind not in "iu":
        raise InputError(f"pairs must be integer indices, got dtype {p.dtype}")
    if p.size and (int(p.min()) < 0 or int(p.max()) >= n):
        raise InputError(f"pair indices out of range [0, {n})")
    return p.astype(np.int64)


def _check_pair_labels(pair_labels, m: int) -> np.ndarray:
    s = np.asarray(pair_labels)
    if s.ndim != 1 or s.shape[0] != m:
        raise InputError(f"pair_labels must have shape ({m},), got {s.shape}")
    if s.dtype.kind not in "biu" or (s.size and not np.isin(s, (0, 1)).all()):
        raise InputError("pair_labels must be booleans or 0/1 (1 = same identity)")
    return s.astype(bool)


def pairs_from_labels(labels, *, max_pairs: int | None = None, seed: int = 0) -> np.ndarray:
    """All pairs i < j (M, 2), or ``max_pairs`` distinct pairs drawn uniformly with ``seed``."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise InputError(f"labels must be 1-D, got shape {y.shape}")
    if max_pairs is not None and (not is_int(max_pairs) or max_pairs < 1):
        raise InputError(f"max_pairs must be a positive integer or None, got {max_pairs!r}")
    n = y.shape[0]
    total = n * (n - 1) // 2
    if max_pairs is None and total > _MAX_ALL_PAIRS:
        raise InputError(
            f"{n} items make {total:,} pairs, too many to enumerate; pass max_pairs to sample pairs"
        )
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
    """Distances of the index pairs ``(M, 2)`` as a float64 array (M,): euclidean, or cosine
    distance 1 - cos. Computed in float64 from the embeddings.

    Example:
        >>> import numpy as np
        >>> from tripletlab.metrics import pair_distances
        >>> pair_distances(np.array([[0.0, 1.0], [1.0, 0.0]]), [[0, 1]], distance="cosine")
        array([1.])
    """
    check_distance(distance)
    emb = as_embeddings(embeddings).double()
    p = torch.from_numpy(_check_pairs(pairs, emb.shape[0]))
    if p.numel() == 0:
        return np.zeros(0)
    out = torch.empty(p.shape[0], dtype=torch.float64)
    step = max(1, (1 << 22) // max(emb.shape[1], 1))  # bounded memory for millions of pairs
    for s in range(0, p.shape[0], step):
        a, b = emb[p[s : s + step, 0]], emb[p[s : s + step, 1]]
        out[s : s + step] = rowwise_distance(a, b, distance)
    return out.numpy()


def best_threshold(d: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """Distance threshold maximising the accuracy of ``same <=> d <= t``: ``(t, accuracy)``.

    Only cuts between distinct distances are considered (so ``d <= t`` reproduces the accuracy);
    t is the midpoint between the last accepted and the first rejected distance. Among equally
    good cuts the one accepting fewest pairs wins.
    """
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
    if n == 0:
        return 0.0, 0.0
    if i == 0:
        t = float(np.nextafter(ds[0], -np.inf))  # accept nothing
    elif i == n:
        t = float(ds[-1])
    else:
        t = float((ds[i - 1] + ds[i]) / 2.0)
        if not ds[i - 1] <= t < ds[i]:  # adjacent floats: the midpoint rounds onto ds[i]
            t = float(ds[i - 1])
    return t, float(correct[i]) / n


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
    """Verification metrics (see the module docstring for the definitions).

    Pairs come from ``embeddings`` + ``labels`` (all pairs i < j, or ``max_pairs`` distinct pairs
    drawn uniformly with ``seed`` when there are more), from explicit ``pairs`` (M, 2) with
    ``pair_labels`` (1 = same) or ``labels``, or from precomputed ``distances`` + ``pair_labels``.
    ``max_pairs`` defaults to 2,000,000 (not None) so that evaluating a large set stays bounded;
    pass ``None`` for all pairs. The folds of the 10-fold accuracy are drawn with ``seed``.
    ``return_curve`` adds ``fpr``, ``tpr`` and ``thresholds`` (distance thresholds, ascending;
    the first is -inf, accepting nothing) plus ``pair_distances`` and ``pair_same``.

    Example:
        >>> import torch
        >>> from tripletlab.metrics import verification_metrics
        >>> emb = torch.nn.functional.normalize(torch.randn(40, 8), dim=1)
        >>> m = verification_metrics(emb, torch.arange(8).repeat(5))
        >>> 0.0 <= m["roc_auc"] <= 1.0
        True
    """
    check_distance(distance)
    if not is_int(n_folds) or n_folds < 2:
        raise InputError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    try:
        fars = [float(f) for f in fars]
    except (TypeError, ValueError):
        raise InputError(f"fars must be a sequence of numbers, got {fars!r}") from None
    if not all(0.0 < f <= 1.0 for f in fars):
        raise InputError(f"fars must lie in (0, 1], got {fars}")
    if distances is not None:
        if embeddings is not None or pairs is not None:
            raise InputError("give either precomputed distances or embeddings/pairs, not both")
        if pair_labels is None:
            raise InputError("precomputed distances need pair_labels (1 = same identity)")
        d = np.asarray(distances)
        if d.ndim != 1 or d.dtype.kind not in "fiu":
            raise InputError(f"distances must be a 1-D numeric array, got shape {d.shape}")
        d = d.astype(np.float64)
        same = _check_pair_labels(pair_labels, d.shape[0])
    else:
        if embeddings is None:
            raise InputError("verification_metrics needs embeddings (or precomputed distances)")
        emb = as_embeddings(embeddings)
        if pairs is None:
            if labels is None:
                raise InputError("labels are needed unless pairs and pair_labels are given")
            y = as_labels(labels, emb.shape[0]).numpy()
            pairs = pairs_from_labels(y, max_pairs=max_pairs, seed=seed)
            same = y[pairs[:, 0]] == y[pairs[:, 1]]
        else:
            pairs = _check_pairs(pairs, emb.shape[0])
            if pair_labels is not None:
                same = _check_pair_labels(pair_labels, pairs.shape[0])
            elif labels is not None:
                y = as_labels(labels, emb.shape[0]).numpy()
                same = y[pairs[:, 0]] == y[pairs[:, 1]]
            else:
                raise InputError("explicit pairs need pair_labels or labels")
        d = pair_distances(emb, pairs, distance)
    if not np.isfinite(d).all():
        raise InputError("pair distances contain NaN or Inf")
    n_same, n_diff = int(same.sum()), int((~same).sum())
    if n_same == 0 or n_diff == 0:
        raise InputError(
            f"verification needs same and different pairs (got {n_same} same, {n_diff} different)"
        )
    fpr, tpr, thr, auc = _roc(d, same)
    # TPR and FPR grow with the threshold: the largest TAR with FAR <= f is the TAR at the
    # largest threshold with FAR <= f (roc_curve keeps every distinct threshold here)
    tar = {f: float(tpr[fpr <= f].max()) if (fpr <= f).any() else 0.0 for f in fars}
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
        # the error rates a deployment using ``threshold`` accepts (on these pairs)
        "far_at_threshold": float((d[~same] <= t).mean()),
        "tar_at_threshold": float((d[same] <= t).mean()),
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
