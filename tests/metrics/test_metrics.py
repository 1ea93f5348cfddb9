"""Metrics against brute-force loops, scikit-learn and pytorch-metric-learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from tripletlab import InputError, InputTypeError
from tripletlab.metrics import (
    best_threshold,
    few_shot_accuracy,
    knn_search,
    pairs_from_labels,
    retrieval_metrics,
    verification_metrics,
)


def _data(n=60, d=5, n_cls=6, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(dtype), rng.integers(0, n_cls, n)


def _brute_retrieval(emb, y, ks, q=None, qy=None):
    loo = q is None
    q, qy = (emb, y) if loo else (q, qy)
    out = {f"recall_at_{k}": [] for k in ks}
    p1, rp, mapr = [], [], []
    for i in range(len(q)):
        d = [float(np.linalg.norm(q[i] - emb[j])) for j in range(len(emb))]
        cand = [j for j in range(len(emb)) if not (loo and j == i)]
        order = sorted(cand, key=lambda j: (d[j], j))
        rel = [int(y[j] == qy[i]) for j in order]
        r = sum(1 for j in cand if y[j] == qy[i])
        if r == 0:
            continue
        p1.append(rel[0])
        for k in ks:
            out[f"recall_at_{k}"].append(int(any(rel[:k])))
        rp.append(sum(rel[:r]) / r)
        ap, hits = 0.0, 0
        for i_rank, rv in enumerate(rel[:r], start=1):
            if rv:
                hits += 1
                ap += hits / i_rank
        mapr.append(ap / r)
    res = {k: float(np.mean(v)) for k, v in out.items()}
    res.update(
        precision_at_1=float(np.mean(p1)),
        r_precision=float(np.mean(rp)),
        map_at_r=float(np.mean(mapr)),
        n_queries_evaluated=len(p1),
    )
    return res


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), ties=st.booleans(), n_cls=st.integers(2, 8))
def test_retrieval_equals_bruteforce(seed, ties, n_cls):
    emb, y = _data(40, 3, n_cls, seed)
    if ties:  # integer grid: many exactly equal distances
        emb = np.round(emb * 1.5)
    ks = (1, 2, 4, 8)
    got = retrieval_metrics(emb, y, ks=ks, nmi=False, distance="euclidean")
    want = _brute_retrieval(emb, y, ks)
    for key, v in want.items():
        assert got[key] == pytest.approx(v, abs=1e-12), key
    assert got["n_queries_skipped"] == 40 - want["n_queries_evaluated"]


def test_query_vs_reference_and_recall_monotone():
    emb, y = _data(50, 4, 5, 1)
    q, qy = _data(20, 4, 7, 2)  # labels 5, 6 have no reference item: skipped
    got = retrieval_metrics(
        emb, y, ks=(1, 3, 5), query_embeddings=q, query_labels=qy, nmi=False, distance="euclidean"
    )
    want = _brute_retrieval(emb, y, (1, 3, 5), q, qy)
    for key, v in want.items():
        assert got[key] == pytest.approx(v, abs=1e-12), key
    assert got["recall_at_1"] <= got["recall_at_3"] <= got["recall_at_5"]


def test_labels_compared_as_integers_not_float32():
    emb, _ = _data(4, 2, 2, 0)
    y = np.array([2**24, 2**24 + 1, 2**24, 2**24 + 1])  # equal as float32
    emb = np.array([[0.0, 0], [0, 0.1], [5, 5], [5, 5.1]])
    m = retrieval_metrics(emb, y, ks=(1,), nmi=False, distance="euclidean")
    assert m["precision_at_1"] == 0.0  # nearest neighbour always has the other label


def test_max_k_truncation_is_reported():
    emb, y = _data(60, 3, 2, 3)
    with pytest.warns(UserWarning, match="max_k"):
        m = retrieval_metrics(emb, y, ks=(1,), max_k=5, nmi=False, distance="euclidean")
    assert not m["r_metrics_exact"] and m["truncated_queries"] > 0


def test_retrieval_matches_pml_accuracy_calculator():
    ac_mod = pytest.importorskip(
        "pytorch_metric_learning.utils.accuracy_calculator",
        reason="pytorch-metric-learning not installed (dev extra)",
    )
    emb, y = _data(300, 8, 12, 4, np.float32)
    calc = ac_mod.AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count"
    )
    theirs = calc.get_accuracy(torch.from_numpy(emb), torch.from_numpy(y))
    ours = retrieval_metrics(emb, y, nmi=False, distance="euclidean")
    assert ours["precision_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)


def test_knn_large_reference_uses_topk_and_is_exact():
    rng = np.random.default_rng(0)
    ref = torch.from_numpy(rng.normal(size=(5000, 4)))
    q = torch.from_numpy(rng.normal(size=(7, 4)))
    d, i = knn_search(q, ref, 5, distance="euclidean")
    full = torch.cdist(q, ref)
    want_d, _ = full.sort(dim=1)
    assert torch.allclose(d, want_d[:, :5], atol=1e-9)
    assert torch.allclose(full.gather(1, i), d, atol=1e-9)
    dc, ic = knn_search(q, ref, 3, distance="cosine")
    cos = 1 - torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(ref, dim=1).T
    assert torch.allclose(dc, cos.sort(dim=1).values[:, :3], atol=1e-9)


def test_verification_against_sklearn_and_bruteforce():
    emb, y = _data(45, 4, 5, 6)
    m = verification_metrics(emb, y, distance="euclidean", return_curve=True)
    pairs = pairs_from_labels(y)
    assert len(pairs) == 45 * 44 // 2
    d = np.array([np.linalg.norm(emb[i] - emb[j]) for i, j in pairs])
    same = y[pairs[:, 0]] == y[pairs[:, 1]]
    assert m["roc_auc"] == pytest.approx(roc_auc_score(same, -d), abs=1e-12)
    assert m["n_pairs_same"] == same.sum()
    best = max(((d <= t) == same).mean() for t in np.concatenate([[-1.0], d]))
    assert m["accuracy"] == pytest.approx(best)
    assert ((d <= m["threshold"]) == same).mean() == pytest.approx(best)
    # TAR@FAR by brute force over thresholds
    for far, tar in m["tar_at_far"].items():
        cands = [((d[same] <= t).mean(), (d[~same] <= t).mean()) for t in np.sort(d)]
        want = max([tp for tp, fp in cands if fp <= far] + [0.0])
        assert tar == pytest.approx(want)
    # EER lies where FAR ~ FRR
    assert 0.0 <= m["eer"] <= 1.0
    assert 0.5 <= m["accuracy_10fold_mean"] <= 1.0


def test_verification_perfect_separation_and_explicit_pairs():
    d = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    same = np.array([1, 1, 1, 0, 0])
    m = verification_metrics(distances=d, pair_labels=same)
    assert m["roc_auc"] == 1.0 and m["eer"] == 0.0 and m["accuracy"] == 1.0
    assert 0.3 <= m["threshold"] < 0.8
    t, acc = best_threshold(d, same.astype(bool))
    assert acc == 1.0 and 0.3 <= t < 0.8


def test_sampled_pairs_are_distinct_and_valid():
    p = pairs_from_labels(np.zeros(1000), max_pairs=5000, seed=3)
    assert p.shape == (5000, 2) and (p[:, 0] < p[:, 1]).all() and p.max() < 1000
    assert len({tuple(r) for r in p}) == 5000
    assert np.array_equal(p, pairs_from_labels(np.zeros(1000), max_pairs=5000, seed=3))


def test_few_shot_bruteforce_and_separable():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 8)) * 10
    y = np.repeat(np.arange(10), 6)
    emb = centers[y] + rng.normal(size=(60, 8)) * 0.01
    m = few_shot_accuracy(emb, y, n_way=5, k_shot=1, n_query=3, n_episodes=50, distance="euclidean")
    assert m["accuracy"] == 1.0 and m["ci95"] == 0.0
    noisy = rng.normal(size=(60, 8))
    m2 = few_shot_accuracy(
        noisy, y, n_way=5, k_shot=1, n_query=3, n_episodes=400, seed=1, distance="euclidean"
    )
    assert abs(m2["accuracy"] - 0.2) < 0.06 and m2["ci95"] > 0


BAD = [
    (lambda: retrieval_metrics(np.zeros(5), np.arange(5), distance="euclidean"), InputError, "2-D"),
    (
        lambda: retrieval_metrics(np.zeros((5, 2)), np.arange(4), distance="euclidean"),
        InputError,
        "entries",
    ),
    (
        lambda: retrieval_metrics(np.zeros((5, 2)), np.arange(5.0), distance="euclidean"),
        InputTypeError,
        "integer",
    ),
    (
        lambda: retrieval_metrics(np.full((5, 2), np.nan), np.arange(5), distance="euclidean"),
        InputError,
        "NaN",
    ),
    (
        lambda: retrieval_metrics(np.zeros((5, 2)), np.arange(5), ks=(0,), distance="euclidean"),
        InputError,
        "ks",
    ),
    (
        lambda: retrieval_metrics(np.zeros((5, 2)), np.arange(5), distance="l1"),
        InputError,
        "distance",
    ),
    (
        lambda: retrieval_metrics(np.zeros((5, 2)), np.arange(5), distance="euclidean"),
        InputError,
        "no query",
    ),
    (lambda: verification_metrics(np.zeros((4, 2)), np.arange(4)), InputError, "same"),
    (
        lambda: few_shot_accuracy(np.zeros((6, 2)), np.arange(6), n_way=5, distance="euclidean"),
        InputError,
        "qualify",
    ),
]


@pytest.mark.parametrize("call, exc, words", BAD)
def test_bad_inputs(call, exc, words):
    with pytest.raises(exc, match=words):
        call()
