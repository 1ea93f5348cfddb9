"""Retrieval metrics vs a brute-force loop, pytorch-metric-learning and properties; and the
shared table of bad inputs applied to every metric function."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tripletlab import InputError, InputTypeError
from tripletlab.metrics import (
    few_shot_accuracy,
    knn_search,
    nmi_score,
    pair_distances,
    per_class_retrieval,
    retrieval,
    retrieval_metrics,
    verification_metrics,
)


def _data(n=60, d=5, n_cls=6, seed=0, dtype=np.float64, grid=False):
    """Random embeddings and labels; ``grid``: small integer coordinates, so many euclidean
    distances are exactly equal (and exactly computed in float32 and float64)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    if grid:
        x = np.round(x * 1.5)
    return x.astype(dtype), rng.integers(0, n_cls, n)


def _axis_data(n, d, n_cls, seed, dtype):
    """Scaled signed basis vectors: cosine distances are exactly 0, 1 or 2 (exact ties)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, d))
    x[np.arange(n), rng.integers(0, d, n)] = rng.choice([-2.0, -1.0, 1.0, 4.0], n)
    return x.astype(dtype), rng.integers(0, n_cls, n)


def _dist(a, b, distance):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if distance == "cosine":
        na, nb = max(np.linalg.norm(a), 1e-300), max(np.linalg.norm(b), 1e-300)
        return 1.0 - float(a @ b) / (na * nb)
    return float(np.sqrt(((a - b) ** 2).sum()))


def _brute_order(q, ref, i, distance, loo):
    """Reference indices by (distance, index): the documented tie order."""
    cand = [j for j in range(len(ref)) if not (loo and j == i)]
    d = {j: _dist(q[i], ref[j], distance) for j in cand}
    return sorted(cand, key=lambda j: (d[j], j)), d


def _brute_retrieval(ref, y, ks, q=None, qy=None, distance="euclidean", max_k=None):
    """Plain-loop Musgrave et al. 2020 definitions."""
    loo = q is None
    q, qy = (ref, y) if loo else (q, qy)
    rec = {k: [] for k in ks}
    p1, rp, mapr = [], [], []
    for i in range(len(q)):
        order, _ = _brute_order(q, ref, i, distance, loo)
        rel = [int(y[j] == qy[i]) for j in order]
        r = sum(rel)
        if r == 0:
            continue
        r_cut = r if max_k is None else min(r, max_k)
        p1.append(rel[0])
        for k in ks:
            rec[k].append(int(any(rel[:k])))
        rp.append(sum(rel[:r_cut]) / r_cut)
        ap, hits = 0.0, 0
        for rank, rv in enumerate(rel[:r_cut], start=1):
            if rv:
                hits += 1
                ap += hits / rank
        mapr.append(ap / r_cut)
    res = {f"recall_at_{k}": float(np.mean(v)) for k, v in rec.items()}
    res.update(
        precision_at_1=float(np.mean(p1)),
        r_precision=float(np.mean(rp)),
        map_at_r=float(np.mean(mapr)),
        n_queries_evaluated=len(p1),
    )
    return res


def _check(got, want, atol=1e-12):
    for key, v in want.items():
        assert got[key] == pytest.approx(v, abs=atol), key


# ------------------------------------------------------------------------ brute force


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    grid=st.booleans(),
    n_cls=st.integers(2, 8),
    distance=st.sampled_from(["euclidean", "cosine"]),
    dtype=st.sampled_from([np.float64, np.float32]),
)
def test_leave_one_out_equals_bruteforce(seed, grid, n_cls, distance, dtype):
    if grid and distance == "cosine":
        emb, y = _axis_data(40, 3, n_cls, seed, dtype)
    else:
        emb, y = _data(40, 3, n_cls, seed, dtype, grid)
    ks = (1, 2, 4, 8)
    got = retrieval_metrics(emb, y, ks=ks, nmi=False, distance=distance)
    want = _brute_retrieval(emb, y, ks, distance=distance)
    _check(got, want, 1e-12 if dtype == np.float64 else 1e-6)
    assert got["n_queries_skipped"] == 40 - want["n_queries_evaluated"]
    assert got["n_queries"] == 40 and got["r_metrics_exact"]


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_query_vs_reference_equals_bruteforce(distance):
    emb, y = _data(50, 4, 5, 1)
    q, qy = _data(20, 4, 7, 2)  # labels 5, 6 have no reference item: left out and counted
    got = retrieval_metrics(
        emb, y, ks=(1, 3, 5), query_embeddings=q, query_labels=qy, nmi=False, distance=distance
    )
    want = _brute_retrieval(emb, y, (1, 3, 5), q, qy, distance)
    _check(got, want)
    assert got["n_queries_skipped"] == int(np.isin(qy, [5, 6]).sum()) > 0
    # a query identical to a reference item is not excluded (no self-exclusion)
    same = retrieval_metrics(
        emb, y, ks=(1,), query_embeddings=emb, query_labels=y, nmi=False, distance="euclidean"
    )
    assert same["precision_at_1"] == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_reference_ties_equal_bruteforce(dtype, monkeypatch):
    """Reference sets above the full-sort size (and small blocks) take the fast selection
    paths; ties must still be ordered by index, as in the brute force."""
    monkeypatch.setattr(retrieval, "_FULL_SORT_MAX", 8)
    monkeypatch.setattr(retrieval, "_BLOCK_ELEMS", 600)
    emb, y = _data(90, 2, 3, 5, dtype, grid=True)
    got = retrieval_metrics(emb, y, ks=(1, 2, 3), nmi=False, distance="euclidean")
    _check(got, _brute_retrieval(emb, y, (1, 2, 3)), 1e-6)
    d, i = knn_search(emb, emb, 7, exclude_self=True, distance="euclidean")
    for row in range(90):
        order, dist = _brute_order(emb, emb, row, "euclidean", True)
        assert i[row].tolist() == order[:7]
        np.testing.assert_allclose(d[row].numpy(), [dist[j] for j in order[:7]], atol=1e-5)


@pytest.mark.parametrize("order", ["random", "by_label"])
def test_sampled_threshold_and_threaded_selection_equal_bruteforce(order, monkeypatch):
    """Long float32 rows take the sampled-threshold selection, split over two threads; with
    ties (grid data, duplicates) and a biased sample (items sorted by label) the result must
    still be the brute force's, and rows whose threshold catches too few items fall back."""
    monkeypatch.setattr(retrieval, "_PREFILTER_MIN_N", 32)
    monkeypatch.setattr(retrieval, "_SAMPLE_STRIDE", 4)
    monkeypatch.setattr(retrieval, "_PARALLEL_MIN_ELEMS", 1)
    monkeypatch.setattr(retrieval, "_BLOCK_ELEMS", 2000)
    emb, y = _data(120, 2, 12, 7, np.float32, grid=True)
    emb[10:20] = emb[5]  # duplicates: exact ties across the threshold
    if order == "by_label":
        perm = np.argsort(y, kind="stable")
        emb, y = emb[perm], y[perm]
    compacted = []
    real_flatnonzero = np.flatnonzero
    monkeypatch.setattr(
        retrieval.np, "flatnonzero", lambda a: compacted.append(1) or real_flatnonzero(a)
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = retrieval_metrics(emb, y, ks=(1, 2, 5), nmi=False, distance="euclidean")
        d, i = knn_search(emb, emb, 9, exclude_self=True, distance="euclidean")
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()
    assert compacted, "the sampled-threshold path was not taken"
    _check(got, _brute_retrieval(emb, y, (1, 2, 5)), 1e-6)
    for row in range(120):
        want, _ = _brute_order(emb, emb, row, "euclidean", True)
        assert i[row].tolist() == want[:9]


def test_sampled_threshold_selection_is_exact_on_adversarial_rows(monkeypatch):
    """The selection core against a full sort of (score, index): constant rows, rows sorted
    ascending (the sample sees only small scores) and descending, many zeros, k = 1 and k = n."""
    monkeypatch.setattr(retrieval, "_PREFILTER_MIN_N", 16)
    rng = np.random.default_rng(3)
    n = 400
    rows = [
        np.full(n, 0.5),
        np.sort(rng.random(n)),
        np.sort(rng.random(n))[::-1],
        np.where(rng.random(n) < 0.3, 0.0, rng.random(n)),
        np.round(rng.random(n) * 4) / 4,
    ]
    sc = np.ascontiguousarray(np.stack(rows), dtype=np.float32)
    for k in (1, 3, 17, 60, n):
        keys = retrieval._smallest_keys(sc, k)
        for r, row in enumerate(sc):
            want = sorted(range(n), key=lambda j, row=row: (row[j], j))[:k]
            assert (keys[r] & 0xFFFFFFFF).tolist() == want, (r, k)


def test_knn_search_matches_cdist_and_orders_ties_by_index():
    rng = np.random.default_rng(0)
    ref = torch.from_numpy(rng.normal(size=(5000, 4)).astype(np.float32))
    q = torch.from_numpy(rng.normal(size=(7, 4)).astype(np.float32))
    d, i = knn_search(q, ref, 5, distance="euclidean")
    full = torch.cdist(q.double(), ref.double())
    assert torch.allclose(d.double(), full.sort(dim=1).values[:, :5], atol=1e-4)
    assert torch.allclose(full.gather(1, i), d.double(), atol=1e-4)
    dc, _ = knn_search(q, ref, 3, distance="cosine")
    cos = 1 - torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(ref, dim=1).T
    assert torch.allclose(dc, cos.sort(dim=1).values[:, :3], atol=1e-5)
    dup = torch.zeros(10, 3)  # all identical: every distance ties
    _, idx = knn_search(dup, dup, 9, exclude_self=True, distance="euclidean")
    assert idx[4].tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    _, idx = knn_search(dup[:1], dup, 100, distance="euclidean")  # k clamped to the reference size
    assert idx.tolist() == [list(range(10))]


def test_matches_pml_accuracy_calculator():
    ac_mod = pytest.importorskip(
        "pytorch_metric_learning.utils.accuracy_calculator",
        reason="pytorch-metric-learning not installed (dev extra)",
    )
    emb, y = _data(400, 8, 12, 4, np.float32)  # tie-free random floats
    calc = ac_mod.AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    theirs = calc.get_accuracy(torch.from_numpy(emb), torch.from_numpy(y))
    ours = retrieval_metrics(emb, y, nmi=False, distance="euclidean")
    assert ours["precision_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    q, qy = _data(100, 8, 12, 5, np.float32)
    theirs = calc.get_accuracy(
        torch.from_numpy(q), torch.from_numpy(qy), torch.from_numpy(emb), torch.from_numpy(y)
    )
    ours = retrieval_metrics(
        emb, y, query_embeddings=q, query_labels=qy, nmi=False, distance="euclidean"
    )
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)


def test_labels_compared_as_integers_not_float32():
    y = np.array([2**24, 2**24 + 1, 2**24, 2**24 + 1])  # equal once cast to float32
    emb = np.array([[0.0, 0], [0, 0.1], [5, 5], [5, 5.1]])
    m = retrieval_metrics(emb, y, ks=(1,), nmi=False, distance="euclidean")
    assert m["precision_at_1"] == 0.0  # the nearest neighbour always has the other label
    assert m["map_at_r"] == pytest.approx(_brute_retrieval(emb, y, (1,))["map_at_r"])


def test_max_k_truncation_is_flagged_and_exact_up_to_the_cap():
    emb, y = _data(60, 3, 2, 3)
    with pytest.warns(UserWarning, match="max_k"):
        m = retrieval_metrics(emb, y, ks=(1,), max_k=5, nmi=False, distance="euclidean")
    assert not m["r_metrics_exact"] and m["truncated_queries"] == 60 and m["k_searched"] == 5
    _check(m, _brute_retrieval(emb, y, (1,), max_k=5))
    full = retrieval_metrics(emb, y, ks=(1,), max_k=1000, nmi=False, distance="euclidean")
    assert full["r_metrics_exact"] and full["truncated_queries"] == 0


def test_k_beyond_candidates_is_clamped_and_inputs_agree():
    emb, y = _data(12, 3, 3, 6)
    m = retrieval_metrics(
        torch.from_numpy(emb), torch.from_numpy(y), ks=(1, 50), nmi=False, distance="euclidean"
    )
    assert m["recall_at_50"] == 1.0  # every query with a positive finds it among all items
    m2 = retrieval_metrics(emb, y.tolist(), ks=(1, 50), nmi=False, distance="euclidean")
    m3 = retrieval_metrics(
        emb.astype(np.float32), y.astype(np.int32), ks=(1, 50), nmi=False, distance="euclidean"
    )
    assert m == m2
    _check(m3, {k: m[k] for k in ("precision_at_1", "r_precision", "map_at_r")}, 1e-6)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    ks=st.lists(st.integers(1, 40), min_size=2, max_size=6, unique=True),
    grid=st.booleans(),
)
def test_recall_at_k_is_non_decreasing_in_k(seed, ks, grid):
    emb, y = _data(30, 2, 4, seed, grid=grid)
    m = retrieval_metrics(emb, y, ks=ks, nmi=False, distance="euclidean")
    vals = [m[f"recall_at_{k}"] for k in sorted(ks)]
    assert all(a <= b for a, b in zip(vals, vals[1:], strict=False))
    assert m["recall_at_1"] == m["precision_at_1"] if 1 in ks else True
    assert 0.0 <= m["map_at_r"] <= m["r_precision"] + 1e-12 <= 1.0 + 1e-12


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_invariant_to_permuting_items(seed):
    emb, y = _data(30, 4, 4, seed)  # tie-free
    perm = np.random.default_rng(seed).permutation(30)
    a = retrieval_metrics(emb, y, ks=(1, 3), nmi=False, distance="euclidean")
    b = retrieval_metrics(emb[perm], y[perm], ks=(1, 3), nmi=False, distance="euclidean")
    _check(b, {k: a[k] for k in ("recall_at_1", "recall_at_3", "r_precision", "map_at_r")})


def test_perfect_and_nmi():
    centers = np.eye(4) * 10
    y = np.repeat(np.arange(4), 5)
    emb = centers[y] + np.random.default_rng(0).normal(size=(20, 4)) * 0.01
    m = retrieval_metrics(emb, y, ks=(1, 4), distance="euclidean")
    assert m["precision_at_1"] == m["r_precision"] == m["map_at_r"] == 1.0
    assert m["nmi"] == pytest.approx(1.0)
    assert nmi_score(emb, y, seed=1) == pytest.approx(1.0)
    noise, _ = _data(200, 4, 4, 1)
    yy = np.random.default_rng(2).integers(0, 4, 200)
    assert nmi_score(noise, yy) < 0.1
    assert nmi_score(noise, yy, seed=3) == nmi_score(noise, yy, seed=3)  # seeded
    assert "nmi" not in retrieval_metrics(emb, y, nmi=False, distance="euclidean")


# ------------------------------------------------------------- shared bad-input table

E2, Y5 = np.zeros((5, 2)), np.arange(5)


def _retrieval(emb, labels, **kw):
    return retrieval_metrics(emb, labels, nmi=False, **kw)


def _verification(emb, labels, **kw):
    return verification_metrics(emb, labels, **kw)


def _fewshot(emb, labels, **kw):
    return few_shot_accuracy(emb, labels, n_way=2, n_query=1, n_episodes=2, **kw)


def _knn(emb, labels, **kw):
    return knn_search(emb, emb, 1, **kw)


def _pairs(emb, labels, **kw):
    return pair_distances(emb, [[0, 1]], **kw)


METRICS = {
    "retrieval": _retrieval,
    "verification": _verification,
    "few_shot": _fewshot,
    "knn_search": _knn,
    "pair_distances": _pairs,
    "per_class": per_class_retrieval,
}
USES_LABELS = {"retrieval", "verification", "few_shot", "per_class"}
COMMON_BAD = [  # (embeddings, labels, extra kwargs, exception, message words)
    (np.zeros(5), Y5, {}, InputError, "2-D"),
    (np.zeros((5, 2, 1)), Y5, {}, InputError, "2-D"),
    (np.full((5, 2), np.nan), Y5, {}, InputError, "NaN"),
    (np.full((5, 2), np.inf), Y5, {}, InputError, "NaN or Inf"),
    ([[0.0, 1.0]] * 5, Y5, {}, InputTypeError, "numpy array or torch tensor"),
    (E2, Y5, {"distance": "l1"}, InputError, "distance"),
]
LABEL_BAD = [
    (E2, np.arange(4), {}, InputError, "entries"),
    (E2, np.arange(5.0), {}, InputTypeError, "integer"),
    (E2, torch.zeros(5, dtype=torch.bool), {}, InputTypeError, "integer"),
    (E2, np.zeros((5, 1), dtype=int), {}, InputError, "1-D"),
    (E2, "abcde", {}, InputTypeError, "numpy array or torch tensor"),
]


SHARED_CASES = [
    pytest.param(name, *case, id=f"{name}-{i}")
    for name in METRICS
    for i, case in enumerate(COMMON_BAD + (LABEL_BAD if name in USES_LABELS else []))
]


@pytest.mark.parametrize("name, emb, labels, kw, exc, words", SHARED_CASES)
def test_shared_bad_inputs(name, emb, labels, kw, exc, words):
    with pytest.raises(exc, match=words):
        METRICS[name](emb, labels, **kw)


SPECIFIC_BAD = [
    (lambda: _retrieval(E2, Y5, ks=(0,)), "ks"),
    (lambda: _retrieval(E2, Y5, ks=()), "ks"),
    (lambda: _retrieval(E2, Y5, ks=(1.5,)), "ks"),
    (lambda: _retrieval(E2, Y5, ks=(True,)), "ks"),
    (lambda: _retrieval(E2, Y5, ks="5"), "ks"),
    (lambda: _retrieval(E2, Y5, max_k=0), "max_k"),
    (lambda: _retrieval(E2, Y5), "no query"),  # every label a singleton
    (lambda: _retrieval(np.zeros((0, 2)), np.arange(0)), "at least one"),
    (lambda: _retrieval(E2, Y5, query_embeddings=np.zeros((2, 3)), query_labels=[0, 1]), "dim"),
    (lambda: _retrieval(E2, Y5, query_embeddings=np.zeros((2, 2)), query_labels=[0]), "entries"),
    (lambda: _retrieval(E2, Y5, query_labels=[0]), "query_labels"),
    (lambda: knn_search(E2, E2, 0, distance="euclidean"), "k must"),
    (
        lambda: knn_search(E2, np.zeros((3, 2)), 1, exclude_self=True, distance="euclidean"),
        "exclude_self",
    ),
    (lambda: knn_search(E2, np.zeros((3, 4)), 1, distance="euclidean"), "dimension"),
]


@pytest.mark.parametrize("call, words", SPECIFIC_BAD)
def test_retrieval_specific_bad_inputs(call, words):
    with pytest.raises(InputError, match=words):
        call()
