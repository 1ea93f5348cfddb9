"""Retrieval metrics: Precision@1, Recall@K (CMC), R-Precision, MAP@R, mAP, mINP, NMI.

Definitions follow Musgrave, Belongie & Lim 2020, "A Metric Learning Reality Check" (as in
pytorch-metric-learning's AccuracyCalculator). For a query q with label y_q, let R be the number of
reference items with label y_q (excluding q itself in the leave-one-out setting, and every item of
q's group with ``groups``), and rel_i = 1 if the i-th nearest reference has label y_q:

* ``precision_at_1`` = mean_q rel_1
* ``recall_at_k``    = mean_q [any(rel_1..rel_k)]   (the "Recall@K" of the metric-learning papers;
                      it is exactly the rank-k accuracy CMC@k of re-identification, so there is no
                      separate ``cmc_at_k`` key)
* ``r_precision``    = mean_q (1/R) sum_{i<=R} rel_i
* ``map_at_r``       = mean_q (1/R) sum_{i<=R} rel_i * P@i,  P@i = (1/i) sum_{j<=i} rel_j
* ``mean_average_precision`` (mAP, the re-identification one of Market-1501 / torchreid)
                    = mean_q (1/R) sum_{i<=N} rel_i * P@i over the FULL ranking of N candidates
* ``minp``           = mean_q R / rank of the last relevant item (mean inverse negative penalty,
                      Ye et al., "Deep Learning for Person Re-identification: A Survey and
                      Outlook", TPAMI 2021)
* ``nmi``            = normalised mutual information between labels and k-means clusters
                      (k = number of labels; seeded)

mAP and mINP need the rank of every relevant item, so the whole ranking: ``full_ranking=True``
ranks every candidate of every query (a full stable sort of each score block, in blocks);
``None`` (the default) does so when n_queries x n_references <= 4e8 and ``max_k`` is None,
otherwise the two keys are absent.

Evaluation groups (``groups``, with ``query_groups`` in query/reference mode): one hashable per
item (camera, session, sequence). A query's gallery excludes EVERY reference item of its own
group, whatever its label, as open-metric-learning's ``sequence_key`` does; the excluded items
are neither retrieved nor counted in R. Leave-one-out is the special case where every item is its
own group. This is stricter than the Market-1501 / torchreid rule, which removes only the items
of the query's identity AND camera (other identities of that camera stay in the gallery): pass
``groups=camera`` to get ours; theirs is not provided.

Queries whose label has no other reference item (R = 0) are left out of every metric and counted
in ``n_queries_skipped``. Labels are compared as int64 (never cast to float).
:func:`ranking_metrics` scores given ranked lists (e.g. after re-ranking) with the same code.

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
from typing import Any

import numpy as np
import torch

from ..distances import iter_score_blocks, normalize_rows, scores_to_distances
from ..errors import InputError, InputTypeError
from ..validation import as_embeddings, as_labels, check_distance, check_k, check_ks, is_int

__all__ = ["knn_search", "nmi_score", "ranking_metrics", "retrieval_metrics"]

_FULL_SORT_MAX = 4096  # float64 only: up to this many references, one full stable sort
_BLOCK_ELEMS = 1 << 24  # query block size x references per step (bounded memory)
_FULL_BLOCK_ELEMS = 1 << 22  # the same with full ranking (every list holds every candidate)
_FULL_RANKING_AUTO = 4e8  # full_ranking=None: on up to n_queries x n_references this large


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
    """The k smallest keys of each row (or of a 1-d array), sorted (k near the row length, e.g.
    a full ranking: one sort of the whole row, cheaper than a partition first)."""
    n = a.shape[-1]
    if 4 * k < 3 * n:
        a = np.partition(a, k - 1, axis=-1)[..., :k]
    a.sort(axis=-1)
    return a[..., :k] if k < n else a


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


def _smallest_packed(
    sc: torch.Tensor, k: int, need_values: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """k smallest of each row of non-negative float32 scores, ordered by (score, index), as
    ``(scores, indices)`` tensors (see :func:`_smallest_keys`; scores None unless needed)."""
    a = _smallest_keys(sc.numpy(), k)
    idx = torch.from_numpy(a & 0xFFFFFFFF)
    if not need_values:
        return None, idx
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


def _knn_blocks(
    queries,
    reference,
    k,
    distance,
    exclude_self,
    need_distances=True,
    reduce=None,
    exclude=None,
    block_elems=_BLOCK_ELEMS,
):
    """Yield ``(start, stop, distances, indices)`` of the exact k-NN, one query block (or a part
    of one) at a time; with ``reduce``, yield ``reduce(start, stop, indices)`` instead, computed
    in the same worker thread as the selection.

    Neighbours are ordered by distance, then by reference index (the order of a full stable
    sort). ``k`` must be in [1, number of candidates]. Distances are None when not needed.
    ``exclude(start, stop, scores)`` sets the scores of excluded references to +inf in place
    (the evaluation groups; they then come after every candidate). Float32 blocks are split
    over the torch threads for the selection (numpy, GIL released); float64 ones use torch's
    own parallel sort.
    """
    nr = reference.shape[0]
    if distance == "cosine":
        queries, reference = normalize_rows(queries), normalize_rows(reference)
    packed = reference.dtype == torch.float32 and nr < 2**31

    def part(s: int, e: int, sc: torch.Tensor):
        if packed:
            vals, idx = _smallest_packed(sc, k, need_values=need_distances and reduce is None)
        else:
            vals, idx = _smallest_float64(sc, k)
        if reduce is not None:
            return reduce(s, e, idx)
        return s, e, (scores_to_distances(vals, distance) if need_distances else None), idx

    for s, e, sc in iter_score_blocks(queries, reference, distance, block_elems):
        if exclude is not None:
            exclude(s, e, sc)
        elif exclude_self:
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


# ------------------------------------------------------------------------ evaluation groups


def _group_values(groups: Any, n: int, name: str, what: str) -> list | np.ndarray:
    """``groups`` as a 1-D numpy array (numbers or strings) or a list of hashables, of length
    ``n``."""
    if isinstance(groups, torch.Tensor):
        groups = groups.detach().cpu().numpy()
    if isinstance(groups, np.ndarray):
        if groups.ndim != 1:
            raise InputError(f"{name} must be 1-D (one group per item), got {groups.shape}")
        if groups.dtype.kind == "f" and not np.isfinite(groups).all():
            raise InputError(f"{name} contain NaN or Inf values")
        if groups.dtype.kind not in "biufUS":
            groups = groups.tolist()
    elif isinstance(groups, (str, bytes)) or not hasattr(groups, "__len__"):
        raise InputTypeError(
            f"{name} must be a sequence with one group per item, got {type(groups).__name__}"
        )
    else:
        groups = list(groups)
    if len(groups) != n:
        raise InputError(f"{name} has {len(groups)} values but there are {n} {what}")
    return groups


def _encode_groups(ref: list | np.ndarray, query: list | np.ndarray | None):
    """Joint int64 codes of reference and query group values (equal values, equal codes) and
    the number of distinct groups."""
    parts = [ref] if query is None else [ref, query]
    kinds = {p.dtype.kind if isinstance(p, np.ndarray) else None for p in parts}
    if kinds <= set("biuf") or kinds <= set("US"):  # homogeneous arrays: one np.unique
        uniq, codes = np.unique(np.concatenate(parts), return_inverse=True)
        n_groups = len(uniq)
    else:  # lists of hashables (1 and "1" stay distinct)
        table: dict = {}
        try:
            values = [v for p in parts for v in (p.tolist() if isinstance(p, np.ndarray) else p)]
            codes = np.fromiter((table.setdefault(v, len(table)) for v in values), np.int64)
        except TypeError as e:
            raise InputTypeError(f"groups must be hashable values (int, str, ...): {e}") from None
        n_groups = len(table)
    codes = np.asarray(codes, dtype=np.int64).reshape(-1)
    n_ref = len(ref)
    return codes[:n_ref], (codes[n_ref:] if query is not None else codes[:n_ref]), n_groups


def _group_mask(ref_g: np.ndarray, q_g: np.ndarray, n_groups: int):
    """``exclude(start, stop, scores)`` for :func:`_knn_blocks`: +inf at every reference item
    of each query's own group (by index pairs when they are few, else by one comparison)."""
    order = np.argsort(ref_g, kind="stable")
    sizes = np.bincount(ref_g, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    def exclude(s: int, e: int, sc: torch.Tensor) -> None:
        qg = q_g[s:e]
        own = sizes[qg]
        tot = int(own.sum())
        if tot == 0:
            return
        b, n = sc.shape
        if 8 * tot >= b * n:
            sc.masked_fill_(torch.from_numpy(qg[:, None] == ref_g[None, :]), float("inf"))
            return
        rows = np.repeat(np.arange(b, dtype=np.int64), own)
        first = np.repeat(starts[qg] - (np.cumsum(own) - own), own)
        cols = order[first + np.arange(tot)]
        sc.view(-1).index_fill_(0, torch.from_numpy(rows * n + cols), float("inf"))

    return exclude


def _r_counts(ref_codes, q_codes, ref_g, q_g, n_groups, loo):
    """R of every query: same-label references, less the query itself (leave-one-out, no
    groups) or less every same-label reference of its own group (groups)."""
    n_lab = int(ref_codes.max()) + 1 if len(ref_codes) else 0
    lab_count = np.bincount(ref_codes.astype(np.int64), minlength=n_lab)
    qc = q_codes.astype(np.int64)
    r = np.where(qc >= 0, lab_count[qc.clip(0)], 0)
    if ref_g is None:
        return r - (1 if loo else 0)
    pairs, counts = np.unique(ref_codes.astype(np.int64) * n_groups + ref_g, return_counts=True)
    key = qc * n_groups + q_g
    pos = np.searchsorted(pairs, key).clip(0, len(pairs) - 1)
    same_group = np.where((qc >= 0) & (pairs[pos] == key), counts[pos], 0)
    return r - same_group


# ---------------------------------------------------------------- scoring of ranked lists


def _ranked_list_metrics(rel: np.ndarray, kept: np.ndarray, r: np.ndarray, full: bool) -> dict:
    """Per-query metrics of ranked lists: the ONE implementation behind
    :func:`retrieval_metrics` and :func:`ranking_metrics`.

    ``rel`` (b, L) bool: relevance of each query's list, excluded (own-group) items already
    removed, so that the first ``kept[i]`` entries of row i are its list (later ones are
    ignored). ``r`` (b,): R of each query (>= 1). R-Precision and MAP@R use the first
    ``min(R, kept)`` entries; with ``full`` (every candidate in the list) AP over the whole list
    and INP = R / rank of the last relevant item. Summed per query by ``bincount`` over the
    relevant positions (sequentially), so equal lists give bit-equal values.
    """
    b, width = rel.shape
    if width and int(kept.min()) < width:
        rel = rel & (np.arange(width)[None, :] < kept[:, None])
    rc = np.maximum(np.minimum(r, kept), 1)
    rows, cols = np.nonzero(rel)
    cnt = np.bincount(rows, minlength=b)
    start = np.cumsum(cnt) - cnt
    m = np.arange(1, rows.shape[0] + 1) - start[rows]  # rank among the row's relevant items
    prec = m / (cols + 1.0)  # P@i at each relevant position i
    in_r = cols < rc[rows]
    has = cnt > 0
    first = np.full(b, np.iinfo(np.int64).max, dtype=np.int64)  # none: never within any k
    first[has] = cols[start[has]]
    out = {
        "p1": rel[:, 0] if width else np.zeros(b, dtype=bool),
        "first": first,
        "rp": np.bincount(rows, weights=in_r, minlength=b) / rc,
        "map": np.bincount(rows, weights=np.where(in_r, prec, 0.0), minlength=b) / rc,
        "truncated": r > kept,
    }
    if full:
        out["ap"] = np.bincount(rows, weights=prec, minlength=b) / r
        last = np.zeros(b, dtype=np.float64)
        last[has] = cols[(start + cnt - 1)[has]] + 1.0
        out["inp"] = np.where(has, r / np.maximum(last, 1.0), 0.0)
    return out


class _PerQuery:
    """Per-query metric values of the evaluated queries, filled block by block; the means are
    taken once at the end (independent of the block sizes)."""

    def __init__(self, n: int, full: bool):
        self.full = full
        self.p1 = np.zeros(n, dtype=bool)
        self.first = np.zeros(n, dtype=np.int64)
        self.rp, self.map = np.zeros(n), np.zeros(n)
        self.truncated = np.zeros(n, dtype=bool)
        if full:
            self.ap, self.inp = np.zeros(n), np.zeros(n)

    def put(self, rows: np.ndarray, vals: dict) -> None:
        for key, v in vals.items():
            getattr(self, key)[rows] = v

    def metrics(self, valid: np.ndarray, ks: list[int]) -> dict:
        n_valid = int(valid.sum())
        out = {"precision_at_1": float(self.p1[valid].sum()) / n_valid}
        first = self.first[valid]
        for kk in ks:
            out[f"recall_at_{kk}"] = float((first < kk).sum()) / n_valid
        out["r_precision"] = float(self.rp[valid].sum()) / n_valid
        out["map_at_r"] = float(self.map[valid].sum()) / n_valid
        if self.full:
            out["mean_average_precision"] = float(self.ap[valid].sum()) / n_valid
            out["minp"] = float(self.inp[valid].sum()) / n_valid
        return out


def _check_finite(out: dict) -> dict:
    for key, v in list(out.items()):
        if isinstance(v, float) and not math.isfinite(v) and key != "nmi":
            raise InputError(f"metric {key} is not finite")
    return out


def _warn_truncated(truncated: int, r_max: int, k: int, what: str) -> None:
    if truncated:
        warnings.warn(
            f"{truncated} queries have more same-label items ({r_max}) than {what}: "
            "R-Precision and MAP@R are computed on the first "
            f"{'max_k' if what.startswith('max_k') else k} neighbours only",
            stacklevel=3,
        )


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
    groups=None,
    query_groups=None,
    full_ranking: bool | None = None,
) -> dict:
    """All retrieval metrics from one exact k-NN search.

    Leave-one-out over ``(embeddings, labels)``, or ``query_*`` against the reference set
    ``(embeddings, labels)`` (no self-exclusion). ``distance`` defaults to ``"cosine"``, as
    verification, few-shot, the index and the CLI do for L2-normalised embeddings (where it
    ranks exactly as euclidean); pass ``"euclidean"`` for unnormalised ones.

    ``groups`` (one hashable per reference item: camera, session, sequence) and, with
    ``query_embeddings``, ``query_groups``: a query's gallery excludes every reference item of
    its own group (see the module docstring); the result then has ``"groups"``, the number of
    distinct groups. ``full_ranking``: also rank every candidate for ``mean_average_precision``
    and ``minp``; None (the default) turns it on when n_queries x n_references <= 4e8 and
    ``max_k`` is None (else those keys are absent).

    Example:
        >>> import torch
        >>> from tripletlab.metrics import retrieval_metrics
        >>> emb = torch.nn.functional.normalize(torch.randn(100, 8), dim=1)
        >>> m = retrieval_metrics(emb, torch.arange(10).repeat(10), ks=(1, 5), nmi=False)
        >>> sorted(k for k in m if k.startswith("recall"))
        ['recall_at_1', 'recall_at_5']
        >>> 0.0 <= m["minp"] <= m["mean_average_precision"] <= 1.0
        True
    """
    check_distance(distance)
    ref = as_embeddings(embeddings)
    ref_y = as_labels(labels, ref.shape[0])
    ks = check_ks(ks)
    if max_k is not None and (not is_int(max_k) or max_k < 1):
        raise InputError(f"max_k must be a positive integer or None, got {max_k!r}")
    if full_ranking is not None and not isinstance(full_ranking, (bool, np.bool_)):
        raise InputError(f"full_ranking must be True, False or None, got {full_ranking!r}")
    if full_ranking and max_k is not None:
        raise InputError("full_ranking ranks every candidate: it cannot be combined with max_k")
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
    ref_g, q_g, n_groups = _check_groups(groups, query_groups, ref.shape[0], q.shape[0], loo)
    nq, nr = int(q.shape[0]), int(ref.shape[0])
    if full_ranking is None:
        full = max_k is None and nq * nr <= _FULL_RANKING_AUTO
    else:
        full = bool(full_ranking)
    ref_codes, q_codes = _label_codes(ref_y, q_y)
    # R for every query = same-label references outside its group (leave-one-out: not itself)
    r = _r_counts(ref_codes, q_codes, ref_g, q_g, n_groups, loo)
    if ref_g is None:
        cand = np.full(nq, nr - (1 if loo else 0), dtype=np.int64)
    else:  # the candidates of a query: the references outside its group
        cand = nr - np.bincount(ref_g, minlength=n_groups)[q_g]
    need = max(int(r.max()), ks[-1])
    k = need if max_k is None else min(need, int(max_k))
    truncated = int((r > k).sum())
    _warn_truncated(truncated, int(r.max()), k, f"max_k={k}")
    valid = r > 0
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise InputError("no query has another item of its label: retrieval metrics undefined")
    k = min(k, int(cand.max()))
    depth = int(cand.max()) if full else k  # full ranking: every candidate
    per = _PerQuery(nq, full)

    def block(s: int, e: int, idx: torch.Tensor):
        ok = valid[s:e]
        ii = idx.numpy() if ok.all() else idx.numpy()[ok]
        rel = ref_codes[ii] == q_codes[s:e][ok][:, None]  # (b, depth) bool
        # own-group items (+inf) come after every candidate: a list is its first cand entries
        kept = np.minimum(cand[s:e][ok], depth)
        # np.nonzero, not flatnonzero: a test counts flatnonzero calls of the selection
        return s + np.nonzero(ok)[0], _ranked_list_metrics(rel, kept, r[s:e][ok], full)

    for rows, vals in _knn_blocks(
        q, ref, depth, distance, loo, need_distances=False, reduce=block,
        exclude=None if ref_g is None else _group_mask(ref_g, q_g, n_groups),
        block_elems=_FULL_BLOCK_ELEMS if full else _BLOCK_ELEMS,
    ):  # fmt: skip
        per.put(rows, vals)
    out: dict = {
        "n_queries": nq,
        "n_queries_evaluated": n_valid,
        "n_queries_skipped": nq - n_valid,
        "k_searched": int(k),
        "truncated_queries": truncated,
        "r_metrics_exact": truncated == 0,
        "distance": distance,
    }
    if ref_g is not None:
        out["groups"] = n_groups
    out.update(per.metrics(valid, ks))
    if nmi:
        out["nmi"] = nmi_score(ref, ref_y, seed=seed) if loo else nmi_score(q, q_y, seed=seed)
    return _check_finite(out)


def _check_groups(groups, query_groups, n_ref: int, n_q: int, loo: bool):
    """(reference codes, query codes, number of groups), or (None, None, 0) without groups."""
    if groups is None:
        if query_groups is not None:
            raise InputError("query_groups given without groups (the reference items' groups)")
        return None, None, 0
    ref_v = _group_values(groups, n_ref, "groups", "reference items")
    if loo:
        if query_groups is not None:
            raise InputError(
                "query_groups given in leave-one-out mode: there groups serves the queries too"
            )
        q_v = None
    else:
        if query_groups is None:
            raise InputError(
                "groups given for the reference items but no query_groups for the queries"
            )
        q_v = _group_values(query_groups, n_q, "query_groups", "queries")
    ref_g, q_g, n_groups = _encode_groups(ref_v, q_v)
    return ref_g, q_g, n_groups


def _as_indices(indices: Any, n_q: int, n_ref: int) -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    if isinstance(indices, (list, tuple)):
        indices = np.asarray(indices)
    if not isinstance(indices, np.ndarray):
        raise InputTypeError(
            f"indices must be a numpy array or torch tensor, got {type(indices).__name__}"
        )
    if indices.dtype.kind not in "iu":
        raise InputTypeError(f"indices must be integers, got dtype {indices.dtype}")
    if indices.ndim != 2:
        raise InputError(f"indices must be 2-D (n_queries, k), got shape {indices.shape}")
    if indices.shape[0] != n_q:
        raise InputError(f"indices has {indices.shape[0]} rows but there are {n_q} queries")
    if indices.shape[1] == 0:
        raise InputError("indices must hold at least one neighbour per query")
    return indices.astype(np.int64, copy=False)


def _check_lists(ii: np.ndarray, s: int, n_ref: int, exclude_self: bool) -> None:
    """Every entry a reference index, no repeat in a row, not the query itself (leave-one-out)."""
    bad = (ii < 0) | (ii >= n_ref)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise InputError(
            f"indices[{s + i}, {j}] = {ii[i, j]} is not a reference index in [0, {n_ref})"
        )
    if exclude_self:
        selfs = ii == np.arange(s, s + ii.shape[0])[:, None]
        if selfs.any():
            i = int(np.argwhere(selfs)[0][0])
            raise InputError(
                f"indices row {s + i} lists the query itself (exclude_self: item i must not "
                "retrieve i)"
            )
    if ii.shape[1] > 1:
        srt = np.sort(ii, axis=1)
        dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
        if dup.any():
            raise InputError(f"indices row {s + int(np.flatnonzero(dup)[0])} repeats an index")


def ranking_metrics(
    indices,
    query_labels,
    reference_labels,
    *,
    ks: Sequence[int] = (1, 5, 10),
    exclude_self: bool = False,
    query_groups=None,
    groups=None,
    n_candidates: int | None = None,
    per_query: bool = False,
) -> dict:
    """The retrieval metrics of GIVEN ranked lists: ``indices`` (n_queries, L), row q the
    reference indices ranked for query q, best first (e.g. after query expansion or
    re-ranking).

    Keys as in :func:`retrieval_metrics` (``precision_at_1``, ``recall_at_k``,
    ``r_precision``, ``map_at_r``; ``mean_average_precision`` and ``minp`` when the lists are
    full rankings, i.e. L >= ``n_candidates``, by default every reference item, less the query
    itself with ``exclude_self``), computed by the same code: the k-NN lists of
    :func:`knn_search` give exactly the numbers of :func:`retrieval_metrics`.
    ``exclude_self``: leave-one-out, queries are the reference items (``query_labels`` equal
    to ``reference_labels``) and row i must not list i. ``groups`` (and ``query_groups``
    without ``exclude_self``): own-group items are dropped from a list (the junk rule) before
    scoring. A list with fewer (kept) entries than a query's R truncates its R-metrics
    (``truncated_queries``, ``r_metrics_exact``, a warning); ``recall_at_k`` for k beyond a
    list is measured on the whole list. ``per_query``: also ``"per_query": {"precision_at_1",
    "map_at_r"}``, arrays (n_queries,) with NaN for the skipped queries (for paired
    comparisons, e.g. the bootstrap of :mod:`tripletlab.metrics.postprocess_select`).

    Example:
        >>> import numpy as np
        >>> y = np.array([0, 0, 1, 1])
        >>> m = ranking_metrics(np.array([[1, 2, 3], [2, 0, 3], [3, 0, 1], [0, 2, 1]]), y, y,
        ...                     ks=(1,), exclude_self=True)
        >>> m["precision_at_1"], m["map_at_r"], m["mean_average_precision"], m["minp"]
        (0.5, 0.5, 0.75, 0.75)
    """
    ks = check_ks(ks)
    if n_candidates is not None and not is_int(n_candidates):
        raise InputError(f"n_candidates must be a positive integer or None, got {n_candidates!r}")
    if isinstance(query_labels, (list, tuple)):
        query_labels = np.asarray(query_labels)
    if isinstance(reference_labels, (list, tuple)):
        reference_labels = np.asarray(reference_labels)
    n_ref = len(reference_labels) if hasattr(reference_labels, "__len__") else -1
    ref_y = as_labels(reference_labels, max(n_ref, 0), "reference_labels")
    n_q = len(query_labels) if hasattr(query_labels, "__len__") else -1
    q_y = as_labels(query_labels, max(n_q, 0), "query_labels")
    nq, nr = int(q_y.shape[0]), int(ref_y.shape[0])
    if nq == 0 or nr == 0:
        raise InputError("ranking metrics need at least one query and one reference item")
    if exclude_self and (nq != nr or not bool((q_y == ref_y).all())):
        raise InputError(
            "exclude_self: the queries are the reference items, so query_labels must equal "
            "reference_labels"
        )
    ii_all = _as_indices(indices, nq, nr)
    width = ii_all.shape[1]
    ref_g, q_g, n_groups = _check_groups(groups, query_groups, nr, nq, exclude_self)
    default_cand = nr - (1 if exclude_self else 0)
    if n_candidates is None:
        n_candidates = default_cand
    if not 1 <= n_candidates <= nr:
        raise InputError(f"n_candidates must be in [1, {nr}], got {n_candidates}")
    full = width >= n_candidates
    ref_codes, q_codes = _label_codes(ref_y, q_y)
    r = _r_counts(ref_codes, q_codes, ref_g, q_g, n_groups, exclude_self)
    valid = r > 0
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise InputError("no query has another item of its label: retrieval metrics undefined")
    per = _PerQuery(nq, full)
    step = max(1, _FULL_BLOCK_ELEMS // width)
    for s in range(0, nq, step):
        e = min(nq, s + step)
        ii = ii_all[s:e]
        _check_lists(ii, s, nr, exclude_self)
        ok = valid[s:e]
        ii = ii[ok]
        rel = ref_codes[ii] == q_codes[s:e][ok][:, None]
        kept = np.full(ii.shape[0], width, dtype=np.int64)
        if ref_g is not None:  # the junk rule: own-group items leave the list
            keep = ref_g[ii] != q_g[s:e][ok][:, None]
            kept = keep.sum(axis=1)
            if (keep[:, 1:] & ~keep[:, :-1]).any():  # a dropped item before a kept one
                order = np.argsort(~keep, axis=1, kind="stable")
                rel = np.take_along_axis(rel & keep, order, axis=1)
        per.put(s + np.flatnonzero(ok), _ranked_list_metrics(rel, kept, r[s:e][ok], full))
    truncated = int(per.truncated[valid].sum())
    _warn_truncated(truncated, int(r.max()), width, "the lists hold")
    out: dict = {
        "n_queries": nq,
        "n_queries_evaluated": n_valid,
        "n_queries_skipped": nq - n_valid,
        "list_length": width,
        "truncated_queries": truncated,
        "r_metrics_exact": truncated == 0,
    }
    if ref_g is not None:
        out["groups"] = n_groups
    out.update(per.metrics(valid, ks))
    out = _check_finite(out)
    if per_query:
        out["per_query"] = {
            "precision_at_1": np.where(valid, per.p1.astype(np.float64), np.nan),
            "map_at_r": np.where(valid, per.map, np.nan),
        }
    return out
