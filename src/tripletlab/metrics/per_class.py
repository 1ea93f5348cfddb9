"""Per-class retrieval: where the model fails, class by class.

The same leave-one-out definitions as :func:`tripletlab.metrics.retrieval_metrics` (Musgrave,
Belongie & Lim 2020, "A Metric Learning Reality Check"), averaged over the queries of each class
instead of over all queries. For a query q of class c, R = n_c - 1 (the other items of c) and
rel_i = 1 if the i-th nearest other item is of class c:

* ``precision_at_1(c)`` = mean_{q in c} rel_1
* ``r_precision(c)``    = mean_{q in c} (1/R) sum_{i<=R} rel_i
* ``map_at_r(c)``       = mean_{q in c} (1/R) sum_{i<=R} rel_i * P@i,  P@i = (1/i) sum_{j<=i} rel_j
* ``confused_with(c)``  = the other class most often at rank 1 for the queries of c (ties: the
                          smallest label), with ``confused_count`` such queries

A class weighted by its number of queries gives back the overall figures:
sum_c n_queries(c) * map_at_r(c) / sum_c n_queries(c) = ``retrieval_metrics(...)["map_at_r"]``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from ..validation import as_embeddings, as_labels, check_distance, check_k
from .retrieval import knn_search

__all__ = ["per_class_retrieval"]

_CHUNK_ELEMS = 1 << 22  # query chunk size x neighbours held at a time (bounded memory)


def _knn_without_self(emb: torch.Tensor, k: int, distance: str):
    """Yield ``(start, stop, ids)``: the ``k`` nearest other items of each item, in query chunks
    (memory O(chunk x k)), ordered by distance then index, exactly as ``knn_search(emb, emb, k,
    exclude_self=True)``: the ``k + 1`` nearest of all items with the item itself taken out
    (or, where it is not among them, the last one)."""
    n = emb.shape[0]
    step = max(1, min(n, _CHUNK_ELEMS // (k + 1)))
    for s in range(0, n, step):
        e = min(n, s + step)
        _, ids = knn_search(emb[s:e], emb, k + 1, distance=distance)
        ids = ids.numpy()
        is_self = ids == np.arange(s, e)[:, None]
        is_self[~is_self.any(axis=1), -1] = True  # exactly one entry dropped per row
        yield s, e, ids[~is_self].reshape(e - s, k)


def per_class_retrieval(
    embeddings, labels, *, distance: str = "cosine", k: int | None = None
) -> list[dict]:
    """P@1, R-Precision, MAP@R and the most confused other class of every class (leave-one-out),
    the worst classes first (``map_at_r`` ascending, ties by label; classes of a single item,
    whose metrics are undefined, last).

    ``k``: neighbours searched per query; ``None`` (the default) searches ``largest class size
    - 1``, so every figure is exact. A smaller ``k`` truncates R to ``k`` as ``max_k`` does in
    :func:`retrieval_metrics` (``r_metrics_exact`` is then False for the classes it cuts).
    Time O(N^2 d) for the search, O(N k) for the rest; memory O(chunk x k).

    Each row: ``label``, ``n_items``, ``n_queries`` (items with another item of their class),
    ``precision_at_1``, ``r_precision``, ``map_at_r`` (``None`` when ``n_queries`` is 0),
    ``wrong_at_1`` (queries whose nearest neighbour is of another class), ``confused_with``
    (a label, ``None`` when ``wrong_at_1`` is 0), ``confused_count`` and ``r_metrics_exact``.

    Example:
        >>> import numpy as np
        >>> from tripletlab.metrics import per_class_retrieval
        >>> emb = np.array([[0.0, 1], [0, 2], [1, 0], [2, 0], [1, 0.1]])
        >>> rows = per_class_retrieval(emb, np.array([0, 0, 1, 1, 2]), distance="euclidean")
        >>> [(r["label"], r["precision_at_1"], r["confused_with"]) for r in rows]
        [(1, 0.5, 2), (0, 1.0, None), (2, None, 1)]
    """
    check_distance(distance)
    emb = as_embeddings(embeddings)
    y = as_labels(labels, emb.shape[0]).numpy()
    n = emb.shape[0]
    if n < 2:
        raise InputError(f"per-class retrieval needs at least 2 items, got {n}")
    uniq, codes, sizes = np.unique(y, return_inverse=True, return_counts=True)
    n_cls = len(uniq)
    exact_k = int(sizes.max()) - 1
    kk = exact_k if k is None else min(check_k(k), exact_k)
    kk = min(max(kk, 1), n - 1)  # at least the nearest neighbour (for the confusions)
    r = np.minimum(sizes[codes] - 1, kk)  # R of each query, truncated to the search
    valid = r > 0
    inv_ranks = 1.0 / np.arange(1, kk + 1, dtype=np.float64)
    ranks = np.arange(1, kk + 1)
    p1_sum = np.zeros(n_cls)
    rp_sum = np.zeros(n_cls)
    map_sum = np.zeros(n_cls)
    confusions = []  # own code * n_cls + code at rank 1, for the queries wrong at rank 1
    for s, e, ids in _knn_without_self(emb, kk, distance):
        own = codes[s:e]
        nb = codes[ids]  # (b, kk) neighbour classes
        rel = nb == own[:, None]
        top1 = nb[:, 0]
        wrong = top1 != own
        confusions.append(own[wrong] * n_cls + top1[wrong])
        ok = valid[s:e]
        r_b = r[s:e][ok]
        rel_r = rel[ok] & (ranks[None, :] <= r_b[:, None])  # only the first R count
        cum = np.cumsum(rel_r, axis=1, dtype=np.int32)
        hits_r = cum[np.arange(len(r_b)), r_b - 1]
        ap = np.einsum("ij,j->i", cum * rel_r, inv_ranks)
        own_ok = own[ok]
        p1_sum += np.bincount(own_ok, weights=rel[ok, 0], minlength=n_cls)
        rp_sum += np.bincount(own_ok, weights=hits_r / r_b, minlength=n_cls)
        map_sum += np.bincount(own_ok, weights=ap / r_b, minlength=n_cls)
    n_queries = np.bincount(codes[valid], minlength=n_cls)
    pair, count = np.unique(np.concatenate(confusions), return_counts=True)
    src, dst = pair // n_cls, pair % n_cls
    wrong_at_1 = np.bincount(src, weights=count, minlength=n_cls).astype(np.int64)
    order = np.lexsort((dst, -count, src))  # per class: the largest count, then smallest label
    first = order[np.r_[True, src[order][1:] != src[order][:-1]]] if len(order) else order
    confused = {int(src[i]): (int(uniq[dst[i]]), int(count[i])) for i in first}
    rows = []
    for c in range(n_cls):
        nq = int(n_queries[c])
        with_q = nq > 0
        other, cnt = confused.get(c, (None, 0))
        rows.append(
            {
                "label": int(uniq[c]),
                "n_items": int(sizes[c]),
                "n_queries": nq,
                "precision_at_1": float(p1_sum[c] / nq) if with_q else None,
                "r_precision": float(rp_sum[c] / nq) if with_q else None,
                "map_at_r": float(map_sum[c] / nq) if with_q else None,
                "wrong_at_1": int(wrong_at_1[c]),
                "confused_with": other,
                "confused_count": cnt,
                "r_metrics_exact": int(sizes[c]) - 1 <= kk,
            }
        )
    rows.sort(key=lambda w: (w["map_at_r"] is None, w["map_at_r"] or 0.0, w["label"]))
    return rows
