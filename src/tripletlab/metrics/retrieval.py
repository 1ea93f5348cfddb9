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


_PREFILTER_MIN_N = 16384  # float32 rows at least this long: sample a threshold, compact, select
_SAMPLE_STRIDE = 32  # the threshold sample takes every 32nd run of 16 columns
_PARALLEL_MIN_ELEMS = 1 << 18  # a block of at least this many scores is split over threads
_POOL: list = [None, 0]  # a thread pool for the per-block selection, and its size


def _pack_keys(bits: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """int64 keys ``bits << 32 | cols`` (same shapes, int32 inputs), written as two words."""
    words = np.empty((*bits.shape, 2), dtype=np.int32)
    if sys.byteorder == "little":
        np.maximum(bits, 0, out=words[..., 1])  # -0.0 -> +0.0
        words[..., 0] = cols
    else:  # pragma: no cover
        np.maximum(bits, 0, out=words[..., 0])
        words[..., 1] = cols
    return words.view(np.int64).reshape(bits.shape)


def _sorted_smallest(a: np.ndarray, k: int) -> np.ndarray:
    """The k smallest keys of each row (or of a 1-d array), sorted."""
    if k < a.shape[-1]:
        a = np.partition(a, k - 1, axis=-1)[..., :k]
    a.sort(axis=-1)
    return a


def _smallest_keys(scn: np.ndarray, k: int) -> np.ndarray:
    """(b, k) sorted int64 keys ``score bits << 32 | column`` of the k smallest (score, column)
    of each row of non-negative float32 scores.

    A non-negative float32's bit pattern orders like its value, so the key orders exactly by
    (score, then column), ties included. Long rows with k well below n are not packed whole: a
    threshold ``tau`` is taken from a strided sample of the row (a rank a few standard
    deviations above k's expected rank in the sample), the columns with score <= tau are
    compacted, and the k smallest are selected among them. Exact: when at least k scores are
    <= tau, every other column scores more than all of them; rows with fewer (an unlucky or
    adversarial sample) or with far more than expected take the whole-row path.
    """
    b, n = scn.shape
    bits = scn.view(np.int32)

    def whole_rows(rows) -> np.ndarray:
        return _sorted_smallest(_pack_keys(bits[rows], np.arange(n, dtype=np.int32)[None, :]), k)

    # the sample: every _SAMPLE_STRIDE-th run of 16 contiguous columns (one cache line each),
    # spread over the whole row, so it reads 1/_SAMPLE_STRIDE of the row's memory
    runs = n // 16
    m = (-(-runs // _SAMPLE_STRIDE)) * 16
    expected = k * m / n
    r = int(math.ceil(expected + 4.0 * math.sqrt(expected) + 2.0))
    if n < _PREFILTER_MIN_N or runs == 0 or 2 * r > m:  # short rows, or k near n: whole rows
        return whole_rows(slice(None))
    sample = scn[:, : runs * 16].reshape(b, runs, 16)[:, ::_SAMPLE_STRIDE].reshape(b, -1)
    tau = np.partition(sample, r - 1, axis=1)[:, r - 1]
    cap = 4 * r * n // m
    out = np.empty((b, k), dtype=np.int64)
    whole = []
    for i in range(b):  # row by row: the row's temporaries stay in cache
        row = scn[i]
        cand = np.flatnonzero(row <= tau[i])
        if not k <= cand.shape[0] <= cap:
            whole.append(i)
            continue
        out[i] = _sorted_smallest(_pack_keys(bits[i][cand], cand.astype(np.int32)), k)
    if whole:
        out[whole] = whole_rows(whole)
    return out


def _smallest_packed(sc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k smallest of each row of non-negative float32 scores, ordered by (score, index), as
    ``(scores, indices)`` tensors (see :func:`_smallest_keys`)."""
    a = _smallest_keys(sc.numpy(), k)
    idx = torch.from_numpy(a & 0xFFFFFFFF)
    vals = torch.from_numpy((a >> 32).astype(np.int32)).view(torch.float32)
    return vals, idx


def _label_codes(ref_y: torch.Tensor, q_y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Labels as small integer codes (int16 when they fit: a cheaper gather per neighbour);
    query labels absent from the reference set get -1."""
    uniq, ref_codes = np.unique(ref_y.numpy(), return_inverse=True)
    dtype = np.int16 if len(uniq) < 2**15 else np.int32
    pos = np.searchsorted(uniq, q_y.numpy()).clip(0, len(uniq) - 1)
    q_codes = np.where(uniq[pos] == q_y.numpy(), pos, -1).astype(dtype)
    return ref_codes.astype(dtype), q_codes


def _thread_pool(n_threads: int):
    """A pool of ``n_threads`` threads (numpy's partition/sort release the GIL), kept."""
    from concurrent.futures import ThreadPoolExecutor

    if _POOL[0] is None or _POOL[1] != n_threads:
        if _POOL[0] is not None:
            _POOL[0].shutdown(wait=False)
        _POOL[:] = [ThreadPoolExecutor(n_threads, thread_name_prefix="tripletlab-knn"), n_threads]
    return _POOL[0]


def _map_row_parts(fn, s: int, e: int, sc: torch.Tensor) -> list:
    """``[fn(s_i, e_i, sc[rows_i]) ...]`` over row parts of one score block: one part per torch
    thread when the block is large (the GEMM already used them; the selection would not)."""
    n_threads = torch.get_num_threads()
    rows = e - s
    if n_threads < 2 or rows < 2 or sc.numel() < _PARALLEL_MIN_ELEMS:
        return [fn(s, e, sc)]
    parts = min(n_threads, rows)
    bounds = [s + (rows * i) // parts for i in range(parts + 1)]
    args = [(a, z, sc[a - s : z - s]) for a, z in zip(bounds[:-1], bounds[1:], strict=True)]
    return list(_thread_pool(parts).map(lambda t: fn(*t), args))


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


def _knn_blocks(queries, reference, k, distance, exclude_self, need_distances=True, reduce=None):
    """Yield ``(start, stop, distances, indices)`` of the exact k-NN, one query block (or a part
    of one) at a time; with ``reduce``, yield ``reduce(start, stop, indices)`` instead, computed
    in the same worker thread as the selection.

    Neighbours are ordered by distance, then by reference index (the order of a full stable
    sort). ``k`` must be in [1, number of candidates]. Distances are None when not needed.
    Float32 blocks are split over the torch threads for the selection (numpy, GIL released);
    float64 ones use torch's own parallel sort.
    """
    nr = reference.shape[0]
    if distance == "cosine":
        queries, reference = normalize_rows(queries), normalize_rows(reference)
    packed = reference.dtype == torch.float32 and nr < 2**31

    def part(s: int, e: int, sc: torch.Tensor):
        vals, idx = _smallest_packed(sc, k) if packed else _smallest_float64(sc, k)
        if reduce is not None:
            return reduce(s, e, idx)
        return s, e, (scores_to_distances(vals, distance) if need_distances else None), idx

    for s, e, sc in iter_score_blocks(queries, reference, distance, _BLOCK_ELEMS):
        if exclude_self:
            ar = torch.arange(s, e)
            sc[ar - s, ar] = float("inf")
        if packed:
            yield from _map_row_parts(part, s, e, sc)
        else:
            yield part(s, e, sc)
        del sc


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
    ref_codes, q_codes = _label_codes(ref_y, q_y)
    r_np, valid_np = r.clamp_max(k).numpy(), valid.numpy()
    inv_ranks = 1.0 / np.arange(1, k + 1, dtype=np.float64)
    ranks = np.arange(1, k + 1)

    def block_sums(s: int, e: int, idx: torch.Tensor) -> np.ndarray:
        """[P@1, R-Precision, MAP@R, recall@k for each k] summed over the block's queries."""
        ok = valid_np[s:e]
        rel = ref_codes[idx.numpy()[ok]] == q_codes[s:e][ok][:, None]  # (b, k) bool
        r_b = r_np[s:e][ok]
        out = np.zeros(3 + len(ks))
        if rel.shape[0] == 0:
            return out
        if int(r_b.min()) < k:  # only the first R neighbours count for R-Precision and MAP@R
            rel_r = rel & (ranks[None, :] <= r_b[:, None])
        else:
            rel_r = rel
        cum = np.cumsum(rel_r, axis=1, dtype=np.int32)
        hits_r = cum[np.arange(len(r_b)), r_b - 1]  # relevant items among the first R
        # sum_i rel_i * P@i = (cum * rel) . (1 / i); einsum, not BLAS: this runs in a worker
        # thread, where BLAS's own threads would oversubscribe the cores
        ap = np.einsum("ij,j->i", cum * rel_r, inv_ranks)
        first = np.where(rel.any(axis=1), rel.argmax(axis=1), k)  # first relevant rank - 1
        out[0] = float(rel[:, 0].sum())
        out[1] = float((hits_r / r_b).sum())
        out[2] = float((ap / r_b).sum())
        for i, kk in enumerate(ks):
            out[3 + i] = float((first < kk).sum())
        return out

    totals = np.zeros(3 + len(ks))
    for part in _knn_blocks(q, ref, k, distance, loo, need_distances=False, reduce=block_sums):
        totals += part
    sums = {"p1": float(totals[0]), "rp": float(totals[1]), "map": float(totals[2])}
    sums.update({f"r{kk}": float(totals[3 + i]) for i, kk in enumerate(ks)})
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
