"""Retrieval metrics: Precision@1, Recall@K, R-Precision, MAP@R, NMI.

Definitions follow Musgrave, Belongie & Lim 2020, "A Metric Learning Reality Check" (as in
pytorch-metric-learning's AccuracyCalculator). For a query q with label y_q, let R be the number of
reference items with label y_q (excluding q itself in the leave-one-out setting), and rel_i = 1 if
the i-th nearest reference has label y_q:

* ``precision_at_1`` = mean_q rel_1
* ``recall_at_k``    = mean_q [any(rel_1..rel_k)]   (the "Recall@K" of the metric-learning papers)
* ``r_precision``    = mean_q (1/R) sum_{i<=R} rel_i
* ``map_at_r``       = mean_q (1/R) sum_{i<=R} rel_i * P@i,  P@i = (1/i) sum_{j<=i} rel_j
* ``nmi``            = normalised mutual information between labels and k-means clusters
                      (k = number of labels; seeded)

Queries whose label has no other reference item (R = 0) are left out of every metric and counted
in ``n_queries_skipped``. Labels are compared as integers. Neighbours are ordered by distance;
ties are ordered by reference index when the reference set has at most 4096 items (a full stable
sort), and otherwise resolved by ``torch.topk`` (arbitrary among exactly equal distances).
The search keeps the ``k = max(ks, largest class size)`` nearest items so that R-Precision and
MAP@R are exact; ``max_k`` caps k, in which case queries with R > max_k are truncated and the
result says so (``truncated_queries``, ``r_metrics_exact``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InputError
from ._common import as_embeddings, as_labels, block_distances, check_distance, normalize_rows

__all__ = ["knn_search", "retrieval_metrics", "nmi_score"]

_FULL_SORT_MAX = 4096
_BLOCK_ELEMS = 1 << 24


def _knn_blocks(queries, reference, k, distance, exclude_self):
    """Yield ``(start, stop, distances, indices)`` of the exact k-NN, one query block at a time."""
    nq, nr = queries.shape[0], reference.shape[0]
    if distance == "cosine":
        queries, reference = normalize_rows(queries), normalize_rows(reference)
    r_sq = (reference * reference).sum(1)
    block = max(1, min(nq, _BLOCK_ELEMS // max(nr, 1)))
    for s in range(0, nq, block):
        e = min(nq, s + block)
        d = block_distances(queries[s:e], reference, distance, r_sq)
        if exclude_self:
            ar = torch.arange(s, e)
            d[ar - s, ar] = float("inf")
        if nr <= _FULL_SORT_MAX:
            vals, idx = torch.sort(d, dim=1, stable=True)
            vals, idx = vals[:, :k], idx[:, :k]
        else:
            vals, idx = torch.topk(d, k, dim=1, largest=False, sorted=True)
        yield s, e, vals, idx


def knn_search(
    queries: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    *,
    distance: str = "euclidean",
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest references of every query, in blocks: ``(distances, indices)`` (Nq, k).

    With ``exclude_self`` the queries are the reference set itself and item i never retrieves i.
    """
    check_distance(distance)
    nq, nr = queries.shape[0], reference.shape[0]
    k = min(k, nr - (1 if exclude_self else 0))
    if k <= 0 or nq == 0:
        return torch.zeros(nq, 0, dtype=queries.dtype), torch.zeros(nq, 0, dtype=torch.long)
    out_d = torch.empty(nq, k, dtype=queries.dtype)
    out_i = torch.empty(nq, k, dtype=torch.long)
    for s, e, vals, idx in _knn_blocks(queries, reference, k, distance, exclude_self):
        out_d[s:e] = vals
        out_i[s:e] = idx
    return out_d, out_i


def nmi_score(embeddings, labels, seed: int = 0) -> float:
    """NMI between labels and k-means clusters (k = number of distinct labels)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    emb = as_embeddings(embeddings).double().numpy()
    y = as_labels(labels, emb.shape[0]).numpy()
    n_cls = len(np.unique(y))
    if n_cls < 2 or emb.shape[0] <= n_cls:
        return float("nan")
    pred = KMeans(n_clusters=n_cls, n_init=3, random_state=seed).fit_predict(emb)
    return float(normalized_mutual_info_score(y, pred))


def retrieval_metrics(
    embeddings,
    labels,
    *,
    ks: Sequence[int] = (1, 5, 10),
    distance: str = "euclidean",
    query_embeddings=None,
    query_labels=None,
    nmi: bool = True,
    max_k: int | None = None,
    seed: int = 0,
) -> dict:
    """All retrieval metrics from one exact k-NN search.

    Leave-one-out over ``(embeddings, labels)``, or ``query_*`` against the reference set
    ``(embeddings, labels)`` (no self-exclusion).

    Example:
        >>> import torch
        >>> from tripletlab.metrics import retrieval_metrics
        >>> emb = torch.nn.functional.normalize(torch.randn(100, 8), dim=1)
        >>> m = retrieval_metrics(emb, torch.arange(10).repeat(10), ks=(1, 5), nmi=False)
        >>> sorted(k for k in m if k.startswith("recall"))
        ['recall_at_1', 'recall_at_5']
    """
    check_distance(distance)
    ref = as_embeddings(embeddings)
    ref_y = as_labels(labels, ref.shape[0])
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise InputError(f"ks must be positive integers, got {list(ks)}")
    loo = query_embeddings is None
    if loo:
        if query_labels is not None:
            raise InputError("query_labels given without query_embeddings")
        q, q_y = ref, ref_y
    else:
        q = as_embeddings(query_embeddings, "query_embeddings")
        q_y = as_labels(query_labels, q.shape[0], "query_labels")
        if q.shape[1] != ref.shape[1]:
            raise InputError(
                f"query_embeddings have dimension {q.shape[1]}, reference {ref.shape[1]}"
            )
        q = q.to(ref.dtype)
    if ref.shape[0] == 0 or q.shape[0] == 0:
        raise InputError("retrieval metrics need at least one query and one reference item")
    # R for every query = same-label references (minus the query itself when leave-one-out)
    uniq, counts = torch.unique(ref_y, return_counts=True)
    pos = torch.searchsorted(uniq, q_y).clamp_max(len(uniq) - 1)
    r = torch.where(uniq[pos] == q_y, counts[pos], torch.zeros_like(q_y)) - (1 if loo else 0)
    need = max(int(r.max()), ks[-1])
    k = need if max_k is None else min(need, int(max_k))
    truncated = int((r > k).sum())
    if truncated:
        warnings.warn(
            f"{truncated} queries have more same-label items ({int(r.max())}) than max_k={k}: "
            "R-Precision and MAP@R are computed on the first max_k neighbours only",
            stacklevel=2,
        )
    valid = r > 0
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise InputError("no query has another item of its label: retrieval metrics undefined")
    k = min(k, ref.shape[0] - (1 if loo else 0))
    # accumulate per query block: memory O(block x k), never (N x k)
    sums = {"p1": 0.0, "rp": 0.0, "map": 0.0, **{f"r{kk}": 0.0 for kk in ks}}
    ranks = torch.arange(1, k + 1, dtype=torch.float64)
    for s, e, _, idx in _knn_blocks(q, ref, k, distance, loo):
        ok = valid[s:e]
        if not bool(ok.any()):
            continue
        rel = (ref_y[idx[ok]] == q_y[s:e][ok][:, None]).double()
        r_b = r[s:e][ok].clamp_max(k).double()
        sums["p1"] += float(rel[:, 0].sum()) if k else 0.0
        for kk in ks:
            sums[f"r{kk}"] += float((rel[:, :kk].sum(1) > 0).sum())
        rel_r = rel * (ranks[None, :] <= r_b[:, None])
        sums["rp"] += float((rel_r.sum(1) / r_b).sum())
        sums["map"] += float(((rel_r.cumsum(1) / ranks[None, :] * rel_r).sum(1) / r_b).sum())
    out: dict = {
        "n_queries": int(q.shape[0]),
        "n_queries_evaluated": n_valid,
        "n_queries_skipped": int(q.shape[0]) - n_valid,
        "k_searched": int(k),
        "truncated_queries": truncated,
        "r_metrics_exact": truncated == 0,
        "distance": distance,
        "precision_at_1": sums["p1"] / n_valid,
    }
    for kk in ks:
        out[f"recall_at_{kk}"] = sums[f"r{kk}"] / n_valid
    out["r_precision"] = sums["rp"] / n_valid
    out["map_at_r"] = sums["map"] / n_valid
    if nmi:
        out["nmi"] = nmi_score(ref, ref_y, seed=seed) if loo else nmi_score(q, q_y, seed=seed)
    for key, v in list(out.items()):
        if isinstance(v, float) and not math.isfinite(v) and key != "nmi":
            raise InputError(f"metric {key} is not finite")
    return out
