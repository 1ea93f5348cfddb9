"""per_class_retrieval against a brute-force loop over every query, ties included."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tripletlab import InputError
from tripletlab.metrics import per_class as per_class_module
from tripletlab.metrics import per_class_retrieval, retrieval_metrics


def _brute_per_class(emb, y):
    """Plain loops: each query's other items sorted by (distance, index), averaged per class."""
    n = len(y)
    per = {}
    for i in range(n):
        d = [float(np.linalg.norm(emb[i] - emb[j])) for j in range(n)]
        order = sorted((j for j in range(n) if j != i), key=lambda j: (d[j], j))
        rel = [int(y[j] == y[i]) for j in order]
        r = sum(rel)
        c = per.setdefault(int(y[i]), {"n": 0, "p1": [], "rp": [], "ap": [], "top1": []})
        c["n"] += 1
        if y[order[0]] != y[i]:
            c["top1"].append(int(y[order[0]]))
        if r == 0:
            continue
        c["p1"].append(rel[0])
        c["rp"].append(sum(rel[:r]) / r)
        hits, ap = 0, 0.0
        for rank, rv in enumerate(rel[:r], start=1):
            if rv:
                hits += 1
                ap += hits / rank
        c["ap"].append(ap / r)
    out = {}
    for label, c in per.items():
        confused, cnt = None, 0
        for other in sorted(set(c["top1"])):
            if c["top1"].count(other) > cnt:
                confused, cnt = other, c["top1"].count(other)
        out[label] = {
            "n_items": c["n"],
            "n_queries": len(c["p1"]),
            "precision_at_1": float(np.mean(c["p1"])) if c["p1"] else None,
            "r_precision": float(np.mean(c["rp"])) if c["rp"] else None,
            "map_at_r": float(np.mean(c["ap"])) if c["ap"] else None,
            "wrong_at_1": len(c["top1"]),
            "confused_with": confused,
            "confused_count": cnt,
        }
    return out


def _check_sorted(rows):
    keys = [(r["map_at_r"] is None, r["map_at_r"] or 0.0, r["label"]) for r in rows]
    assert keys == sorted(keys)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), ties=st.booleans(), n_cls=st.integers(2, 9))
def test_per_class_equals_bruteforce(seed, ties, n_cls):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(36, 3))
    if ties:  # integer grid: many exactly equal distances
        emb = np.round(emb * 1.5)
    y = rng.integers(0, n_cls, 36) * 7 + 3  # labels need not be 0..C-1
    rows = per_class_retrieval(emb, y, distance="euclidean")
    want = _brute_per_class(emb, y)
    assert sorted(r["label"] for r in rows) == sorted(want)
    for row in rows:
        w = want[row["label"]]
        for key, v in w.items():
            if isinstance(v, float):
                assert row[key] == pytest.approx(v, abs=1e-12), key
            else:
                assert row[key] == v, key
        assert row["r_metrics_exact"]
    _check_sorted(rows)


def test_weighted_by_queries_gives_retrieval_metrics_and_chunks_agree(monkeypatch):
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(300, 6)).astype(np.float32)
    y = rng.integers(0, 12, 300)
    rows = per_class_retrieval(emb, y)  # cosine
    rm = retrieval_metrics(emb, y, ks=(1,), nmi=False)
    nq = sum(r["n_queries"] for r in rows)
    for key in ("precision_at_1", "r_precision", "map_at_r"):
        total = sum(r["n_queries"] * r[key] for r in rows if r["n_queries"])
        assert total / nq == pytest.approx(rm[key], abs=1e-9), key
    monkeypatch.setattr(per_class_module, "_CHUNK_ELEMS", 200)  # many query chunks
    chunked = per_class_retrieval(emb, y)
    assert [r["label"] for r in chunked] == [r["label"] for r in rows]
    for a, b in zip(chunked, rows, strict=True):  # the same up to the order of the sums
        assert a == {
            k: pytest.approx(v, abs=1e-12) if isinstance(v, float) else v for k, v in b.items()
        }


def test_sort_order_ties_by_label_and_singletons_last():
    # 1 and 4 mixed together, 5 perfect (MAP@R 1.0), 9 a singleton (no MAP@R: last)
    emb = np.array([[0.0, 0], [0, 0.1], [10, 0], [10, 0.1], [0, 0.05], [5, 5], [0.05, 0]])
    y = np.array([1, 1, 5, 5, 4, 9, 4])
    rows = per_class_retrieval(emb, y, distance="euclidean")
    assert [r["label"] for r in rows][-2:] == [5, 9]
    assert rows[-2]["map_at_r"] == 1.0 and max(r["map_at_r"] for r in rows[:2]) < 1.0
    assert rows[-1]["map_at_r"] is None and rows[-1]["n_queries"] == 0
    assert rows[-1]["confused_with"] is not None and rows[-1]["confused_count"] == 1
    _check_sorted(rows)
    tie = np.array([[0.0, 0], [0, 1], [10, 0], [10, 1]])
    rows = per_class_retrieval(tie, np.array([5, 5, 2, 2]), distance="euclidean")
    assert [(r["label"], r["map_at_r"]) for r in rows] == [(2, 1.0), (5, 1.0)]
    assert all(r["confused_with"] is None and r["confused_count"] == 0 for r in rows)


def test_confusion_ties_pick_the_smallest_label():
    # query class 0 (items 0, 1): item 0's nearest is class 7, item 1's is class 3: one each
    emb = np.array([[0.0, 0], [10, 0], [0, 1], [10, 1], [50, 50], [60, 60]])
    y = np.array([0, 0, 7, 3, 3, 7])
    row = next(r for r in per_class_retrieval(emb, y, distance="euclidean") if r["label"] == 0)
    assert (row["wrong_at_1"], row["confused_with"], row["confused_count"]) == (2, 3, 1)


def test_k_caps_the_search_and_says_so():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 4))
    y = np.repeat([0, 1], [30, 10])
    rows = {r["label"]: r for r in per_class_retrieval(emb, y, k=5)}
    assert not rows[0]["r_metrics_exact"] and not rows[1]["r_metrics_exact"]
    with pytest.warns(UserWarning, match="max_k"):
        want = retrieval_metrics(emb, y, ks=(1,), nmi=False, max_k=5)
    total = sum(r["n_queries"] * r["map_at_r"] for r in rows.values()) / 40
    assert total == pytest.approx(want["map_at_r"], abs=1e-9)
    exact = {r["label"]: r for r in per_class_retrieval(emb, y, k=100)}
    assert all(r["r_metrics_exact"] for r in exact.values())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"distance": "manhattan"}, "unknown distance"),
        ({"k": 0}, "k must be a positive integer"),
        ({"k": 2.5}, "k must be a positive integer"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(InputError, match=match):
        per_class_retrieval(np.eye(4), np.array([0, 0, 1, 1]), **kwargs)


def test_bad_inputs():
    with pytest.raises(InputError, match="at least 2 items"):
        per_class_retrieval(np.ones((1, 3)), np.array([0]))
    with pytest.raises(InputError, match="NaN"):
        per_class_retrieval(np.array([[0.0, np.nan], [1, 1]]), np.array([0, 1]))
    with pytest.raises(InputError, match="entries"):
        per_class_retrieval(np.eye(3), np.array([0, 1]))
