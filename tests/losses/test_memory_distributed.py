"""Cross-batch memory and global mining across 2 processes (gloo, CPU)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tripletlab import InputError, TripletLoss
from tripletlab.losses.distributed import DistributedTripletLoss, all_gather_with_grad
from tripletlab.losses.memory import CrossBatchMemory


def _batch(seed, b=12, d=6, n_cls=3):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    return emb, torch.randint(0, n_cls, (b,), generator=g)


def test_xbm_fifo_and_loss_decomposition():
    loss_fn = TripletLoss(strategy="hard", margin=0.3)
    xbm = CrossBatchMemory(loss_fn, size=20, embedding_dim=6)
    e1, y1 = _batch(1)
    e2, y2 = _batch(2)
    xbm(e1, y1)  # memory empty: batch loss only
    assert len(xbm) == 12
    e2 = e2.clone().requires_grad_(True)
    loss = xbm(e2, y2)
    expect = loss_fn(e2, y2) + loss_fn(e2, y2, ref_embeddings=e1.detach(), ref_labels=y1)
    assert torch.allclose(loss, expect)
    loss.backward()
    assert torch.isfinite(e2.grad).all()
    # FIFO: 24 pushed into 20 slots -> the newest 20 remain
    assert len(xbm) == 20
    kept = torch.cat([e1, e2.detach()])[-20:]
    stored = torch.cat([xbm.embeddings[xbm.ptr :], xbm.embeddings[: xbm.ptr]])
    assert torch.allclose(stored, kept)
    assert xbm.memory_stats["n_triplets"] > 0


def test_xbm_rejects_bad_configuration():
    with pytest.raises(InputError, match="size"):
        CrossBatchMemory(TripletLoss(), size=0, embedding_dim=4)
    xbm = CrossBatchMemory(TripletLoss(), size=4, embedding_dim=4)
    with pytest.raises(InputError, match="dimension"):
        xbm(torch.randn(4, 3), torch.arange(4))


def test_all_gather_without_process_group_is_identity():
    x = torch.randn(3, 2)
    assert all_gather_with_grad(x) is x


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, strategy, out):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        emb, labels = _batch(7, b=16)
        sizes = [9, 7]  # uneven split across ranks
        start = sum(sizes[:rank])
        local = emb[start : start + sizes[rank]].clone().requires_grad_(True)
        loss_fn = DistributedTripletLoss(TripletLoss(strategy=strategy, margin=0.3))
        loss = loss_fn(local, labels[start : start + sizes[rank]])
        loss.backward()
        out[rank] = (loss.detach().clone(), local.grad.clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["all", "hard", "semihard"])
def test_global_mining_equals_single_process(strategy):
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), strategy, out), nprocs=2, join=True)
    emb, labels = _batch(7, b=16)
    emb = emb.clone().requires_grad_(True)
    loss = TripletLoss(strategy=strategy, margin=0.3)(emb, labels)
    loss.backward()
    for rank, (start, size) in enumerate([(0, 9), (9, 7)]):
        r_loss, r_grad = out[rank]
        assert torch.allclose(r_loss, loss.detach(), atol=1e-12)
        assert torch.allclose(r_grad, emb.grad[start : start + size], atol=1e-12)
