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
in ``n_queries_skipped``. Labels are compared as int64 (never cast to float).

Ties: neighbours are ordered by distance, and exactly equal distances by increasing reference
index, whatever the size of the reference set (the order of a full stable sort; a tie across the
k-th neighbour is detected and that row fully sorted). Distances are computed in the input's
precision (float32, or float64 for float64 input) by GEMM, so two distances that differ only by
rounding may be ordered either way.

The search keeps the ``k = max(max(ks), largest class size)`` nearest items so that R-Precision
and MAP@R are exact; ``max_k`` caps k, in which case queries with R > max_k are truncated, a
warning is issued and the result says so (``truncated_queries`` > 0, ``r_metrics_exact`` False).
A ``k`` in ``ks`` larger than the number of candidates (N - 1 leave-one-out) is clamped to it, so
``recall_at_k`` is then the fraction of queries with any same-label item.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ..distances import iter_score_blocks, normalize_rows, scores_to_distances
from ..errors import InputError
from ..validation import as_embeddings, as_labels, check_distance, check_k, check_ks, is_int

__all__ = ["knn_search", "retrieval_metrics", "nmi_score"]

_FULL_SORT_MAX = 4096  # float64 only: up to this many references, one full stable sort
_BLOCK_ELEMS = 1 << 24  # query block size x references per step (bounded memory)


def _smallest_packed(sc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k smallest of each row of non-negative float32 scores, ordered by (score, index).

    A non-negative float32's bit pattern orders like its value, so ``bits << 32 | index`` is
    one int64 key whose order is exactly (score, then index); numpy's ``partition`` and
    ``sort`` on it select and order the k nearest exactly, ties included, without the
    separate tie handling that ``torch.topk`` needs.
    """
    b, n = sc.shape
    if sys.byteorder == "little":  # write both 32-bit halves of the key: no shift/or passes
        words = np.empty((b, n, 2), dtype=np.int32)
        np.maximum(sc.numpy().view(np.int32), 0, out=words[:, :, 1])  # -0.0 -> +0.0
        words[:, :, 0] = np.arange(n, dtype=np.int32)[None, :]
        a = words.view(np.int64).reshape(b, n)
    else:  # pragma: no cover
        key = sc.view(torch.int32).to(torch.int64)
        a = key.bitwise_left_shift_(32).bitwise_or_(torch.arange(n)).numpy()
    if k < n:
        a = np.partition(a, k - 1, axis=1)[:, :k]
    a.sort(axis=1)
    idx = torch.from_numpy(a & 0xFFFFFFFF)
    vals = torch.from_numpy((a >> 32).astype(np.int32)).view(torch.float32)
    return vals, idx


def _order_ties_by_index(vals: torch.Tensor, idx: torch.Tensor):
    """Reorder each row so that equal distances come in increasing reference index."""
    by_idx = torch.sort(idx, dim=1, stable=True).indices
    vals, idx = vals.gather(1, by_idx), idx.gather(1, by_idx)
    by_val = torch.sort(vals, dim=1, stable=True).indices
    return vals.gather(1, by_val), idx.gather(1, by_val)


def _smallest_float64(sc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k smallest of each row, ordered by (score, index), for float64 scores: a full stable
    sort for small rows; otherwise ``topk`` of k + 1, ties ordered by index, and rows with a
    tie across the k-th/(k+1)-th score redone with a full stable sort."""
    n = sc.shape[1]
    if n <= _FULL_SORT_MAX or k + 1 >= n:
        vals, idx = torch.sort(sc, dim=1, stable=True)
        return vals[:, :k], idx[:, :k]
    vals, idx = torch.topk(sc, k + 1, dim=1, largest=False, sorted=True)
    vals, idx = _order_ties_by_index(vals, idx)
    cut_tie = (vals[:, k] == vals[:, k - 1]).nonzero().flatten()
    vals, idx = vals[:, :k].contiguous(), idx[:, :k].contiguous()
    if cut_tie.numel():
        full_v, full_i = torch.sort(sc[cut_tie], dim=1, stable=True)
        vals[cut_tie], idx[cut_tie] = full_v[:, :k], full_i[:, :k]
    return vals, idx


def _knn_blocks(queries, reference, k, distance, exclude_self, need_distances=True):
    """Yield ``(start, stop, distances, indices)`` of the exact k-NN, one query block at a time.

    Neighbours are ordered by distance, then by reference index (the order of a full stable
    sort). ``k`` must be in [1, number of candidates]. Distances are None when not needed.
    """
    nr = reference.shape[0]
    if distance == "cosine":
        queries, reference = normalize_rows(queries), normalize_rows(reference)
    packed = reference.dtype == torch.float32 and nr < 2**31
    for s, e, sc in iter_score_blocks(queries, reference, distance, _BLOCK_ELEMS):
        if exclude_self:
            ar = torch.arange(s, e)
            sc[ar - s, ar] = float("inf")
        vals, idx = _smallest_packed(sc, k) if packed else _smallest_float64(sc, k)
        del sc
        if need_distances:
            vals = scores_to_distances(vals, distance)
        yield s, e, (vals if need_distances else None), idx


def knn_search(
    queries: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    *,
    distance: str = "cosine",
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest references of every query, in blocks: ``(distances, indices)`` (Nq, k).

    With ``exclude_self`` the queries are the reference set itself and item i never retrieves i.
    ``k`` is clamped to the number of candidates; ties are ordered by reference index.
    """
    check_distance(distance)
    k = check_k(k)
    reference = as_embeddings(reference, "reference")
    queries = as_embeddings(queries, "queries")
    if queries.shape[1] != reference.shape[1]:
        raise InputError(
            f"queries have dimension {queries.shape[1]}, reference {reference.shape[1]}"
        )
    if exclude_self and queries.shape[0] != reference.shape[0]:
        raise InputError("exclude_self needs the queries to be the reference set itself")
    queries = queries.to(reference.dtype)
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
    """NMI between labels and k-means clusters (k = number of distinct labels; scikit-learn's
    KMeans with ``n_init=3`` and ``random_state=seed``). NaN with fewer than 2 labels or no
    more items than labels."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import normalized_mutual_info_score

    emb = as_embeddings(embeddings).double().numpy()
    y = as_labels(labels, emb.shape[0]).numpy()
    n_cls = len(np.unique(y))
    if n_cls < 2 or emb.shape[0] <= n_cls:
        return float("nan")
    with warnings.catch_warnings():  # collapsed embeddings: fewer distinct points than labels
        warnings.simplefilter("ignore", ConvergenceWarning)
        pred = KMeans(n_clusters=n_cls, n_init=3, random_state=seed).fit_predict(emb)
    return float(normalized_mutual_info_score(y, pred))


def retrieval_metrics(
    embeddings,
    labels,
    *,
    ks: Sequence[int] = (1, 5, 10),
    distance: str = "cosine",
    query_embeddings=None,
    query_labels=None,
    nmi: bool = True,
    max_k: int | None = None,
    seed: int = 0,
) -> dict:
    """All retrieval metrics from one exact k-NN search.

    Leave-one-out over ``(embeddings, labels)``, or ``query_*`` against the reference set
    ``(embeddings, labels)`` (no self-exclusion). ``distance`` defaults to ``"cosine"``, as
    verification, few-shot, the index and the CLI do for L2-normalised embeddings (where it
    ranks exactly as euclidean); pass ``"euclidean"`` for unnormalised ones.

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
    ks = check_ks(ks)
    if max_k is not None and (not is_int(max_k) or max_k < 1):
        raise InputError(f"max_k must be a positive integer or None, got {max_k!r}")
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
    for s, e, _, idx in _knn_blocks(q, ref, k, distance, loo, need_distances=False):
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
