"""Retrieval post-processing (alpha-QE, DBA, k-reciprocal re-ranking, the spec string) against
plain float64 loop references written here, on tiny sets with exact ties and duplicates; the
sparse and dense re-ranking paths; permutation invariance; degenerate inputs; bounded memory."""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tripletlab import InputError
from tripletlab.metrics import (
    PostProcess,
    alpha_query_expansion,
    apply_postprocess,
    database_augmentation,
    k_reciprocal_rerank,
    knn_search,
    parse_postprocess,
)
from tripletlab.metrics import postprocess as pp

# ----------------------------------------------------------------------------- data


def _random(n, d=6, seed=0):
    """Gaussian float64 rows: no two distances are within rounding of each other."""
    return np.random.default_rng(seed).normal(size=(n, d))


def _grid(n, d=3, seed=0):
    """Small integer coordinates (many duplicates): euclidean distances exactly tied and
    exactly computed, in any order of summation."""
    return np.round(np.random.default_rng(seed).normal(size=(n, d)) * 1.2)


def _axis(n, d=4, seed=0):
    """Scaled signed basis vectors: cosine similarities exactly -1, 0 or 1 (exact ties)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, d))
    x[np.arange(n), rng.integers(0, d, n)] = rng.choice([-2.0, -1.0, 1.0, 3.0], n)
    return x


def _data(kind, n, seed):
    if kind == "random":
        return _random(n, seed=seed), "cosine"
    if kind == "axis":
        return _axis(n, seed=seed), "cosine"
    return _grid(n, seed=seed), "euclidean"


# ------------------------------------------------------------------- loop references


def _unit(x):
    nrm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(nrm > 0, nrm, 1.0)


def _dist(a, b, distance):
    """Exact float64 distance of two vectors."""
    if distance == "cosine":
        return 1.0 - float(_unit(a) @ _unit(b))
    return float(np.sqrt(((a - b) ** 2).sum()))


def _order(q, g, distance, skip=None):
    """Gallery indices by (distance, index): a stable sort of exact distances."""
    d = np.array([_dist(q, gj, distance) for gj in g])
    order = [j for j in np.argsort(d, kind="stable") if j != skip]
    return order, d


def _ref_expand(q, g, nbrs, alpha, distance):
    if distance == "cosine":
        out = _unit(q).copy()
        for j in nbrs:
            out += max(float(_unit(q) @ _unit(g[j])), 0.0) ** alpha * _unit(g[j])
        return _unit(out)
    tot, wsum = q.copy(), 1.0
    for j in nbrs:
        w = max(float(_unit(q) @ _unit(g[j])), 0.0) ** alpha
        tot, wsum = tot + w * g[j], wsum + w
    return tot / wsum


def ref_aqe(q, g, k, alpha, distance, exclude_self=False):
    out = np.empty_like(q)
    for i in range(len(q)):
        order, _ = _order(q[i], g, distance, skip=i if exclude_self else None)
        out[i] = _ref_expand(q[i], g, order[:k], alpha, distance)
    return out


def ref_dba(g, k, alpha, distance):
    out = np.empty_like(g)
    for i in range(len(g)):
        order, _ = _order(g[i], g, distance, skip=i)
        out[i] = _ref_expand(g[i], g, order[: k - 1], alpha, distance)
    return out


def ref_rerank_matrix(q, g, k1, k2, lam, distance, exclude_self=False):
    """The re-ranked distance matrix (queries x gallery), dense, float64, with loops: the
    structure of the authors' published re_ranking, with a stable argsort."""
    x = g.copy() if exclude_self else np.concatenate([q, g])
    if distance == "cosine":
        x = _unit(x)
    n = len(x)
    dist = np.array([[((x[i] - x[j]) ** 2).sum() for j in range(n)] for i in range(n)])
    mx = dist.max(axis=1, keepdims=True)
    dist = dist / np.where(mx > 0, mx, 1.0)
    rank = np.argsort(dist, axis=1, kind="stable")

    def recip(i, kk):
        fwd = rank[i, : kk + 1]
        return [int(j) for j in fwd if i in rank[j, : kk + 1]]

    v = np.zeros((n, n))
    half = int(np.around(k1 / 2))
    for i in range(n):
        r = recip(i, k1)
        expanded = list(r)
        for c in r:
            rc = recip(c, half)
            if len(np.intersect1d(rc, r)) > 2 / 3 * len(rc):
                expanded += rc
        expanded = np.unique(np.array(expanded, dtype=int))
        if len(expanded):
            w = np.exp(-dist[i, expanded])
            v[i, expanded] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    nq = len(q)
    off = 0 if exclude_self else nq
    out = np.empty((nq, len(g)))
    for i in range(nq):
        for j in range(len(g)):
            m = np.minimum(v[i], v[off + j]).sum()
            jac = 1 - m / (2 - m)
            out[i, j] = jac * (1 - lam) + dist[i, off + j] * lam
        if exclude_self:
            out[i, i] = np.inf
    return out


def _check_topk(d, idx, ref, top, atol=1e-10):
    """Tie-aware: the returned distances are the ``top`` smallest of each reference row, and
    each returned index has the distance the reference gives it."""
    d, idx = d.double().numpy(), idx.numpy()
    assert d.shape == idx.shape == (ref.shape[0], top)
    for i in range(ref.shape[0]):
        np.testing.assert_allclose(d[i], np.sort(ref[i])[:top], atol=atol, rtol=0)
        np.testing.assert_allclose(ref[i, idx[i]], d[i], atol=atol, rtol=0)
        assert len(set(idx[i].tolist())) == top


# --------------------------------------------------------------------- AQE and DBA


@pytest.mark.parametrize("kind", ["random", "axis", "grid"])
@pytest.mark.parametrize("k,alpha", [(1, 3.0), (3, 0.0), (4, 1.5)])
def test_aqe_matches_reference(kind, k, alpha):
    g, distance = _data(kind, 25, 1)
    q, _ = _data(kind, 7, 2)
    got = alpha_query_expansion(q, g, k=k, alpha=alpha, distance=distance)
    np.testing.assert_allclose(got.numpy(), ref_aqe(q, g, k, alpha, distance), atol=1e-12)
    loo = alpha_query_expansion(g, g, k=k, alpha=alpha, distance=distance, exclude_self=True)
    np.testing.assert_allclose(loo.numpy(), ref_aqe(g, g, k, alpha, distance, True), atol=1e-12)


@pytest.mark.parametrize("kind", ["random", "axis", "grid"])
@pytest.mark.parametrize("k,alpha", [(1, 3.0), (2, 3.0), (5, 0.0)])
def test_dba_matches_reference(kind, k, alpha):
    g, distance = _data(kind, 25, 3)
    got = database_augmentation(g, k=k, alpha=alpha, distance=distance)
    np.testing.assert_allclose(got.numpy(), ref_dba(g, k, alpha, distance), atol=1e-12)


def test_aqe_dba_keep_float32_and_accept_numpy():
    g = _random(30).astype(np.float32)
    out = alpha_query_expansion(g[:4], torch.from_numpy(g), k=2)
    assert out.dtype == torch.float32 and out.shape == (4, 6)
    np.testing.assert_allclose(out.norm(dim=1).numpy(), 1.0, atol=1e-6)
    assert database_augmentation(g).dtype == torch.float32


def test_aqe_dba_permutation_invariance():
    g, q = _random(40, seed=4), _random(5, seed=5)
    perm = np.random.default_rng(0).permutation(40)
    a = alpha_query_expansion(q, g, k=3)
    torch.testing.assert_close(alpha_query_expansion(q, g[perm], k=3), a)
    b = database_augmentation(g, k=3)
    torch.testing.assert_close(database_augmentation(g[perm], k=3), b[perm])


# --------------------------------------------------------------------------- re-ranking


@pytest.mark.parametrize(
    "kind,seed,k1,k2,lam",
    [
        ("random", 0, 20, 6, 0.3),
        ("random", 1, 5, 1, 0.0),
        ("random", 2, 4, 3, 1.0),
        ("grid", 3, 6, 3, 0.3),
        ("grid", 4, 3, 2, 0.5),
        ("axis", 5, 7, 4, 0.3),
        ("grid", 6, 1, 1, 0.3),
    ],
)
@pytest.mark.parametrize("dense_limit", [0, 10_000])
def test_rerank_matches_reference(kind, seed, k1, k2, lam, dense_limit):
    g, distance = _data(kind, 30, seed)
    q, _ = _data(kind, 6, seed + 100)
    kw = dict(k1=k1, k2=k2, lambda_value=lam, distance=distance, dense_limit=dense_limit)
    d, i = k_reciprocal_rerank(q, g, top_k=12, **kw)
    _check_topk(d, i, ref_rerank_matrix(q, g, k1, k2, lam, distance), 12)
    d, i = k_reciprocal_rerank(g, g, top_k=29, exclude_self=True, **kw)
    _check_topk(d, i, ref_rerank_matrix(g, g, k1, k2, lam, distance, True), 29)


@pytest.mark.parametrize("kind", ["random", "grid", "axis"])
def test_rerank_sparse_and_dense_paths_agree(kind):
    g, distance = _data(kind, 300, 7)
    q, _ = _data(kind, 40, 8)
    kw = dict(k1=10, k2=4, top_k=50, distance=distance)
    ds, is_ = k_reciprocal_rerank(q, g, dense_limit=0, **kw)
    dd, id_ = k_reciprocal_rerank(q, g, dense_limit=10_000, **kw)
    torch.testing.assert_close(ds, dd, atol=1e-12, rtol=0)
    if kind == "random":
        assert torch.equal(is_, id_)
    # float32: the same neighbour lists, distances equal to float32 rounding
    ds32, is32 = k_reciprocal_rerank(
        q.astype(np.float32), g.astype(np.float32), dense_limit=0, **kw
    )
    dd32, _ = k_reciprocal_rerank(
        q.astype(np.float32), g.astype(np.float32), dense_limit=10_000, **kw
    )
    assert ds32.dtype == torch.float32
    torch.testing.assert_close(ds32, dd32, atol=1e-6, rtol=0)


def test_rerank_permutation_invariance():
    g, q = _random(60, seed=9), _random(8, seed=10)
    perm = np.random.default_rng(1).permutation(60)
    for limit in (0, 10_000):
        d, i = k_reciprocal_rerank(q, g, k1=8, k2=3, top_k=20, dense_limit=limit)
        dp, ip = k_reciprocal_rerank(q, g[perm], k1=8, k2=3, top_k=20, dense_limit=limit)
        torch.testing.assert_close(dp, d, atol=1e-12, rtol=0)
        assert torch.equal(torch.from_numpy(perm)[ip], i)


def test_rerank_lambda_one_is_the_original_order():
    g, q = _random(50, seed=11), _random(5, seed=12)
    _, i = k_reciprocal_rerank(q, g, lambda_value=1.0, top_k=10)
    assert torch.equal(i, knn_search(q, g, 10)[1])


def test_rerank_improves_clustered_retrieval():
    """Sanity: on noisy clusters re-ranking does not hurt precision@1 much and returns the
    query's own cluster first on average."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 16))
    g = np.repeat(centers, 12, axis=0) + 0.6 * rng.normal(size=(120, 16))
    y = np.repeat(np.arange(10), 12)
    _, i = k_reciprocal_rerank(g, g, k1=8, k2=3, top_k=5, exclude_self=True)
    assert (y[i[:, 0].numpy()] == y).mean() > 0.8


# ------------------------------------------------------------------- degenerate inputs


@pytest.mark.parametrize("limit", [0, 10_000])
def test_rerank_degenerate(limit):
    one = np.ones((1, 3))
    d, i = k_reciprocal_rerank(one, one, top_k=5, dense_limit=limit)
    assert i.tolist() == [[0]] and torch.isfinite(d).all()
    d, i = k_reciprocal_rerank(one, one, exclude_self=True, dense_limit=limit)
    assert d.shape == i.shape == (1, 0)
    same = np.ones((8, 3))  # all identical: zero distances, no NaN, order by index
    d, i = k_reciprocal_rerank(same[:2], same, k1=3, top_k=8, dense_limit=limit)
    assert torch.isfinite(d).all() and sorted(i[0].tolist()) == list(range(8))
    _check_topk(d, i, ref_rerank_matrix(same[:2], same, 3, 6, 0.3, "cosine"), 8)
    d, i = k_reciprocal_rerank(np.zeros((0, 3)), same, dense_limit=limit)
    assert d.shape == (0, 8)
    zeros = np.zeros((5, 3))  # zero rows under cosine stay zero
    d, _ = k_reciprocal_rerank(zeros, zeros, k1=2, dense_limit=limit)
    assert torch.isfinite(d).all()


def test_apply_clamps_k_with_a_warning_never_an_index_error():
    g, q = _random(4), _random(2, seed=1)
    for spec in ("none", "aqe:k=10", "dba:k=10", "dba+aqe:k=9", "rerank:k1=20,k2=6"):
        with pytest.warns(UserWarning, match="larger than"):
            d, i = apply_postprocess(spec, q, g, k=10)
        assert d.shape == i.shape == (2, 4)
        with pytest.warns(UserWarning, match="larger than"):
            _, i = apply_postprocess(spec, g, g, k=10, exclude_self=True)
        assert i.shape == (4, 3) and (i != torch.arange(4)[:, None]).all()
    with pytest.warns(UserWarning):
        _, i = apply_postprocess("dba+aqe", g[:1], g[:1], k=3)
    assert i.tolist() == [[0]]
    with pytest.warns(UserWarning):
        _, i = apply_postprocess("rerank", g[:1], g[:1], k=3, exclude_self=True)
    assert i.shape == (1, 0)


def test_aqe_dba_degenerate():
    same = np.ones((5, 3))
    with pytest.warns(UserWarning):
        out = database_augmentation(same, k=9)
    np.testing.assert_allclose(out.numpy(), _unit(same), atol=1e-12)
    with pytest.warns(UserWarning):
        alpha_query_expansion(same[:1], same[:1], k=1, exclude_self=True)
    assert database_augmentation(np.zeros((0, 3))).shape == (0, 3)
    np.testing.assert_allclose(database_augmentation(same, k=1).numpy(), _unit(same))
    e = alpha_query_expansion(same, same, k=2, distance="euclidean")
    np.testing.assert_allclose(e.numpy(), same)  # the mean of identical vectors


def test_apply_postprocess_matches_the_parts():
    g, q = _random(40, seed=13), _random(6, seed=14)
    tg = torch.from_numpy(g)
    d, i = apply_postprocess("none", q, g, k=5)
    assert torch.equal(i, knn_search(q, g, 5)[1])
    _, i = apply_postprocess("dba:k=3,alpha=2", q, g, k=5)
    assert torch.equal(i, knn_search(q, database_augmentation(g, k=3, alpha=2), 5)[1])
    _, i = apply_postprocess("aqe:k=3,alpha=2", q, g, k=5)
    assert torch.equal(i, knn_search(alpha_query_expansion(q, g, k=3, alpha=2), g, 5)[1])
    _, i = apply_postprocess("dba+aqe:k=3", q, tg, k=5)
    g2 = database_augmentation(g, k=3)
    assert torch.equal(i, knn_search(alpha_query_expansion(q, g2, k=3), g2, 5)[1])
    d, i = apply_postprocess("rerank:k1=6,k2=2,lambda=0.4", q, g, k=5, distance="euclidean")
    d2, i2 = k_reciprocal_rerank(q, g, k1=6, k2=2, lambda_value=0.4, top_k=5, distance="euclidean")
    assert torch.equal(i, i2) and torch.equal(d, d2)


# ------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    "text,method,params",
    [
        ("none", "none", {}),
        (" NONE ", "none", {}),
        ("aqe", "aqe", {"k": 2, "alpha": 3.0}),
        ("dba:k=5,alpha=3", "dba", {"k": 5, "alpha": 3.0}),
        ("dba+aqe:alpha=0", "dba+aqe", {"k": 2, "alpha": 0.0}),
        ("rerank:k1=20,k2=6,lambda=0.3", "rerank", {"k1": 20, "k2": 6, "lambda": 0.3}),
        ("rerank: lambda = 1 , k1=3", "rerank", {"k1": 3, "k2": 6, "lambda": 1.0}),
    ],
)
def test_parse_and_round_trip(text, method, params):
    spec = parse_postprocess(text)
    assert spec.method == method and spec.params == params
    assert parse_postprocess(str(spec)) == spec and hash(parse_postprocess(str(spec))) == hash(spec)
    assert parse_postprocess(spec) is spec


@pytest.mark.parametrize(
    "text,needle",
    [
        ("", "non-empty"),
        ("qe", "'qe'"),
        ("dba:beta=1", "'beta'"),
        ("none:k=2", "'k'"),
        ("dba:k=0", "k must be a positive integer"),
        ("dba:k=2.5", "k must be an integer"),
        ("dba:k=two", "'two'"),
        ("aqe:alpha=-1", "alpha must be a finite number"),
        ("aqe:alpha=nan", "alpha must be a finite number"),
        ("aqe:alpha=inf", "alpha"),
        ("rerank:lambda=1.5", "lambda must be in [0, 1]"),
        ("rerank:k1=0", "k1"),
        ("rerank:k2=-1", "k2"),
        ("dba:k=2,k=3", "'k' given twice"),
        ("dba:k", "'k' is not NAME=VALUE"),
        ("dba:k=", "NAME=VALUE"),
        ("dba:,", "NAME=VALUE"),
    ],
)
def test_parse_errors_name_the_problem(text, needle):
    with pytest.raises(InputError, match=None) as e:
        parse_postprocess(text)
    assert needle in str(e.value)


def test_spec_constructor_validates():
    assert PostProcess() == parse_postprocess("none")
    assert str(PostProcess("rerank", {"k2": 3})) == "rerank:k1=20,k2=3,lambda=0.3"
    for method, params, needle in [
        ("zzz", {}, "'zzz'"),
        ("dba", {"k1": 3}, "'k1'"),
        ("dba", {"k": True}, "positive integer"),
        ("aqe", {"alpha": "3"}, "alpha"),
    ]:
        with pytest.raises(InputError, match=None) as e:
            PostProcess(method, params)
        assert needle in str(e.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda q, g: alpha_query_expansion(q, g, k=0),
        lambda q, g: alpha_query_expansion(q, g, alpha=-1.0),
        lambda q, g: alpha_query_expansion(q, g, distance="manhattan"),
        lambda q, g: alpha_query_expansion(q, g, exclude_self=True),
        lambda q, g: alpha_query_expansion(q[:, :2], g),
        lambda q, g: database_augmentation(g, k=0),
        lambda q, g: k_reciprocal_rerank(q, g, k1=0),
        lambda q, g: k_reciprocal_rerank(q, g, lambda_value=2.0),
        lambda q, g: k_reciprocal_rerank(q, g, dense_limit=-1),
        lambda q, g: k_reciprocal_rerank(q, g[:0]),
        lambda q, g: k_reciprocal_rerank(q * np.nan, g),
        lambda q, g: apply_postprocess("dba", q, g, k=0),
        lambda q, g: apply_postprocess("what", q, g, k=1),
    ],
)
def test_bad_arguments_raise_input_error(call):
    with pytest.raises(InputError):
        call(_random(3), _random(5, seed=1))


# ---------------------------------------------------------------------------- memory


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_growth(fn) -> int:
    """Peak resident memory above the start while ``fn()`` runs (polled every 5 ms
    from a thread: torch and numpy release the GIL in large operations)."""
    start, peak, done = _rss(), [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    t = threading.Thread(target=poll)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], _rss()) - start


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")
def test_sparse_rerank_never_builds_an_n_by_n_matrix(monkeypatch):
    """10,000 items: an N x N float32 matrix is 380 MiB. The sparse path's peak stays below
    that of the k-NN pass it reuses plus a tenth of that (about 30 and 40 MiB measured)."""
    import tripletlab.distances as dist_mod
    import tripletlab.metrics.retrieval as ret_mod

    for mod, name, value in [
        (ret_mod, "_BLOCK_ELEMS", 1 << 21),
        (dist_mod, "_BLOCK_ELEMS", 1 << 21),
        (pp, "_ELEMS", 1 << 18),
        (pp, "_PAIR_BUDGET", 1 << 17),
    ]:
        if hasattr(mod, name):  # smaller blocks: a smaller fixed working memory
            monkeypatch.setattr(mod, name, value)
    monkeypatch.setattr(pp, "_rerank_dense", lambda *a, **k: pytest.fail("dense path used"))
    n = 10_000
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32))
    k_reciprocal_rerank(x[:5], x[:2000])  # imports, thread pools
    knn = _peak_growth(lambda: knn_search(x, x, 21, distance="euclidean"))
    out = []
    grown = _peak_growth(lambda: out.append(k_reciprocal_rerank(x[:200], x[200:], top_k=10)))
    d, i = out[0]
    assert i.shape == (200, 10) and bool(torch.isfinite(d).all())
    assert grown < knn + n * n * 4 / 10, f"peak grew by {grown / 2**20:.0f} MiB"


def test_sparse_rerank_uses_no_dense_helper(monkeypatch):
    monkeypatch.setattr(pp, "_rerank_dense", lambda *a, **k: pytest.fail("dense path used"))
    g = _random(300, seed=15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d, i = k_reciprocal_rerank(g[:10], g, k1=6, top_k=5, dense_limit=100)
    assert d.shape == (10, 5)


def test_aqe_negative_similarities_weigh_zero():
    q = np.array([[1.0, 0.0]])
    g = np.array([[1.0, 0.2], [-1.0, 0.1], [-1.0, -0.3]])
    got = alpha_query_expansion(q, g, k=3, alpha=1.0)
    g0 = _unit(g[0])
    np.testing.assert_allclose(got.numpy(), _unit(q[0] + float(g0[0]) * g0)[None], atol=1e-12)
    np.testing.assert_allclose(got.numpy(), ref_aqe(q, g, 3, 1.0, "cosine"), atol=1e-12)


def test_long_rows_select_like_a_full_stable_sort():
    """Rows longer than the full-sort limit take the topk path; ties still by index."""
    vals = torch.from_numpy(np.random.default_rng(0).integers(0, 50, size=(7, 6000)) / 7.0)
    for k in (1, 10, 200, 5999):
        v, i = pp._smallest_by_value_then_index(vals, k)
        fv, fi = torch.sort(vals, dim=1, stable=True)
        assert torch.equal(v, fv[:, :k]) and torch.equal(i, fi[:, :k])


def ref_dba_leave_one_out(g, k_dba, alpha, distance, k, with_aqe):
    """Query i searched in DBA(gallery without i) (then alpha-QE over it): one loop per i."""
    out_i, out_d = [], []
    for i in range(len(g)):
        keep = [j for j in range(len(g)) if j != i]
        g2 = ref_dba(g[keep], min(k_dba, len(keep)), alpha, distance)
        q = g[i]
        if with_aqe:
            q = ref_aqe(q[None], g2, min(k_dba, len(keep)), alpha, distance)[0]
        order, d = _order(q, g2, distance)
        out_i.append([keep[j] for j in order[:k]])
        out_d.append([d[j] for j in order[:k]])
    return np.array(out_i), np.array(out_d)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("spec", ["dba:k=2,alpha=1", "dba:k=4,alpha=3", "dba+aqe:k=3,alpha=1"])
def test_dba_leave_one_out_is_the_search_without_the_query(spec, distance):
    """exclude_self: every query is searched in the DBA of the gallery *without* it (DBA of
    the whole set would mix each query into its neighbours and flatter DBA)."""
    g = _random(23, seed=31)
    p = parse_postprocess(spec)
    d, i = apply_postprocess(p, g, g, k=6, exclude_self=True, distance=distance)
    ri, rd = ref_dba_leave_one_out(
        g, p.params["k"], p.params["alpha"], distance, 6, p.method == "dba+aqe"
    )
    assert i.tolist() == ri.tolist()
    np.testing.assert_allclose(d.numpy(), rd, atol=1e-10)
    # the naive whole-set DBA differs: the query is mixed into its own neighbours
    naive = knn_search(
        g,
        database_augmentation(g, k=p.params["k"], alpha=p.params["alpha"], distance=distance),
        6,
        distance=distance,
        exclude_self=True,
    )[0]
    if p.method == "dba":
        assert not np.allclose(naive.numpy(), rd)


def test_dba_leave_one_out_tiny_galleries():
    for n in (2, 3):
        g = _random(n, seed=n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, i = apply_postprocess("dba+aqe:k=5", g, g, k=4, exclude_self=True)
        ri, _ = ref_dba_leave_one_out(g, 5, 3.0, "cosine", n - 1, True)
        assert i.tolist() == ri.tolist()
