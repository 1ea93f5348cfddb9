"""Evaluation groups, full-ranking metrics (mAP, mINP) and ranking_metrics: a hand-computed set,
a plain float64 full-sort oracle (ties by index), the equality of ranking_metrics with
retrieval_metrics, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tripletlab import InputError, InputTypeError
from tripletlab.metrics import knn_search, ranking_metrics, retrieval, retrieval_metrics

KEYS = ("precision_at_1", "r_precision", "map_at_r", "mean_average_precision", "minp")


def _circle():
    """8 items on the unit circle: 4 groups at 0, 90, 180, 270 degrees, each holding two items
    of its label at +-0.1 rad; labels alternate, so a group's neighbours at 90 degrees have the
    other label and the opposite group has its own.

    Ungrouped, every item ranks: its partner (same label, same group), the 4 items at ~90
    degrees (other label), the 2 opposite ones (same label): rel = 1 0 0 0 0 1 1, R = 3.
    Grouped, the partner is excluded: rel = 0 0 0 0 1 1, R = 2.
    """
    ang = np.repeat(np.arange(4) * np.pi / 2, 2) + np.tile([-0.1, 0.1], 4)
    x = np.stack([np.cos(ang), np.sin(ang)], 1)
    y = np.repeat([0, 1, 0, 1], 2)
    g = np.repeat([0, 1, 2, 3], 2)
    return x, y, g


def test_hand_computed_circle_grouped_and_ungrouped():
    x, y, g = _circle()
    plain = retrieval_metrics(x, y, ks=(1, 4, 5), nmi=False)
    assert plain["precision_at_1"] == 1.0 and plain["recall_at_4"] == 1.0
    assert plain["r_precision"] == pytest.approx(1 / 3)
    assert plain["map_at_r"] == pytest.approx(1 / 3)
    assert plain["mean_average_precision"] == pytest.approx((1 + 2 / 6 + 3 / 7) / 3)  # 37/63
    assert plain["minp"] == pytest.approx(3 / 7)
    assert "groups" not in plain
    grouped = retrieval_metrics(x, y, ks=(1, 4, 5), nmi=False, groups=g)
    assert grouped["groups"] == 4 and grouped["n_queries_evaluated"] == 8
    assert grouped["precision_at_1"] == 0.0 and grouped["recall_at_4"] == 0.0
    assert grouped["recall_at_5"] == 1.0
    assert grouped["r_precision"] == 0.0 and grouped["map_at_r"] == 0.0
    assert grouped["mean_average_precision"] == pytest.approx((1 / 5 + 2 / 6) / 2)  # 4/15
    assert grouped["minp"] == pytest.approx(2 / 6)
    # any hashable values; query mode against the same items excludes the query with its group
    names = [f"cam{v}" for v in g]
    assert retrieval_metrics(x, y, ks=(1, 4, 5), nmi=False, groups=names) == grouped
    q = retrieval_metrics(
        x, y, ks=(1, 4, 5), nmi=False, groups=names, query_embeddings=x, query_labels=y,
        query_groups=np.array(names),
    )  # fmt: skip
    assert {k: q[k] for k in KEYS} == {k: grouped[k] for k in KEYS}
    # every item its own group is leave-one-out
    own = retrieval_metrics(
        x, y, nmi=False, groups=np.arange(8), query_embeddings=x, query_labels=y,
        query_groups=np.arange(8),
    )  # fmt: skip
    assert {k: own[k] for k in KEYS} == {k: retrieval_metrics(x, y, nmi=False)[k] for k in KEYS}


def test_a_query_whose_label_lies_only_in_its_group_is_skipped():
    x, y, g = _circle()
    g = g.copy()
    g[[4, 5]] = 0  # label 0's third pair joins group 0: items 0, 1, 4, 5 have R = 0
    m = retrieval_metrics(x, y, nmi=False, groups=g)
    assert m["n_queries_skipped"] == 4 and m["n_queries_evaluated"] == 4
    _check(m, _oracle(x, y, g, ks=(1, 5, 10)))


# ----------------------------------------------------------------------------- the oracle


def _oracle(x, y, g=None, qx=None, qy=None, qg=None, ks=(1, 2, 5)):
    """Plain float64 full sort per query (ties by index), own-group items removed."""
    loo = qx is None
    if loo:
        qx, qy, qg = x, y, g
    x, qx = np.asarray(x, np.float64), np.asarray(qx, np.float64)
    d = ((qx[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    rows = []
    for i in range(len(qx)):
        cand = [
            j
            for j in range(len(x))
            if not (loo and j == i) and not (g is not None and g[j] == qg[i])
        ]
        order = sorted(cand, key=lambda j: (d[i, j], j))
        rel = np.array([y[j] == qy[i] for j in order], dtype=bool)
        big_r = int(rel.sum())
        if big_r == 0:
            continue
        hits = np.cumsum(rel)
        prec = hits / np.arange(1, len(rel) + 1)
        row = {
            "precision_at_1": float(rel[0]),
            "r_precision": rel[:big_r].sum() / big_r,
            "map_at_r": (prec[:big_r] * rel[:big_r]).sum() / big_r,
            "mean_average_precision": (prec * rel).sum() / big_r,
            "minp": big_r / (np.flatnonzero(rel)[-1] + 1),
        }
        for k in ks:
            row[f"recall_at_{k}"] = float(rel[:k].any())
        rows.append(row)
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]} | {
        "n_queries_evaluated": len(rows)
    }


def _check(got, want, tol=1e-12):
    for key, v in want.items():
        assert got[key] == pytest.approx(v, abs=tol), key


def _grid(n, d=3, n_cls=5, n_groups=4, seed=0):
    """Small integer coordinates: many exactly equal distances (ties), exact in float32."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(size=(n, d)) * 1.2)
    return x, rng.integers(0, n_cls, n), rng.integers(0, n_groups, n)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("use_groups", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_ranking_metrics_match_the_oracle_leave_one_out(dtype, use_groups, seed, monkeypatch):
    monkeypatch.setattr(retrieval, "_FULL_BLOCK_ELEMS", 700 if seed == 2 else 1 << 22)
    x, y, g = _grid(70, seed=seed)
    g = g if use_groups else None
    ks = (1, 2, 5, 200)
    m = retrieval_metrics(
        x.astype(dtype), y, ks=ks, nmi=False, distance="euclidean", groups=g, full_ranking=True
    )
    want = _oracle(x, y, g, ks=ks)
    assert m["n_queries_evaluated"] == want["n_queries_evaluated"]
    _check(m, want)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("use_groups", [False, True])
def test_full_ranking_metrics_match_the_oracle_query_mode(dtype, use_groups):
    x, y, g = _grid(60, seed=3)
    qx, qy, qg = _grid(25, seed=4)
    qg = np.where(qg == 3, 7, qg)  # a query group absent from the reference: nothing excluded
    kw = {"groups": g, "query_groups": qg} if use_groups else {}
    m = retrieval_metrics(
        x.astype(dtype), y, query_embeddings=qx.astype(dtype), query_labels=qy, nmi=False,
        distance="euclidean", ks=(1, 3), **kw,
    )  # fmt: skip
    want = _oracle(x, y, g if use_groups else None, qx, qy, qg if use_groups else None, (1, 3))
    assert m["n_queries_evaluated"] == want["n_queries_evaluated"]
    _check(m, want)


def test_grouped_selection_paths_match_the_oracle(monkeypatch):
    """The sampled-threshold selection (split over two threads, many blocks) and the
    index-pair / comparison exclusions of own-group scores."""
    monkeypatch.setattr(retrieval, "_PREFILTER_MIN_N", 32)
    monkeypatch.setattr(retrieval, "_SAMPLE_STRIDE", 4)
    monkeypatch.setattr(retrieval, "_PARALLEL_MIN_ELEMS", 1)
    monkeypatch.setattr(retrieval, "_BLOCK_ELEMS", 3000)
    per_row = []
    real = retrieval._sorted_smallest
    monkeypatch.setattr(
        retrieval, "_sorted_smallest", lambda a, k: per_row.append(a.ndim == 1) or real(a, k)
    )
    x, y, g = _grid(300, d=4, n_cls=30, n_groups=40, seed=5)  # few own-group pairs: index fill
    want = _oracle(x, y, g, ks=(1, 5))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for dtype in (np.float32, np.float64):
            m = retrieval_metrics(
                x.astype(dtype), y, ks=(1, 5), nmi=False, distance="euclidean", groups=g,
                full_ranking=False,
            )  # fmt: skip
            assert "mean_average_precision" not in m
            _check(m, {k: v for k, v in want.items() if k not in KEYS[3:]})
        assert any(per_row), "the sampled-threshold path was not taken"
        g2 = g % 2  # two big groups: the comparison mask
        m = retrieval_metrics(
            x.astype(np.float32), y, ks=(1, 5), nmi=False, distance="euclidean", groups=g2
        )
    finally:
        torch.set_num_threads(threads)
    _check(m, _oracle(x, y, g2, ks=(1, 5)))


def test_full_ranking_automatic_and_explicit(monkeypatch):
    x, y, _ = _grid(40)
    assert "minp" in retrieval_metrics(x, y, nmi=False)
    assert "minp" not in retrieval_metrics(x, y, nmi=False, full_ranking=False)
    assert "minp" not in retrieval_metrics(x, y, nmi=False, max_k=50)
    monkeypatch.setattr(retrieval, "_FULL_RANKING_AUTO", 40 * 40 - 1)
    m = retrieval_metrics(x, y, nmi=False)
    assert "mean_average_precision" not in m and "minp" not in m
    full = retrieval_metrics(x, y, nmi=False, full_ranking=True)
    assert {k: full[k] for k in m if k in full} == m  # the other keys are unchanged


# ------------------------------------------------------------------------- ranking_metrics


def _metric_keys(m):
    return {k: v for k, v in m.items() if k.startswith(("precision", "recall")) or k in KEYS} | {
        k: m[k] for k in ("n_queries_evaluated", "n_queries_skipped", "truncated_queries")
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("use_groups", [False, True])
@pytest.mark.parametrize("loo", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_ranking_metrics_equal_retrieval_metrics_on_knn_lists(dtype, use_groups, loo, seed):
    x, y, g = _grid(80, seed=seed)
    x = x.astype(dtype)
    ks = (1, 2, 5)
    if loo:
        q, qy, qg, kw = x, y, g, {}
    else:
        q, qy, qg = _grid(30, seed=seed + 10)
        q = q.astype(dtype)
        kw = {"query_embeddings": q, "query_labels": qy}
    gk = ({"groups": g} | ({} if loo else {"query_groups": qg})) if use_groups else {}
    want = retrieval_metrics(x, y, ks=ks, nmi=False, distance="euclidean", **kw, **gk)
    assert "minp" in want
    _, full = knn_search(q, x, len(x), distance="euclidean", exclude_self=loo)
    got = ranking_metrics(full, qy, y, ks=ks, exclude_self=loo, **gk)
    assert _metric_keys(got) == _metric_keys(want)  # exactly equal
    # lists long enough for the R-metrics (own-group items come on top): the same numbers
    extra = int(np.bincount(g).max()) if use_groups else 0
    _, short = knn_search(q, x, want["k_searched"] + extra, distance="euclidean", exclude_self=loo)
    got = ranking_metrics(short, torch.from_numpy(qy), y, ks=ks, exclude_self=loo, **gk)
    assert "minp" not in got and got["list_length"] == short.shape[1]
    plain = retrieval_metrics(
        x, y, ks=ks, nmi=False, distance="euclidean", full_ranking=False, **kw, **gk
    )
    assert _metric_keys(got) == _metric_keys(plain)


def test_ranking_metrics_truncated_like_max_k():
    x, y, _ = _grid(60, n_cls=2, seed=7)
    with pytest.warns(UserWarning, match="max_k"):
        want = retrieval_metrics(x, y, ks=(1, 2), nmi=False, distance="euclidean", max_k=4)
    _, idx = knn_search(x, x, 4, distance="euclidean", exclude_self=True)
    with pytest.warns(UserWarning, match="lists hold"):
        got = ranking_metrics(idx, y, y, ks=(1, 2), exclude_self=True)
    assert not got["r_metrics_exact"] and got["truncated_queries"] == want["truncated_queries"]
    assert _metric_keys(got) == _metric_keys(want)


def test_ranking_metrics_drop_own_group_items_anywhere_in_a_list():
    y = np.array([0, 0, 0, 1, 1])
    g = np.array([0, 0, 1, 1, 2])
    # query 0 (group 0): list 1 (own group, dropped), 3, 2 -> kept 3, 2: rel 0 1, R = 1
    idx = np.array([[1, 3, 2, 4], [0, 2, 3, 4], [0, 1, 3, 4], [4, 0, 1, 2], [3, 0, 1, 2]])
    m = ranking_metrics(idx, y, y, ks=(1,), exclude_self=True, groups=g)
    # per query (R, kept relevance): 0: (1, 0 1), 1: (1, 1 0 0), 2: (2, 1 1 0), 3: (1, 1 0 0 0)
    # [group 1 holds 2 and 3: item 3 drops 2], 4: (1, 1 0 0 0)
    assert m["n_queries_evaluated"] == 5 and m["groups"] == 3
    assert m["precision_at_1"] == pytest.approx(4 / 5)
    assert m["mean_average_precision"] == pytest.approx((0.5 + 1 + 1 + 1 + 1) / 5)
    assert m["minp"] == pytest.approx((0.5 + 1 + 1 + 1 + 1) / 5)


@pytest.mark.parametrize(
    ("call", "err", "match"),
    [
        (lambda x, y, g: retrieval_metrics(x, y, groups=g[:-1]), InputError, "groups has 7"),
        (
            lambda x, y, g: retrieval_metrics(x, y, query_groups=g),
            InputError,
            "without groups",
        ),
        (
            lambda x, y, g: retrieval_metrics(x, y, groups=g, query_groups=g),
            InputError,
            "leave-one-out",
        ),
        (
            lambda x, y, g: retrieval_metrics(x, y, groups=g, query_embeddings=x, query_labels=y),
            InputError,
            "no query_groups",
        ),
        (
            lambda x, y, g: retrieval_metrics(
                x, y, groups=g, query_embeddings=x[:3], query_labels=y[:3], query_groups=g
            ),
            InputError,
            "query_groups has 8 values but there are 3 queries",
        ),
        (lambda x, y, g: retrieval_metrics(x, y, groups=g[None]), InputError, "1-D"),
        (lambda x, y, g: retrieval_metrics(x, y, groups=g * np.nan), InputError, "NaN"),
        (lambda x, y, g: retrieval_metrics(x, y, groups=[[1]] * 8), InputTypeError, "hashable"),
        (lambda x, y, g: retrieval_metrics(x, y, groups="abcdefgh"), InputTypeError, "sequence"),
        (
            lambda x, y, g: retrieval_metrics(x, y, full_ranking=True, max_k=3),
            InputError,
            "max_k",
        ),
        (lambda x, y, g: retrieval_metrics(x, y, full_ranking="yes"), InputError, "full_ranking"),
    ],
)
def test_bad_group_inputs(call, err, match):
    x, y, g = _circle()
    with pytest.raises(err, match=match):
        call(x, y, g.astype(np.float64))


@pytest.mark.parametrize(
    ("indices", "kw", "err", "match"),
    [
        (np.zeros((4, 2)), {}, InputTypeError, "integers"),
        (np.zeros(4, dtype=int), {}, InputError, "2-D"),
        (np.zeros((3, 2), dtype=int), {}, InputError, "3 rows but there are 4"),
        (np.zeros((4, 0), dtype=int), {}, InputError, "at least one"),
        (np.array([[1, 2], [0, 4], [0, 1], [0, 1]]), {}, InputError, r"indices\[1, 1\] = 4"),
        (np.array([[1, 1], [0, 2], [0, 1], [0, 1]]), {}, InputError, "row 0 repeats"),
        (
            np.array([[1, 2], [1, 2], [0, 1], [0, 1]]),
            {"exclude_self": True},
            InputError,
            "row 1 lists the query itself",
        ),
        (np.array([[1, 2]] * 4), {"n_candidates": 9}, InputError, "n_candidates"),
        (np.array([[1, 2]] * 4), {"query_groups": [0, 1, 0, 1]}, InputError, "without groups"),
        ("abc", {}, InputTypeError, "numpy array"),
    ],
)
def test_bad_ranking_inputs(indices, kw, err, match):
    y = np.array([0, 0, 1, 1])
    with pytest.raises(err, match=match):
        ranking_metrics(indices, y, y, **kw)


def test_ranking_metrics_leave_one_out_needs_equal_labels():
    with pytest.raises(InputError, match="must equal reference_labels"):
        ranking_metrics(np.array([[1], [0]]), [0, 1], [1, 1], exclude_self=True)


def test_recall_beyond_a_capped_search_counts_only_found_items():
    """max_k < k: a query with nothing relevant among its max_k neighbours is no hit at k
    (before, the missing rank was taken as max_k, which counted it at every k > max_k)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 4)), rng.integers(0, 40, 200)
    with pytest.warns(UserWarning, match="max_k"):
        m = retrieval_metrics(x, y, ks=(3, 10), max_k=3, nmi=False, distance="euclidean")
    assert m["recall_at_10"] == m["recall_at_3"] < 0.2
