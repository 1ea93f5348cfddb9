"""Checks that need a CUDA device (``-m gpu``; they skip without one and run in
``benchmarks/gpu_check.sh``): the losses, the retrieval metrics and a short training run on the GPU
give what the CPU gives."""

from __future__ import annotations

import json

import pytest
import torch

from tripletlab import TripletLoss
from tripletlab.functional import STRATEGIES
from tripletlab.metrics import knn_search, retrieval_metrics

pytestmark = pytest.mark.gpu

DETERMINISTIC = [s for s in STRATEGIES if s not in ("random", "distance-weighted")]


@pytest.mark.parametrize("strategy", DETERMINISTIC)
def test_loss_and_gradient_on_cuda_equal_cpu(strategy):
    g = torch.Generator().manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(64, 16, generator=g, dtype=torch.float64), dim=1)
    y = torch.arange(16).repeat_interleave(4)
    out = {}
    for dev in ("cpu", "cuda"):
        x = e.clone().to(dev).requires_grad_(True)
        loss = TripletLoss(margin=0.2, strategy=strategy)(x, y.to(dev))
        loss.backward()
        out[dev] = (loss.detach().cpu(), x.grad.cpu())
    assert torch.allclose(out["cpu"][0], out["cuda"][0], atol=1e-10)
    assert torch.allclose(out["cpu"][1], out["cuda"][1], atol=1e-10)


def test_retrieval_and_knn_of_cuda_tensors_equal_cpu():
    g = torch.Generator().manual_seed(1)
    e = torch.randn(500, 8, generator=g)
    y = torch.arange(500) % 7
    cpu = retrieval_metrics(e, y, nmi=False)
    gpu = retrieval_metrics(e.cuda(), y.cuda(), nmi=False)
    assert cpu == gpu
    d, i = knn_search(e.cuda(), e.cuda(), 5, exclude_self=True)
    d0, i0 = knn_search(e, e, 5, exclude_self=True)
    assert torch.equal(i.cpu(), i0) and torch.allclose(d.cpu(), d0)


def test_short_training_run_on_cuda_with_amp(tmp_path):
    from tripletlab.cli import main

    out = tmp_path / "run"
    assert main(["train", "--steps", "30", "--device", "cuda", "--amp", "--out", str(out)]) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert 0.0 < ev["retrieval"]["map_at_r"] <= 1.0
