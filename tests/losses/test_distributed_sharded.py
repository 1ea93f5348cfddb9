"""Sharded global mining (each rank: its own anchors x the gathered batch) equals one process.

2 and 3 gloo processes on 127.0.0.1, every deterministic strategy of STRATEGY_TABLE, hinge and
soft margin, every reduction, uneven per-rank batch sizes. One spawn per world size (the
strategies loop inside the workers) and a bounded join keep the test short.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tripletlab import TripletLoss
from tripletlab.functional import STRATEGY_TABLE
from tripletlab.losses.distributed import DistributedTripletLoss

DETERMINISTIC = [name for name, row in STRATEGY_TABLE.items() if row.deterministic]
CASES = [(s, "default", False) for s in DETERMINISTIC] + [
    ("all", "mean", False),
    ("all", "sum", False),
    ("all", "mean_active", True),
    ("hard", "mean", True),
    ("semihard", "mean_active", False),
]
SIZES = {2: [9, 7], 3: [6, 4, 7]}  # uneven per-rank batches


def _batch(b=17, d=6, n_cls=4):
    g = torch.Generator().manual_seed(11)
    emb = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    return emb, torch.randint(0, n_cls, (b,), generator=g)


def _make(strategy, reduction, soft):
    return TripletLoss(
        strategy=strategy,
        margin=0.3,
        reduction=None if reduction == "default" else reduction,
        soft_margin=soft,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sizes = SIZES[world]
        emb, labels = _batch(sum(sizes))
        start = sum(sizes[:rank])
        res = {}
        for case in CASES:
            local = emb[start : start + sizes[rank]].clone().requires_grad_(True)
            loss_fn = DistributedTripletLoss(_make(*case))
            loss = loss_fn(local, labels[start : start + sizes[rank]])
            loss.backward()
            res[case] = (
                loss.detach().clone(),
                local.grad.clone(),
                loss_fn.stats,
                loss_fn.last_rows,
            )
        out[rank] = res
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_mining_equals_single_process(world):
    manager = mp.Manager()
    out = manager.dict()
    ctx = mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world, join=False)
    for p in ctx.processes:
        p.join(150)
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a worker hung"
    assert all(p.exitcode == 0 for p in ctx.processes)
    sizes = SIZES[world]
    emb0, labels = _batch(sum(sizes))
    for case in CASES:
        emb = emb0.clone().requires_grad_(True)
        ref_fn = _make(*case)
        loss = ref_fn(emb, labels)
        loss.backward()
        start = 0
        for rank, size in enumerate(sizes):
            r_loss, r_grad, r_stats, rows = out[rank][case]
            assert rows == size  # this rank computed only its own anchors
            assert torch.allclose(r_loss, loss.detach(), atol=1e-12), case
            assert torch.allclose(r_grad, emb.grad[start : start + size], atol=1e-12), case
            assert r_stats["n_triplets"] == ref_fn.stats["n_triplets"], case
            assert r_stats["n_active"] == ref_fn.stats["n_active"], case
            start += size
