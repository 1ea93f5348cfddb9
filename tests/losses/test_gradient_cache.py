"""Gradient caching (:mod:`tripletlab.losses.gradient_cache`) equals one full-batch backward.

Reference: the same model on the same chunks with one graph (so dropout draws the same masks),
``loss_fn(cat_c f(x_c), y).backward()``; without dropout, one forward over the whole batch.
Every strategy, hinge and soft margin, float64 (1e-10) and float32 (1e-5), a memory bank, AMP,
mapping and sequence inputs, BatchNorm in training mode (warned; running statistics updated once
per chunk), bad chunk sizes, and 2 gloo processes with the distributed loss.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tripletlab import CrossBatchMemory, InputError, TripletLoss
from tripletlab.functional import STRATEGIES
from tripletlab.losses import DistributedTripletLoss, cached_backward
from tripletlab.losses.gradient_cache import embed_in_chunks

B, CHUNK = 24, 5  # uneven chunks: 5, 5, 5, 5, 4


class MLP(torch.nn.Module):
    def __init__(self, dropout: float = 0.0, bn: bool = False) -> None:
        super().__init__()
        layers = [torch.nn.Linear(6, 16)]
        if bn:
            layers.append(torch.nn.BatchNorm1d(16))
        layers += [torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 8)]
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x):
        return torch.nn.functional.normalize(self.net(x), dim=1)


def _data(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 6, generator=g, dtype=dtype)
    return x, torch.arange(6).repeat_interleave(4)


def _model(dtype=torch.float64, **kw):
    torch.manual_seed(1)
    return MLP(**kw).to(dtype)


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _reference(model, x, y, loss_fn, chunk=CHUNK, seed=7):
    torch.manual_seed(seed)
    emb = torch.cat([model(x[s : s + chunk]) for s in range(0, len(x), chunk)])
    loss = loss_fn(emb, y)
    loss.backward()
    return loss.detach(), _grads(model)


def _cached(model, x, y, loss_fn, chunk=CHUNK, seed=7, **kw):
    torch.manual_seed(seed)
    loss = cached_backward(model, x, y, loss_fn, chunk, **kw)
    return loss, _grads(model)


def _close(a, b, tol):
    return all(torch.allclose(u, v, rtol=0, atol=tol) for u, v in zip(a, b, strict=True))


def _loss(strategy, soft):
    return TripletLoss(strategy=strategy, margin=0.3, soft_margin=soft, seed=3)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cached_equals_full_batch_float64(strategy, soft, dropout):
    x, y = _data()
    ref_loss, ref = _reference(_model(dropout=dropout), x, y, _loss(strategy, soft))
    loss, got = _cached(_model(dropout=dropout), x, y, _loss(strategy, soft))
    assert abs(float(loss - ref_loss)) < 1e-10
    assert _close(got, ref, 1e-10), (strategy, soft, dropout)
    assert any(float(g.abs().sum()) > 0 for g in got)  # not trivially zero


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("strategy", ["all", "hard", "semihard", "distance-weighted"])
def test_cached_equals_full_batch_float32(strategy, dropout):
    x, y = _data(torch.float32)
    ref_loss, ref = _reference(_model(torch.float32, dropout=dropout), x, y, _loss(strategy, False))
    loss, got = _cached(_model(torch.float32, dropout=dropout), x, y, _loss(strategy, False))
    assert abs(float(loss - ref_loss)) < 1e-5
    assert _close(got, ref, 1e-5)


def test_without_dropout_equals_one_forward_over_the_batch():
    x, y = _data()
    model = _model()
    loss_fn = TripletLoss(strategy="all")
    ref_loss = loss_fn(model(x), y)
    ref_loss.backward()
    ref_loss = ref_loss.detach()
    ref = _grads(model)
    loss, got = _cached(_model(), x, y, TripletLoss(strategy="all"))
    assert abs(float(loss - ref_loss)) < 1e-10 and _close(got, ref, 1e-10)


def test_random_state_afterwards_is_the_plain_paths():
    x, y = _data()
    _reference(_model(dropout=0.3), x, y, TripletLoss(strategy="hard"))
    after_ref = torch.rand(3)
    _cached(_model(dropout=0.3), x, y, TripletLoss(strategy="hard"))
    assert torch.equal(torch.rand(3), after_ref)


def test_gradients_accumulate_onto_existing_ones():
    x, y = _data()
    model = _model()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    _, got = _cached(model, x, y, TripletLoss(strategy="hard"))
    _, ref = _reference(_model(), x, y, TripletLoss(strategy="hard"))
    assert _close(got, [r + 1 for r in ref], 1e-10)


@pytest.mark.parametrize("chunk", [B, B + 1, 1000])
def test_chunk_size_at_least_the_batch_is_the_plain_path(chunk):
    x, y = _data()
    model = _model()
    ref_loss = TripletLoss(strategy="semihard")(model(x), y)
    ref_loss.backward()
    ref = _grads(model)
    loss, got = _cached(_model(), x, y, TripletLoss(strategy="semihard"), chunk=chunk)
    assert float(loss) == float(ref_loss.detach()) and _close(got, ref, 0)


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True])
def test_bad_chunk_size_is_an_input_error(chunk):
    x, y = _data()
    with pytest.raises(InputError, match="chunk_size must be an integer >= 1"):
        cached_backward(_model(), x, y, TripletLoss(), chunk)


def test_chunk_of_one_item():
    x, y = _data()
    _, ref = _reference(_model(dropout=0.2), x, y, TripletLoss(strategy="all"), chunk=1)
    _, got = _cached(_model(dropout=0.2), x, y, TripletLoss(strategy="all"), chunk=1)
    assert _close(got, ref, 1e-10)


def test_cross_batch_memory_two_steps():
    def run(cached):
        model, x0 = _model(dropout=0.2), None
        xbm = CrossBatchMemory(TripletLoss(strategy="hard"), size=40, embedding_dim=8)
        grads = []
        for step in range(2):
            x, y = _data(seed=step)
            x0 = x if x0 is None else x0
            model.zero_grad()
            if cached:
                _cached(model, x, y, xbm)
            else:
                _reference(model, x, y, xbm)
            grads.append(_grads(model))
        return grads, xbm.embeddings.clone(), len(xbm)

    (g_ref, m_ref, n_ref), (g, m, n) = run(False), run(True)
    assert n == n_ref == 40
    assert torch.allclose(m, m_ref, atol=1e-12)
    for a, b in zip(g, g_ref, strict=True):
        assert _close(a, b, 1e-10)


def test_amp_bfloat16_on_cpu():
    x, y = _data(torch.float32)
    model = _model(torch.float32, dropout=0.2)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = torch.cat([model(x[s : s + CHUNK]) for s in range(0, B, CHUNK)])
    loss_ref = TripletLoss(strategy="hard")(emb.float(), y)
    loss_ref.backward()
    ref = _grads(model)
    model = _model(torch.float32, dropout=0.2)
    loss, got = _cached(model, x, y, TripletLoss(strategy="hard"), amp=torch.bfloat16)
    assert abs(float(loss - loss_ref)) < 1e-6  # the same bfloat16 forward
    # the weight gradients are sums of per-chunk bfloat16 products instead of one product over
    # the batch: equal up to bfloat16 rounding (8 bits of mantissa)
    assert _close(got, ref, 5e-3)


class DictModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = MLP(0.2).double()

    def forward(self, batch):
        return self.mlp(batch["x"] * batch["mask"])


def test_mapping_and_sequence_inputs():
    x, y = _data()
    mask = (torch.arange(B * 6).reshape(B, 6) % 5 != 0).double()
    torch.manual_seed(1)
    ref_model = DictModel()
    torch.manual_seed(7)
    emb = torch.cat(
        [ref_model({"x": x[s : s + 5], "mask": mask[s : s + 5]}) for s in range(0, B, 5)]
    )
    TripletLoss(strategy="all")(emb, y).backward()
    torch.manual_seed(1)
    model = DictModel()
    _cached(model, {"x": x, "mask": mask}, y, TripletLoss(strategy="all"))
    assert _close(_grads(model), _grads(ref_model), 1e-10)

    rows = list(x)  # a sequence of items: the model stacks its chunk
    seq_model = _model()

    def f(items):
        return seq_model(torch.stack(list(items)))

    cached_backward(f, rows, y, TripletLoss(strategy="hard"), 7)
    _, ref = _reference(_model(), x, y, TripletLoss(strategy="hard"), chunk=7)
    assert _close(_grads(seq_model), ref, 1e-10)


def test_batchnorm_in_training_mode_warns_and_follows_the_chunks():
    x, y = _data()
    ref_model = _model(bn=True)
    _reference(ref_model, x, y, TripletLoss(strategy="hard"))
    model = _model(bn=True)
    with pytest.warns(UserWarning, match=r"BatchNorm in training mode .*--no-freeze-bn") as rec:
        _cached(model, x, y, TripletLoss(strategy="hard"))
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    assert _close(_grads(model), _grads(ref_model), 1e-10)
    bn, ref_bn = model.net[1], ref_model.net[1]  # running statistics: once per chunk
    assert torch.allclose(bn.running_mean, ref_bn.running_mean, atol=1e-12)
    assert torch.allclose(bn.running_var, ref_bn.running_var, atol=1e-12)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 5


def test_batchnorm_in_eval_mode_is_silent(recwarn):
    x, y = _data()
    model = _model(bn=True)
    model.net[1].eval()
    _cached(model, x, y, TripletLoss(strategy="hard"))
    assert not [w for w in recwarn if "BatchNorm" in str(w.message)]
    emb, _ = embed_in_chunks(model, x, B)  # a single chunk: nothing to warn about
    assert emb.shape == (B, 8)


# ------------------------------------------------------------------ 2 gloo processes
SIZES = [13, 11]


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
        x, y = _data()
        start = sum(SIZES[:rank])
        xl, yl = x[start : start + SIZES[rank]], y[start : start + SIZES[rank]]
        res = {}
        for strategy in ("all", "hard", "semihard"):
            loss_fn = DistributedTripletLoss(TripletLoss(strategy=strategy, margin=0.3))
            ref_loss, ref = _reference(_model(dropout=0.3), xl, yl, loss_fn, chunk=4)
            loss, got = _cached(_model(dropout=0.3), xl, yl, loss_fn, chunk=4)
            res[strategy] = (float(ref_loss), float(loss), ref, got)
        out[rank] = res
    finally:
        dist.destroy_process_group()


def test_distributed_sharded_two_gloo_processes():
    manager = mp.Manager()
    out = manager.dict()
    ctx = mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=False)
    for p in ctx.processes:
        p.join(120)
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a worker hung"
    assert all(p.exitcode == 0 for p in ctx.processes)
    for rank in range(2):
        for strategy, (ref_loss, loss, ref, got) in out[rank].items():
            assert abs(ref_loss - loss) < 1e-10, (rank, strategy)
            assert _close(got, ref, 1e-10), (rank, strategy)
