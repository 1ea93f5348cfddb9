"""Agreement with pytorch-metric-learning (dev extra); skipped with a reason when absent."""

from __future__ import annotations

import pytest
import torch

pml_losses = pytest.importorskip(
    "pytorch_metric_learning.losses", reason="pytorch-metric-learning not installed (dev extra)"
)
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")

from tripletlab import STRATEGIES, TripletLoss, mine_triplets  # noqa: E402


def _batch(seed, b=32, d=16, k=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1)
    labels = torch.arange(b // k).repeat_interleave(k)
    perm = torch.randperm(b, generator=g)
    return emb[perm], labels[perm]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("margin", [0.05, 0.2, 1.0])
def test_batch_all_mean_active_equals_pml_miner_all_plus_loss(seed, margin):
    emb, labels = _batch(seed)
    emb_pml = emb.clone().requires_grad_(True)
    miner = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets="all")
    theirs = pml_losses.TripletMarginLoss(margin=margin)(emb_pml, labels, miner(emb_pml, labels))
    theirs.backward()
    emb_ours = emb.clone().requires_grad_(True)
    ours = TripletLoss(margin=margin, strategy="all", reduction="mean_active")(emb_ours, labels)
    ours.backward()
    assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-12)
    # pml's default distance re-normalises inside the graph (projecting the gradient); with
    # normalize_embeddings=False the gradients must agree too
    dist = pml_distances.LpDistance(normalize_embeddings=False)
    emb_pml = emb.clone().requires_grad_(True)
    miner = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets="all", distance=dist)
    loss = pml_losses.TripletMarginLoss(margin=margin, distance=dist)
    loss(emb_pml, labels, miner(emb_pml, labels)).backward()
    assert torch.allclose(emb_ours.grad, emb_pml.grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", ["mean", "mean_active"])
def test_our_triplets_fed_to_pml_loss(strategy, reduction):
    emb, labels = _batch(7)
    idx = mine_triplets(
        emb, labels, strategy=strategy, margin=0.3, generator=torch.Generator().manual_seed(0)
    )
    reducer = (
        pml_reducers.MeanReducer() if reduction == "mean" else pml_reducers.AvgNonZeroReducer()
    )
    theirs = pml_losses.TripletMarginLoss(margin=0.3, reducer=reducer)(emb, labels, idx)
    ours = TripletLoss(margin=0.3, reduction=reduction)(emb, labels, indices_tuple=idx)
    assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("miner_name", ["BatchHardMiner", "TripletMarginMiner"])
def test_pml_miners_feed_our_loss(miner_name):
    emb, labels = _batch(3)
    miner = getattr(pml_miners, miner_name)()
    idx = miner(emb, labels)
    theirs = pml_losses.TripletMarginLoss(margin=0.2)(emb, labels, idx)
    ours = TripletLoss(margin=0.2, reduction="mean_active")(emb, labels, indices_tuple=idx)
    assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-12)


def test_batch_hard_agrees_with_pml_batch_hard_miner():
    emb, labels = _batch(11)
    idx = pml_miners.BatchHardMiner()(emb, labels)
    theirs = pml_losses.TripletMarginLoss(margin=0.2, reducer=pml_reducers.MeanReducer())(
        emb, labels, idx
    )
    ours = TripletLoss(margin=0.2, strategy="hard", reduction="mean")(emb, labels)
    assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-12)
