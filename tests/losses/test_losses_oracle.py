"""Every strategy and reduction against the brute-force triple loop (tests/oracle.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tripletlab import TripletLoss, mine_triplets
from tripletlab.functional import (
    REDUCTIONS,
    STRATEGY_TABLE,
    mine_from_distances,
    triplet_loss_from_distances,
)

from oracle import mined_triplets, reference_distances, reference_loss

DETERMINISTIC = [name for name, row in STRATEGY_TABLE.items() if row.deterministic]
TOL = {torch.float32: 1e-5, torch.float64: 1e-9}


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    assert torch.allclose(a.double(), b.double(), rtol=tol, atol=tol), (a.item(), b.item())


@st.composite
def tie_batches(draw):
    """Small batches with integer distances (many exact ties), any label pattern."""
    b = draw(st.integers(0, 9))
    n_cls = draw(st.integers(1, 4))
    labels = draw(st.lists(st.integers(0, n_cls - 1), min_size=b, max_size=b))
    vals = draw(st.lists(st.integers(0, 4), min_size=b * b, max_size=b * b))
    dist = torch.tensor(vals, dtype=torch.float64).reshape(b, b) / 2
    dist = (dist + dist.t()) / 2
    if b:
        dist.fill_diagonal_(0)
    return dist, torch.tensor(labels, dtype=torch.long)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strategy", DETERMINISTIC)
@pytest.mark.parametrize("soft", [False, True])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=tie_batches(),
    margin=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.5]),
    reduction=st.sampled_from(REDUCTIONS),
    fallback=st.sampled_from(["easiest", "drop"]),
)
def test_loss_matches_bruteforce_with_ties(
    dtype, strategy, soft, batch, margin, reduction, fallback
):
    dist, labels = batch
    dist = dist.to(dtype)
    loss, stats = triplet_loss_from_distances(
        dist,
        labels,
        strategy=strategy,
        margin=margin,
        soft_margin=soft,
        reduction=reduction,
        semihard_fallback=fallback,
    )
    ref, n_trip, n_active = reference_loss(
        dist, labels, strategy, margin, soft, reduction, fallback
    )
    _close(loss, ref, dtype)
    assert torch.isfinite(loss)
    assert stats.as_dict()["n_triplets"] == n_trip
    assert stats.as_dict()["n_active"] == n_active


@pytest.mark.parametrize("strategy", DETERMINISTIC)
@settings(max_examples=40, deadline=None)
@given(
    batch=tie_batches(),
    margin=st.sampled_from([0.0, 0.5, 1.0]),
    fallback=st.sampled_from(["easiest", "drop"]),
)
def test_mined_triplets_valid_and_equal_loss(strategy, batch, margin, fallback):
    """Mined triplets are valid; on tie-free picks they are exactly the oracle's triplets."""
    dist, labels = batch
    a, p, n = mine_from_distances(
        dist, labels, strategy=strategy, margin=margin, semihard_fallback=fallback
    )
    for ai, pi, ni in zip(a.tolist(), p.tolist(), n.tolist(), strict=True):
        assert ai != pi and labels[ai] == labels[pi] and labels[ni] != labels[ai]
    ref = mined_triplets(dist, labels, strategy, margin, fallback)
    if strategy == "all":  # the miner returns only active triplets (pml convention)
        ref = [t for t in ref if dist[t[0], t[1]] - dist[t[0], t[2]] + margin > 0]
        assert sorted(zip(a.tolist(), p.tolist(), n.tolist(), strict=True)) == sorted(ref)
    else:
        # ties may pick a different but equally-distant index: compare the distances picked
        got = sorted(
            (ai, pi, float(dist[ai, ni]), float(dist[ai, pi]))
            for ai, pi, ni in zip(a.tolist(), p.tolist(), n.tolist(), strict=True)
        )
        want = sorted((ai, pi, float(dist[ai, ni]), float(dist[ai, pi])) for ai, pi, ni in ref)
        if strategy in ("hard", "easy-positive"):
            got = sorted((g[0], g[2], g[3]) for g in got)
            want = sorted((w[0], w[2], w[3]) for w in want)
        assert got == want


def _random_batch(b, d, n_cls, dtype, seed, dup=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1)
    if dup:
        emb[-dup:] = emb[:dup]  # duplicate embeddings (zero distances)
    labels = torch.randint(0, n_cls, (b,), generator=g)
    return emb, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("distance", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("strategy", DETERMINISTIC)
@pytest.mark.parametrize("soft", [False, True])
def test_end_to_end_value_and_gradient(dtype, distance, strategy, soft):
    """Embeddings -> loss and d loss / d embeddings equal the oracle's (tie-free random data)."""
    for seed in range(4):
        emb, labels = _random_batch(12, 5, 3, dtype, seed)
        emb.requires_grad_(True)
        loss_fn = TripletLoss(margin=0.3, strategy=strategy, distance=distance, soft_margin=soft)
        loss = loss_fn(emb, labels)
        (g,) = torch.autograd.grad(loss, emb)
        emb_ref = emb.detach().clone().requires_grad_(True)
        ref, _, _ = reference_loss(
            reference_distances(emb_ref, distance), labels, strategy, 0.3, soft, loss_fn.reduction
        )
        (g_ref,) = torch.autograd.grad(ref, emb_ref, allow_unused=True)
        g_ref = torch.zeros_like(emb_ref) if g_ref is None else g_ref
        _close(loss, ref, dtype)
        tol = TOL[dtype] * 10
        assert torch.allclose(g, g_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("strategy", DETERMINISTIC)
def test_duplicates_singletons_and_one_class(strategy):
    """Duplicate embeddings, singleton classes, one class: finite, equal to the oracle."""
    for seed in range(6):
        emb, labels = _random_batch(10, 4, 4, torch.float64, seed, dup=4)
        labels[0] = 99  # a singleton class
        for lab in (labels, torch.zeros_like(labels)):
            emb_g = emb.clone().requires_grad_(True)
            loss_fn = TripletLoss(margin=0.2, strategy=strategy)
            loss = loss_fn(emb_g, lab)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(emb_g.grad).all()
            dist = reference_distances(emb, "euclidean")
            ref, _, _ = reference_loss(dist, lab, strategy, 0.2, False, loss_fn.reduction)
            _close(loss, ref, torch.float64)


@pytest.mark.parametrize("strategy", DETERMINISTIC)
def test_reference_bank_mining(strategy):
    """Anchors from the batch, positives/negatives from a memory bank (no self-exclusion)."""
    emb, labels = _random_batch(8, 4, 3, torch.float64, 0)
    bank, bank_labels = _random_batch(11, 4, 3, torch.float64, 1)
    loss_fn = TripletLoss(margin=0.4, strategy=strategy)
    loss = loss_fn(emb, labels, ref_embeddings=bank, ref_labels=bank_labels)
    dist = reference_distances(emb, "euclidean", bank)
    ref, n_trip, _ = reference_loss(
        dist, labels, strategy, 0.4, False, loss_fn.reduction, ref_labels=bank_labels
    )
    _close(loss, ref, torch.float64)
    assert loss_fn.stats["n_triplets"] == n_trip


def test_given_indices_tuple_matches_manual_computation():
    emb, labels = _random_batch(12, 6, 3, torch.float64, 3)
    a, p, n = mine_triplets(emb, labels, strategy="all", margin=None)
    loss = TripletLoss(margin=0.2, strategy="hard", reduction="mean")(
        emb, labels, indices_tuple=(a, p, n)
    )
    d_ap = (emb[a] - emb[p]).norm(dim=1)
    d_an = (emb[a] - emb[n]).norm(dim=1)
    _close(loss, torch.relu(d_ap - d_an + 0.2).mean(), torch.float64)


def test_all_miner_without_margin_enumerates_every_valid_triplet_and_caps():
    emb, labels = _random_batch(14, 3, 3, torch.float64, 5)
    a, p, n = mine_triplets(emb, labels, strategy="all", margin=None)
    dist = reference_distances(emb, "euclidean")
    ref = mined_triplets(dist, labels, "all", 0.0)
    assert sorted(zip(a.tolist(), p.tolist(), n.tolist(), strict=True)) == sorted(ref)
    g = torch.Generator().manual_seed(0)
    a2, p2, n2 = mine_triplets(
        emb, labels, strategy="all", margin=None, max_triplets=25, generator=g
    )
    sub = list(zip(a2.tolist(), p2.tolist(), n2.tolist(), strict=True))
    assert len(sub) == 25 and len(set(sub)) == 25 and set(sub) <= set(ref)


@pytest.mark.parametrize("chunk_elems, direct_slots", [(5, 24), (40, 0), (1 << 22, 0)])
@pytest.mark.parametrize("strategy", DETERMINISTIC)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    batch=tie_batches(),
    margin=st.sampled_from([0.0, 0.5, 1.0]),
    soft=st.booleans(),
    fallback=st.sampled_from(["easiest", "drop"]),
)
def test_chunked_and_sorted_paths_match_bruteforce(
    monkeypatch, chunk_elems, direct_slots, strategy, batch, margin, soft, fallback
):
    """Row chunking (one row per chunk) and the sort-based semi-hard path give the same result."""
    from tripletlab import functional

    monkeypatch.setattr(functional, "_CHUNK_ELEMS", chunk_elems)
    monkeypatch.setattr(functional, "_DIRECT_SLOTS", direct_slots)
    monkeypatch.setattr(functional, "_SMALL_ELEMS", 0)  # the chunked path, not the dense one
    dist, labels = batch
    dist = dist.clone().requires_grad_(True)
    loss, _ = triplet_loss_from_distances(
        dist, labels, strategy=strategy, margin=margin, soft_margin=soft, semihard_fallback=fallback
    )
    ref, _, _ = reference_loss(
        dist,
        labels,
        strategy,
        margin,
        soft,
        "mean_active" if strategy == "all" else "mean",
        fallback,
    )
    _close(loss, ref, torch.float64)
    if strategy == "all":  # gradients of batch-all are unique even with ties
        (g,) = torch.autograd.grad(loss, dist)
        (g_ref,) = torch.autograd.grad(ref, dist, allow_unused=True)
        g_ref = torch.zeros_like(dist) if g_ref is None else g_ref
        assert torch.allclose(g, g_ref, atol=1e-12)


@pytest.mark.parametrize("small_elems", [1 << 16, 0])  # dense small-batch path, chunked path
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("distance", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("strategy", DETERMINISTIC)
def test_paired_backward_matches_dense_backward_with_ties(
    monkeypatch, small_elems, dtype, distance, strategy
):
    """The embeddings path (mining on a no-grad matrix, the loss on the mined triplets' paired
    distances) equals the loss through the autograd distance matrix, value and gradient, on
    integer-grid embeddings with duplicates and many exactly tied distances; and the value
    equals the brute-force oracle's on the same distance matrix."""
    from tripletlab import functional
    from tripletlab.distances import pairwise_distance

    monkeypatch.setattr(functional, "_SMALL_ELEMS", small_elems)

    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        emb = torch.randint(0, 3, (14, 3), generator=g).to(dtype)
        emb[:, 0] += 1  # no zero row (cosine)
        emb[1] = emb[0]  # an exact duplicate
        labels = torch.randint(0, 4, (14,), generator=g)
        fn = TripletLoss(margin=0.5, strategy=strategy, distance=distance)
        e1 = emb.clone().requires_grad_(True)
        loss = fn(e1, labels)
        (g1,) = torch.autograd.grad(loss, e1, allow_unused=True)
        e2 = emb.clone().requires_grad_(True)
        dense, _ = triplet_loss_from_distances(
            pairwise_distance(e2, distance=distance), labels, strategy=strategy, margin=0.5
        )
        (g2,) = torch.autograd.grad(dense, e2, allow_unused=True)
        # the oracle on the library's own matrix: float32 cosine rounding may flip exact ties
        ref, _, _ = reference_loss(
            pairwise_distance(emb, distance=distance), labels, strategy, 0.5, False, fn.reduction
        )
        _close(loss, dense, dtype)
        _close(loss, ref, dtype)
        g1 = torch.zeros_like(emb) if g1 is None else g1
        g2 = torch.zeros_like(emb) if g2 is None else g2
        tol = TOL[dtype] * 10
        assert torch.allclose(g1, g2, rtol=tol, atol=tol)
        assert torch.isfinite(g1).all()


@st.composite
def tie_batches_with_ref(draw):
    """Tie-heavy distances of a batch against itself or against a reference set."""
    dist, labels = draw(tie_batches())
    if draw(st.booleans()) or not labels.numel():
        return dist, labels, None
    r = draw(st.integers(1, 11))
    ref = torch.tensor(draw(st.lists(st.integers(0, 3), min_size=r, max_size=r)))
    vals = draw(
        st.lists(st.integers(0, 4), min_size=labels.numel() * r, max_size=labels.numel() * r)
    )
    return torch.tensor(vals, dtype=torch.float64).reshape(-1, r) / 2, labels, ref


@pytest.mark.parametrize("strategy", ["hard", "easy-positive", "hardest-negative", "semihard"])
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    batch=tie_batches_with_ref(),
    fallback=st.sampled_from(["easiest", "drop"]),
    exclude_self=st.sampled_from([None, True, False]),
)
def test_dense_small_batch_miners_equal_chunked(
    monkeypatch, strategy, batch, fallback, exclude_self
):
    """The dense small-batch miners return exactly the chunked path's triplets (same indices,
    same order) on tie-heavy batches: singletons, one class, empty, reference sets."""
    from tripletlab import functional

    dist, labels, ref = batch
    kw = dict(strategy=strategy, semihard_fallback=fallback, exclude_self=exclude_self)
    dense = mine_from_distances(dist, labels, ref, **kw)
    monkeypatch.setattr(functional, "_SMALL_ELEMS", 0)
    chunked = mine_from_distances(dist, labels, ref, **kw)
    for got, want in zip(dense, chunked, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("distance", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("strategy", ["hard", "semihard", "easy-positive", "hardest-negative"])
@pytest.mark.parametrize("soft", [False, True])
def test_indexed_triplet_terms_gradcheck(distance, strategy, soft):
    """The hand-written backward of the loss on mined triplets passes gradcheck (float64),
    with and without a reference set (gradients to both sides)."""
    emb, labels = _random_batch(10, 4, 3, torch.float64, 7)
    bank, bank_labels = _random_batch(9, 4, 3, torch.float64, 8)
    fn = TripletLoss(margin=0.3, strategy=strategy, distance=distance, soft_margin=soft)
    e = emb.clone().requires_grad_(True)
    r = bank.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: fn(x, labels), (e,))
    assert torch.autograd.gradcheck(
        lambda x, y: fn(x, labels, ref_embeddings=y, ref_labels=bank_labels), (e, r)
    )


def test_dense_small_batch_miners_equal_chunked_many_patterns(monkeypatch):
    """400 seeded label/distance patterns (ties, singletons, one class, reference sets whose
    column i may or may not share row i's label, exclude_self on and off): the dense miners'
    triplets equal the chunked path's exactly (the sampling strategies for the same seed)."""
    from tripletlab import functional

    small = functional._SMALL_ELEMS
    for seed in range(400):
        g = torch.Generator().manual_seed(seed)
        b = int(torch.randint(1, 12, (1,), generator=g))
        r = b if seed % 3 == 0 else int(torch.randint(1, 14, (1,), generator=g))
        n_cls = int(torch.randint(1, 5, (1,), generator=g))
        labels = torch.randint(0, n_cls, (b,), generator=g)
        ref = None if seed % 3 == 0 else torch.randint(0, n_cls, (r,), generator=g)
        dist = torch.randint(0, 5, (b, r), generator=g).double() / 2
        excl = (None, True, False)[seed % 3 if ref is not None else 0]
        for strategy in ("hard", "easy-positive", "hardest-negative", "semihard"):
            for fallback in ("easiest", "drop"):
                kw = dict(strategy=strategy, semihard_fallback=fallback, exclude_self=excl)
                monkeypatch.setattr(functional, "_SMALL_ELEMS", small)
                dense = mine_from_distances(dist, labels, ref, **kw)
                monkeypatch.setattr(functional, "_SMALL_ELEMS", 0)
                chunked = mine_from_distances(dist, labels, ref, **kw)
                for got, want in zip(dense, chunked, strict=True):
                    assert torch.equal(got, want), (seed, strategy, fallback)
        for strategy in ("random", "distance-weighted"):  # same generator calls: same draws
            kw = dict(strategy=strategy, exclude_self=excl, dim=8)
            got = []
            for elems in (small, 0):
                monkeypatch.setattr(functional, "_SMALL_ELEMS", elems)
                gen = torch.Generator().manual_seed(seed)
                got.append(mine_from_distances(dist, labels, ref, generator=gen, **kw))
            for x, y in zip(*got, strict=True):
                assert torch.equal(x, y), (seed, strategy)


@pytest.mark.parametrize("small_elems", [0, 1 << 16])  # the direct counting / sorted paths
@pytest.mark.parametrize("chunk_elems", [7, 1 << 22])
def test_batch_all_exclude_self_against_a_reference_set_matches_bruteforce(
    monkeypatch, chunk_elems, small_elems
):
    """``exclude_self`` with a reference set whose column i may carry another label than anchor
    i: the pairs (i, i) are dropped as positives, and a column i of another label stays a
    negative (the direct counting path corrects its counts only for the anchor's own class)."""
    from tripletlab import functional
    from tripletlab.functional import batch_all_triplet_loss

    from oracle import negatives, positive_pairs, term

    monkeypatch.setattr(functional, "_CHUNK_ELEMS", chunk_elems)
    monkeypatch.setattr(functional, "_SMALL_ELEMS", small_elems)
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([0, 0, 1, 1, 2, 0])
    ref = torch.tensor([0, 1, 1, 2, 2, 0, 1, 0, 2])  # column 1 differs from anchor 1's label
    dist = (torch.rand(6, 9, generator=g, dtype=torch.float64) * 8).round() / 4  # exact ties
    dist = dist.requires_grad_(True)
    for reduction in ("sum", "mean_active"):
        loss, stats = batch_all_triplet_loss(
            dist, labels, ref, margin=0.5, reduction=reduction, exclude_self=True
        )
        lab, rl = labels.tolist(), ref.tolist()
        trip = [
            (a, p, n)
            for a, p in positive_pairs(lab, rl, exclude_self=True)
            for n in negatives(lab, a, rl)
        ]
        terms = torch.stack([term(dist[a, p], dist[a, n], 0.5, False) for a, p, n in trip])
        n_active = int((terms > 0).sum())
        want = terms.sum() if reduction == "sum" else terms.sum() / n_active
        assert int(stats.n_triplets) == len(trip) and int(stats.n_active) == n_active
        assert torch.allclose(loss, want, atol=1e-12)
        (g1,) = torch.autograd.grad(loss, dist)
        (g2,) = torch.autograd.grad(want, dist)
        assert torch.allclose(g1, g2, atol=1e-12)
