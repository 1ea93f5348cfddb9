"""Gradients, degenerate batches, input errors, stochastic strategies and properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tripletlab import STRATEGIES, InputError, InputTypeError, TripletLoss, mine_triplets
from tripletlab.distances import DISTANCES, paired_distance, pairwise_distance
from tripletlab.functional import (
    STRATEGY_TABLE,
    batch_all_triplet_loss,
    distance_weighted_probabilities,
    triplet_loss_from_distances,
    triplet_margin_loss,
)


def _batch(b=12, d=5, n_cls=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1)
    labels = torch.arange(n_cls).repeat(b // n_cls + 1)[:b]
    return emb, labels


# ------------------------------------------------------------------------------ gradcheck


@pytest.mark.parametrize("distance", sorted(DISTANCES))
def test_gradcheck_distances(distance):
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: pairwise_distance(a, None, distance), (x,))
    assert torch.autograd.gradcheck(lambda a, b: pairwise_distance(a, b, distance), (x, y))
    assert torch.autograd.gradcheck(
        lambda a, b: paired_distance(a, b[: 6 - 1], distance), (x[:5], y)
    )


@pytest.mark.parametrize(
    "strategy", [name for name, row in STRATEGY_TABLE.items() if row.deterministic]
)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "mean_active", "sum"])
def test_gradcheck_losses_on_distance_matrix(strategy, soft, reduction):
    torch.manual_seed(1)
    b = 9
    dist = (torch.rand(b, b, dtype=torch.float64) * 2).requires_grad_(True)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])

    def f(d):
        return triplet_loss_from_distances(
            d, labels, strategy=strategy, margin=0.7, soft_margin=soft, reduction=reduction
        )[0]

    assert torch.autograd.gradcheck(f, (dist,))


@pytest.mark.parametrize("strategy", ["all", "hard", "semihard"])
def test_gradcheck_end_to_end(strategy):
    emb, labels = _batch(seed=2)
    emb = (emb * 1.3).requires_grad_(True)
    loss_fn = TripletLoss(margin=0.5, strategy=strategy)
    assert torch.autograd.gradcheck(lambda e: loss_fn(e, labels), (emb,))


def test_gradcheck_batch_all_soft_with_bank():
    emb, labels = _batch(7, 3, 2, seed=3)
    bank, bank_labels = _batch(9, 3, 3, seed=4)
    emb.requires_grad_(True)
    bank.requires_grad_(True)
    loss_fn = TripletLoss(strategy="all", soft_margin=True)
    assert torch.autograd.gradcheck(
        lambda e, m: loss_fn(e, labels, ref_embeddings=m, ref_labels=bank_labels), (emb, bank)
    )


def test_gradcheck_explicit_triplets():
    a, p, n = (torch.randn(5, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for soft in (False, True):
        assert torch.autograd.gradcheck(
            lambda x, y, z, s=soft: triplet_margin_loss(x, y, z, margin=0.4, soft_margin=s),
            (a, p, n),
        )


# ------------------------------------------------------------------------------ degenerate


DEGENERATE = {
    "empty batch": (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), "empty batch"),
    "B = 1": (torch.ones(1, 4), torch.zeros(1, dtype=torch.long), "one class"),
    "one class": (torch.randn(6, 4), torch.zeros(6, dtype=torch.long), "one class"),
    "all singletons": (torch.randn(5, 4), torch.arange(5), "no positive pairs"),
    "collapsed": (torch.ones(8, 4), torch.arange(4).repeat(2), ""),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("distance", sorted(DISTANCES))
def test_degenerate_batches_are_finite_with_zero_or_finite_grads(case, strategy, soft, distance):
    emb, labels, reason = DEGENERATE[case]
    emb = emb.clone().requires_grad_(True)
    loss_fn = TripletLoss(strategy=strategy, soft_margin=soft, distance=distance, seed=0)
    loss = loss_fn(emb, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    stats = loss_fn.stats
    assert all(math.isfinite(v) for v in stats.values() if isinstance(v, float)), stats
    if reason:
        assert loss.item() == 0.0
        assert torch.count_nonzero(emb.grad) == 0
        assert reason in stats["reason"], stats["reason"]
    else:  # collapsed: every triplet violates the margin; the collapse signal shows it
        assert stats["mean_distance"] == 0.0
        assert stats["n_active"] == stats["n_triplets"] > 0


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("small", [True, False], ids=["dense", "chunked"])
def test_empty_reference_set_gives_zero_loss(strategy, soft, small, monkeypatch):
    """A reference set with no rows (an empty memory bank) has no triplets: loss 0, zero grad."""
    if not small:
        import tripletlab.functional as functional

        monkeypatch.setattr(functional, "_SMALL_ELEMS", 0)
    emb = torch.randn(8, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss_fn = TripletLoss(strategy=strategy, soft_margin=soft, seed=0)
    loss = loss_fn(emb, labels, ref_embeddings=torch.zeros(0, 4), ref_labels=labels[:0])
    loss.backward()
    assert loss.item() == 0.0 and loss_fn.stats["n_triplets"] == 0
    assert emb.grad is None or torch.count_nonzero(emb.grad) == 0


def test_no_active_triplets_reason_and_zero_grad():
    emb = torch.tensor([[0.0, 0.0], [0.0, 0.01], [5.0, 0.0], [5.0, 0.01]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    for strategy in ("all", "hard", "semihard"):
        loss_fn = TripletLoss(margin=0.2, strategy=strategy)
        loss = loss_fn(emb, labels)
        (g,) = torch.autograd.grad(loss, emb)
        assert loss.item() == 0.0 and torch.count_nonzero(g) == 0
        assert loss_fn.stats["n_active"] == 0
        assert "no active triplets" in loss_fn.stats["reason"]


def test_semihard_drop_reason():
    # every negative is closer than the positive: no semi-hard negative exists
    dist = torch.tensor([[0.0, 2.0, 1.0], [2.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    loss, stats = triplet_loss_from_distances(
        dist, labels, strategy="semihard", semihard_fallback="drop"
    )
    assert loss.item() == 0.0 and "semi-hard" in stats.as_dict()["reason"]
    loss, stats = triplet_loss_from_distances(
        dist, labels, strategy="semihard", semihard_fallback="easiest", margin=0.2
    )
    assert loss.item() == pytest.approx(2.0 - 1.0 + 0.2)


def test_large_gaps_do_not_overflow_soft_margin():
    dist = torch.tensor([[0.0, 1e4, 0.0], [1e4, 0.0, 0.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    for strategy in ("all", "hard", "semihard"):
        loss, _ = triplet_loss_from_distances(dist, labels, strategy=strategy, soft_margin=True)
        assert torch.isfinite(loss) and loss.item() == pytest.approx(1e4)


# ------------------------------------------------------------------------------ input errors

BAD_INPUTS = [
    ("1-D embeddings", lambda: (torch.randn(4), torch.arange(4)), InputError, "2-D"),
    ("3-D embeddings", lambda: (torch.randn(2, 2, 2), torch.arange(2)), InputError, "2-D"),
    (
        "integer embeddings",
        lambda: (torch.ones(4, 2, dtype=torch.long), torch.arange(4)),
        InputTypeError,
        "floating",
    ),
    ("label count", lambda: (torch.randn(4, 2), torch.arange(3)), InputError, "3 entries"),
    ("float labels", lambda: (torch.randn(4, 2), torch.arange(4.0)), InputTypeError, "integer"),
    (
        "bool labels",
        lambda: (torch.randn(2, 2), torch.tensor([True, False])),
        InputTypeError,
        "integer",
    ),
    (
        "2-D labels",
        lambda: (torch.randn(4, 2), torch.zeros(4, 1, dtype=torch.long)),
        InputError,
        "1-D",
    ),
    (
        "NaN embeddings",
        lambda: (torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), torch.arange(2)),
        InputError,
        "NaN",
    ),
    (
        "Inf embeddings",
        lambda: (torch.tensor([[0.0, float("inf")], [1.0, 1.0]]), torch.arange(2)),
        InputError,
        "Inf",
    ),
    (
        "numpy embeddings",
        lambda: (torch.randn(2, 2).numpy(), torch.arange(2)),
        InputTypeError,
        "torch.Tensor",
    ),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("entry", ["loss", "miner"])
def test_bad_inputs_raise_clear_errors(case, entry):
    _, make, exc, words = case
    emb, labels = make()
    with pytest.raises(exc, match=words):
        if entry == "loss":
            TripletLoss(strategy="all")(emb, labels)
        else:
            mine_triplets(emb, labels, strategy="hard")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"strategy": "nope"}, "unknown strategy"),
        ({"distance": "manhattan"}, "unknown distance"),
        ({"reduction": "median"}, "unknown reduction"),
        ({"margin": -0.1}, "margin must be >= 0"),
        ({"margin": float("nan")}, "finite"),
        ({"semihard_fallback": "closest"}, "semihard_fallback"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, words):
    with pytest.raises(InputError, match=words):
        TripletLoss(**kwargs)


def test_negative_margin_allowed_for_soft_margin_and_bank_errors():
    TripletLoss(margin=-1.0, soft_margin=True)
    emb, labels = _batch()
    with pytest.raises(InputError, match="together"):
        TripletLoss()(emb, labels, ref_embeddings=emb)
    with pytest.raises(InputError, match="dimension"):
        TripletLoss()(emb, labels, ref_embeddings=emb[:, :2], ref_labels=labels)
    with pytest.raises(InputError, match="out of range"):
        TripletLoss()(
            emb, labels, indices_tuple=(torch.tensor([0]), torch.tensor([99]), torch.tensor([1]))
        )


# ------------------------------------------------------------------------------ stochastic


@pytest.mark.parametrize("strategy", ["random", "distance-weighted"])
def test_stochastic_strategies_valid_seeded_and_one_per_pair(strategy):
    emb, labels = _batch(16, 8, 4, seed=5, dtype=torch.float32)
    g1 = torch.Generator().manual_seed(0)
    g2 = torch.Generator().manual_seed(0)
    t1 = mine_triplets(emb, labels, strategy=strategy, generator=g1)
    t2 = mine_triplets(emb, labels, strategy=strategy, generator=g2)
    assert all(torch.equal(x, y) for x, y in zip(t1, t2, strict=True))
    a, p, n = t1
    pairs = {(i, j) for i in range(16) for j in range(16) if i != j and labels[i] == labels[j]}
    assert sorted(zip(a.tolist(), p.tolist(), strict=True)) == sorted(pairs)
    assert (labels[a] == labels[p]).all() and (labels[a] != labels[n]).all() and (a != p).all()


def test_random_negatives_are_uniform():
    labels = torch.tensor([0, 0, 1, 2, 3])
    emb = torch.randn(5, 3)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(600):
        _, _, n = mine_triplets(emb, labels, strategy="random", generator=g)
        counts += torch.bincount(n, minlength=5)
    freq = counts[2:] / counts.sum()
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.05)


def test_distance_weighted_probabilities_follow_the_paper_formula():
    dim = 16
    d = torch.tensor([[0.0, 0.3, 0.7, 1.0, 1.3, 1.5]], dtype=torch.float64)
    neg = torch.tensor([[False, True, True, True, True, True]])
    w = distance_weighted_probabilities(d, neg, dim=dim)[0]
    dc = d[0].clamp_min(0.5)
    log_q_inv = (2 - dim) * dc.log() - (dim - 3) / 2 * (1 - dc**2 / 4).log()
    expect = torch.exp(log_q_inv - log_q_inv[1:5].max())
    expect[0] = 0
    expect[5] = 0  # beyond nonzero_loss_cutoff = 1.4
    expect = expect / expect.sum()
    assert torch.allclose(w, expect)
    # sampling follows the weights
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(w.float(), 20000, replacement=True, generator=g)
    freq = torch.bincount(draws, minlength=6).double() / 20000
    assert torch.allclose(freq, w, atol=0.02)


def test_distance_weighted_falls_back_to_uniform_when_all_weights_vanish():
    d = torch.tensor([[0.0, 1.9, 1.8]])
    neg = torch.tensor([[False, True, True]])
    w = distance_weighted_probabilities(d, neg, dim=8)
    assert torch.allclose(w, torch.tensor([[0.0, 0.5, 0.5]]))


# ------------------------------------------------------------------------------ properties


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    strategy=st.sampled_from(["all", "hard", "semihard", "hardest-negative"]),
)
def test_permutation_invariance_and_nonnegative(seed, strategy):
    emb, labels = _batch(10, 4, 3, seed=seed)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(seed))
    loss_fn = TripletLoss(strategy=strategy, margin=0.3)
    l1 = loss_fn(emb, labels)
    l2 = loss_fn(emb[perm], labels[perm])
    assert l1.item() >= 0 and torch.allclose(l1, l2, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), strategy=st.sampled_from(STRATEGIES))
def test_zero_loss_when_classes_separated_by_more_than_margin(seed, strategy):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(3)
    centers = torch.eye(4, 8, dtype=torch.float64) * 10
    emb = centers[labels] + 0.01 * torch.randn(12, 8, generator=g, dtype=torch.float64)
    loss = TripletLoss(strategy=strategy, margin=1.0, seed=seed)(emb, labels)
    assert loss.item() == 0.0


def test_explicit_triplets_match_torch_without_eps_quirk():
    torch.manual_seed(0)
    a, p, n = torch.randn(3, 20, 6, dtype=torch.float64).unbind(0)
    ours = triplet_margin_loss(a, p, n, margin=0.5)
    theirs = torch.nn.TripletMarginLoss(margin=0.5, eps=0.0)(a, p, n)
    assert torch.allclose(ours, theirs)
    same = triplet_margin_loss(a, a, n, margin=0.5, reduction="sum")
    expect = torch.relu(0.5 - (a - n).norm(dim=1)).sum()
    assert torch.allclose(same, expect)
    with pytest.raises(InputError, match="equal shapes"):
        triplet_margin_loss(a, p[:3], n)


def test_batch_all_without_cubic_memory_at_large_batch():
    """B = 4096 batch-all: a B³ tensor would need 256 GiB, so passing shows O(B²) memory."""
    b = 4096
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(b, 32, generator=g), dim=1)
    emb.requires_grad_(True)
    labels = torch.arange(b // 4).repeat_interleave(4)
    loss_fn = TripletLoss(strategy="all", margin=0.2)
    loss = loss_fn(emb, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()
    assert loss_fn.stats["n_triplets"] == b * 3 * (b - 4)
    # spot-check the exact value on a sub-batch against the dense (cubic) formula
    sub = slice(0, 256)
    dist = pairwise_distance(emb[sub].detach())
    lab = labels[sub]
    pos = (lab[:, None] == lab[None, :]) & ~torch.eye(256, dtype=torch.bool)
    neg = lab[:, None] != lab[None, :]
    t = (dist[:, :, None] - dist[:, None, :] + 0.2).relu() * (pos[:, :, None] & neg[:, None, :])
    dense = t.sum() / (t > 0).sum()
    ours, _ = batch_all_triplet_loss(dist, lab, margin=0.2)
    assert torch.allclose(ours, dense, rtol=1e-5)


def test_all_miner_warns_before_materialising_huge_outputs(monkeypatch):
    from tripletlab import functional

    monkeypatch.setattr(functional, "_LARGE_TRIPLET_COUNT", 10)
    emb, labels = _batch(12, 4, 3, seed=0)
    with pytest.warns(UserWarning, match="max_triplets"):
        mine_triplets(emb, labels, strategy="all", margin=None)
    a, _, _ = mine_triplets(emb, labels, strategy="all", margin=None, max_triplets=5)
    assert a.numel() == 5
