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

Calibration (:func:`calibrate_threshold`): the deployment threshold is chosen on held-out
identities for a target false-accept rate (the largest t whose FAR on the impostor pairs is at
most the target; ``rule="best-accuracy"`` on request), and its FAR/TAR come with a 95% interval
from an *identity-level* bootstrap (Efron's percentile bootstrap, resampling whole identities:
impostor pairs sharing an identity are not independent, so a binomial interval over pairs would
be too narrow). The threshold is held fixed in the bootstrap.
"""

from __future__ import annotations

import numpy as np
import torch

from ..distances import rowwise_distance
from ..errors import InputError
from ..validation import as_embeddings, as_labels, check_distance, is_int

__all__ = [
    "THRESHOLD_RULES",
    "best_threshold",
    "calibrate_threshold",
    "identity_bootstrap",
    "pair_distances",
    "pairs_from_labels",
    "threshold_at_far",
    "verification_metrics",
]

#: how a deployment threshold is chosen (see :func:`calibrate_threshold`)
THRESHOLD_RULES = ("target-far", "best-accuracy")
#: fewer held-out identities than this: the calibrated FAR is not to be trusted
MIN_CALIBRATION_IDENTITIES = 10


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


def threshold_at_far(d: np.ndarray, same: np.ndarray, target_far: float) -> float:
    """The largest distance threshold t whose false-accept rate ``mean(d[~same] <= t)`` is at
    most ``target_far``: k = floor(target_far * #impostors) impostor pairs are accepted, t is
    the midpoint between the k-th and (k+1)-th smallest impostor distance (just below the
    smallest when k = 0). Ties never push the FAR above the target.

    Example:
        >>> import numpy as np
        >>> d = np.array([0.1, 0.2, 0.5, 0.6, 0.7, 0.8])
        >>> same = np.array([1, 1, 0, 0, 0, 0], dtype=bool)
        >>> threshold_at_far(d, same, 0.25), threshold_at_far(d, same, 0.0) < 0.5
        (0.55, True)
    """
    if not 0.0 <= float(target_far) < 1.0:
        raise InputError(f"target_far must lie in [0, 1), got {target_far!r}")
    imp = np.sort(np.asarray(d, dtype=np.float64)[~np.asarray(same, dtype=bool)])
    if imp.size == 0:
        raise InputError("a target-FAR threshold needs impostor (different-identity) pairs")
    k = int(np.floor(float(target_far) * imp.size + 1e-9))
    while 0 < k < imp.size and imp[k] == imp[k - 1]:
        k -= 1  # a tie at the cut: accept fewer
    if k == 0:
        return float(np.nextafter(imp[0], -np.inf))
    if k >= imp.size:
        return float(imp[-1])
    t = float((imp[k - 1] + imp[k]) / 2.0)
    return t if imp[k - 1] <= t < imp[k] else float(imp[k - 1])


def _cut(cum: np.ndarray, total: np.ndarray, target: float, imp: np.ndarray) -> np.ndarray:
    """Per replicate row: how many of the sorted impostor distances ``imp`` a target-FAR
    threshold accepts when pair weights have the running sums ``cum`` (rows) and ``total``."""
    k = (cum <= target * total[:, None] * (1 + 1e-12)).sum(axis=1)
    inside = k < imp.size
    # a tie at the cut: accept fewer (as threshold_at_far does)
    k[inside] = np.searchsorted(imp, imp[k[inside]], side="left")
    return k


def identity_bootstrap(
    d: np.ndarray,
    same: np.ndarray,
    ids: np.ndarray,
    threshold: float,
    *,
    target_far: float | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Intervals of FAR and TAR of a calibrated ``threshold`` from resampling identities.

    ``ids`` (M, 2): the identity indices of each pair. Each replicate draws the identities with
    replacement (multiplicities w); a pair of identities (a, b) counts w_a w_b times, a genuine
    pair of identity a counts w_a times (two copies of one identity are not an impostor pair).

    With ``target_far`` (the threshold was chosen for it) the whole calibration is resampled,
    so the interval includes the threshold's own error: replicate b chooses t_b for the target
    on its weighted pairs, and e_b = FAR(t_b on the original pairs) - FAR(t_b on replicate b)
    is the error a calibration makes; the interval is FAR(threshold) + the [2.5%, 97.5%]
    quantiles of e (the same for TAR). Without it (e.g. a best-accuracy threshold) the
    percentile interval of FAR/TAR at the fixed threshold.

    Returns ``{"far_ci": [lo, hi], "tar_ci": [lo, hi], "n_boot", "level", "method"}``; the
    intervals are None with fewer than 2 identities.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> y = np.repeat(np.arange(12), 4)
        >>> pairs = pairs_from_labels(y)
        >>> same = y[pairs[:, 0]] == y[pairs[:, 1]]
        >>> d = np.where(same, 0.3, 0.8) + 0.1 * rng.standard_normal(len(same))
        >>> ci = identity_bootstrap(d, same, y[pairs], 0.55)
        >>> ci["far_ci"][0] <= float((d[~same] <= 0.55).mean()) <= ci["far_ci"][1]
        True
    """
    d = np.asarray(d, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    what = "calibration resampled" if target_far is not None else "threshold fixed"
    method = f"identity bootstrap ({level:.0%}; identities resampled, {what})"
    uniq, inv = np.unique(np.asarray(ids).reshape(-1), return_inverse=True)
    n = uniq.size
    out: dict = {"far_ci": None, "tar_ci": None, "n_boot": 0, "level": level, "method": method}
    if n < 2:
        return out
    inv = inv.reshape(-1, 2)
    imp_order = np.argsort(d[~same], kind="stable")
    imp = d[~same][imp_order]
    ia, ib = inv[~same][imp_order, 0], inv[~same][imp_order, 1]
    gen_order = np.argsort(d[same], kind="stable")
    gen, ig = d[same][gen_order], inv[same][gen_order, 0]
    far0 = float(np.searchsorted(imp, threshold, side="right")) / imp.size
    tar0 = float(np.searchsorted(gen, threshold, side="right")) / max(gen.size, 1)
    # bounded work: about 2e8 multiply-adds in all
    n_boot = int(min(n_boot, max(200, 2e8 // max(d.size, 1))))
    chunk = int(max(1, min(100, 5e6 // max(d.size, 1))))
    rng = np.random.default_rng(seed)
    fars, tars = [], []
    for s in range(0, n_boot, chunk):
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, n_boot - s)).astype(float)
        pw = w[:, ia] * w[:, ib]  # (rows, impostor pairs), sorted by distance
        cum, total = np.cumsum(pw, axis=1), pw.sum(axis=1)
        gw = w[:, ig]
        gcum, gtotal = np.cumsum(gw, axis=1), gw.sum(axis=1)
        ok = (total > 0) & (gtotal > 0 if gen.size else True)
        if target_far is None:
            k = np.full(len(w), np.searchsorted(imp, threshold, side="right"))
            j = np.full(len(w), np.searchsorted(gen, threshold, side="right"))
        else:
            k = _cut(cum, total, target_far, imp)
            t_b = np.where(k > 0, imp[np.maximum(k - 1, 0)], -np.inf)
            t_b = np.where(k < imp.size, (t_b + imp[np.minimum(k, imp.size - 1)]) / 2, t_b)
            j = np.searchsorted(gen, t_b, side="right") if gen.size else np.zeros(len(w), int)
        rows = np.arange(len(w))
        far_b = np.where(k > 0, cum[rows, np.maximum(k - 1, 0)], 0.0) / np.maximum(total, 1e-300)
        if gen.size:
            tar_b = np.where(j > 0, gcum[rows, np.maximum(j - 1, 0)], 0.0) / np.maximum(
                gtotal, 1e-300
            )
        else:
            tar_b = np.zeros(len(w))
        if target_far is None:  # the replicate's rates at the fixed threshold
            fars.append(far_b[ok])
            tars.append(tar_b[ok])
        else:  # the calibration's error in replicate b, added to the estimate
            fars.append(far0 + (k / imp.size - far_b)[ok])
            tars.append(tar0 + (j / max(gen.size, 1) - tar_b)[ok])
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]

    def interval(v: list) -> list[float] | None:
        x = np.concatenate(v)
        return [float(np.clip(t, 0.0, 1.0)) for t in np.percentile(x, q)] if x.size else None

    far_ci = interval(fars)
    if far_ci is not None:
        # few accepted pairs: a bootstrap cannot see a rate it never observed; the upper end is
        # at least the Clopper-Pearson bound counting each identity pair as one trial
        from scipy.stats import beta

        n_eff = int(np.unique(np.minimum(ia, ib) * n + np.maximum(ia, ib)).size)
        x = int(round(far0 * n_eff))
        cp_hi = 1.0 if x >= n_eff else float(beta.ppf((1 + level) / 2, x + 1, n_eff - x))
        far_ci[1] = max(far_ci[1], cp_hi)
    out.update(far_ci=far_ci, tar_ci=interval(tars) if gen.size else None)
    out["n_boot"] = n_boot
    return out


def calibrate_threshold(
    embeddings=None,
    labels=None,
    *,
    distance: str = "cosine",
    target_far: float = 0.01,
    rule: str = "target-far",
    distances=None,
    pair_labels=None,
    pair_ids=None,
    max_pairs: int | None = 2_000_000,
    seed: int = 0,
    n_boot: int = 1000,
) -> dict:
    """A verification threshold chosen on held-out identities, with its error rates and their
    uncertainty (see the module docstring).

    From ``embeddings`` + ``labels`` (all pairs, or ``max_pairs`` drawn with ``seed``), or from
    precomputed ``distances`` + ``pair_labels`` + ``pair_ids`` (M, 2) identity labels of each
    pair. ``rule``: ``"target-far"`` (the largest threshold with FAR <= ``target_far``) or
    ``"best-accuracy"``. Returns ``threshold``, ``rule``, ``target_far``, ``far``/``tar`` (on
    these pairs), ``far_ci``/``tar_ci`` (identity bootstrap), ``accuracy``, ``n_identities``,
    ``n_pairs_same``, ``n_pairs_diff``, ``interval`` (the method) and ``warning`` (a sentence
    when there are fewer than 10 identities or fewer than 3 / target_far impostor pairs, else
    None).

    Example:
        >>> import torch
        >>> y = torch.arange(12).repeat_interleave(4)
        >>> emb = torch.nn.functional.one_hot(y, 12).float() + 0.05 * torch.randn(48, 12)
        >>> cal = calibrate_threshold(emb, y, target_far=0.01)
        >>> cal["rule"], cal["far"] <= 0.01, cal["n_identities"], cal["warning"] is None
        ('target-far', True, 12, True)
    """
    if rule not in THRESHOLD_RULES:
        raise InputError(
            f"unknown threshold rule {rule!r}; choose one of {', '.join(THRESHOLD_RULES)}"
        )
    try:
        target_far = float(target_far)
    except (TypeError, ValueError):
        raise InputError(f"target_far must be a number, got {target_far!r}") from None
    if not 0.0 < target_far < 1.0:
        raise InputError(f"target_far must lie in (0, 1), got {target_far}")
    if distances is not None:
        if pair_labels is None or pair_ids is None:
            raise InputError("precomputed distances need pair_labels and pair_ids")
        d = np.asarray(distances, dtype=np.float64)
        if d.ndim != 1:
            raise InputError(f"distances must be 1-D, got shape {d.shape}")
        same = _check_pair_labels(pair_labels, d.shape[0])
        ids = np.asarray(pair_ids)
        if ids.shape != (d.shape[0], 2):
            raise InputError(f"pair_ids must have shape ({d.shape[0]}, 2), got {ids.shape}")
    else:
        if embeddings is None or labels is None:
            raise InputError("calibrate_threshold needs embeddings and labels (or distances)")
        emb = as_embeddings(embeddings)
        y = as_labels(labels, emb.shape[0]).numpy()
        pairs = pairs_from_labels(y, max_pairs=max_pairs, seed=seed)
        ids = y[pairs]
        same = ids[:, 0] == ids[:, 1]
        d = pair_distances(emb, pairs, distance)
    if not np.isfinite(d).all():
        raise InputError("pair distances contain NaN or Inf")
    n_same, n_diff = int(same.sum()), int((~same).sum())
    if n_same == 0 or n_diff == 0:
        raise InputError(
            f"calibration needs same and different pairs (got {n_same} same, {n_diff} different)"
        )
    if rule == "target-far":
        t = threshold_at_far(d, same, target_far)
    else:
        t = best_threshold(d, same)[0]
    n_id = int(np.unique(ids).size)
    ci = identity_bootstrap(
        d,
        same,
        ids,
        t,
        # a best-accuracy threshold is resampled as the target-FAR threshold of its own FAR
        target_far=target_far if rule == "target-far" else float((d[~same] <= t).mean()),
        n_boot=n_boot,
        seed=seed,
    )
    problems = []
    if n_id < MIN_CALIBRATION_IDENTITIES:
        problems.append(f"only {n_id} identities (want >= {MIN_CALIBRATION_IDENTITIES})")
    if n_diff < 3.0 / target_far:
        problems.append(f"only {n_diff} impostor pairs (want >= {int(np.ceil(3 / target_far))})")
    warning = (
        f"the threshold was calibrated on {' and '.join(problems)} for a target FAR of "
        f"{target_far:g}: its false-accept rate on new people is uncertain (see the interval); "
        "hold out more identities for validation (--val-fraction)"
        if problems
        else None
    )
    return {
        "threshold": float(t),
        "rule": rule,
        "target_far": target_far,
        "far": float((d[~same] <= t).mean()),
        "tar": float((d[same] <= t).mean()),
        "far_ci": ci["far_ci"],
        "tar_ci": ci["tar_ci"],
        "accuracy": float(((d <= t) == same).mean()),
        "n_identities": n_id,
        "n_pairs_same": n_same,
        "n_pairs_diff": n_diff,
        "interval": ci["method"],
        "warning": warning,
    }
