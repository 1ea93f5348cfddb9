"""The automatic chunk size (:mod:`tripletlab.losses.chunk_choice`): the probe's per-item cost
is linear in the items and positive, the probe leaves the model and the random state as they
were, a small free memory chunks and a large one does not, and bad arguments are errors."""

from __future__ import annotations

import pytest
import torch

from tripletlab import InputError
from tripletlab.losses import choose_chunk_size
from tripletlab.losses.chunk_choice import (
    _meminfo_available,
    format_bytes,
    free_memory,
    measure_activation_cost,
)


def _mlp(hidden=64, out=8):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(12, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, out)
    )


class Conv(torch.nn.Module):
    def __init__(self, dropout=0.0, bn=False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8) if bn else torch.nn.Identity()
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.head(h.mean(dim=(2, 3)))


def test_mlp_cost_is_its_saved_activations_per_item():
    cost = measure_activation_cost(_mlp(), torch.randn(16, 12))
    # ReLU's output (64 floats), which the second Linear saves too (counted once), and the
    # 8 output floats; the input and the weights are held anyway
    assert cost.method == "saved tensors"
    assert cost.per_item_bytes == (64 + 8) * 4 and cost.fixed_bytes == 0
    assert cost.measured == (8 * 288, 16 * 288)


@pytest.mark.parametrize("side", [8, 16])
def test_conv_cost_is_linear_positive_and_grows_with_the_image(side):
    x = torch.randn(24, 3, side, side)
    cost = measure_activation_cost(Conv(dropout=0.1), x, sizes=(4, 8, 12, 24))
    assert cost.per_item_bytes > 0 and cost.sizes == (4, 8, 12, 24)
    for n, m in zip(cost.sizes, cost.measured, strict=True):  # on the fitted line
        assert abs(cost.bytes_for(n) - m) <= 1e-6 * m
    # the conv output, ReLU's output and dropout's mask: a multiple of the pixels
    assert cost.per_item_bytes >= 3 * 8 * side * side * 1


def test_conv_cost_scales_with_pixels():
    small = measure_activation_cost(Conv(), torch.randn(16, 3, 8, 8))
    large = measure_activation_cost(Conv(), torch.randn(16, 3, 16, 16))
    assert 3.5 < large.per_item_bytes / small.per_item_bytes < 4.5


def test_frozen_layers_save_nothing():
    model = _mlp()
    model.requires_grad_(False)  # a frozen model: only its output is counted
    assert measure_activation_cost(model, torch.randn(16, 12)).per_item_bytes == 8 * 4


def test_the_probe_leaves_model_and_random_state_as_they_were():
    model = Conv(dropout=0.3, bn=True).train()
    x = torch.randn(16, 3, 8, 8)
    torch.manual_seed(5)
    before_rng = torch.get_rng_state()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    choose_chunk_size(model, x, batch_size=64, free_bytes=10**4)
    assert torch.equal(torch.get_rng_state(), before_rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_small_free_memory_chunks_large_does_not():
    model, x = _mlp(), torch.randn(16, 12)
    per = 288
    big = choose_chunk_size(model, x, batch_size=1024, free_bytes=1 << 30)
    assert big.chunk_size is None
    assert big.line().startswith("chunk size off (the batch of 1024 needs ~288.0 KiB")
    # budget 0.5 x 2 * 100 * 288 = 28,800 B: 100 items fit -> 96 (a multiple of 8)
    small = choose_chunk_size(model, x, batch_size=1024, free_bytes=2 * 100 * per)
    assert small.chunk_size == 96
    assert small.cost.bytes_for(small.chunk_size) <= small.budget_bytes
    assert small.line().startswith("chunk size 96 (the batch of 1024 would need ~288.0 KiB")
    assert "0.5 of it allowed" in small.line() and "(given)" in small.line()
    # fewer than 8 fit: not rounded; none fit: 1, with a warning in the line
    assert choose_chunk_size(model, x, 1024, free_bytes=2 * 5 * per).chunk_size == 5
    assert choose_chunk_size(model, x, 1024, free_bytes=2 * 5 * per, multiple=1).chunk_size == 5
    tiny = choose_chunk_size(model, x, 1024, free_bytes=10)
    assert tiny.chunk_size == 1 and "it may not fit" in tiny.line()
    # the fraction: all of the free memory
    assert choose_chunk_size(model, x, 1024, free_bytes=100 * per, fraction=1.0).chunk_size == 96
    # just enough for the whole batch: off
    assert choose_chunk_size(model, x, 1024, free_bytes=2 * 1024 * per).chunk_size is None


def test_mapping_and_short_samples():
    class Keyed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(12, 32)

        def forward(self, batch):
            return torch.tanh(self.lin(batch["x"]))

    cost = measure_activation_cost(Keyed(), {"x": torch.randn(16, 12), "n": 3})
    assert cost.per_item_bytes == 32 * 4  # tanh's output, saved for backward: the output
    one = measure_activation_cost(_mlp(), torch.randn(1, 12))  # one item: one point
    assert one.sizes == (1,) and one.per_item_bytes == 288 and one.fixed_bytes == 0
    five = measure_activation_cost(_mlp(), torch.randn(5, 12))  # (8, 16) lowered to 5
    assert five.sizes == (5,)


def test_free_memory_and_meminfo(tmp_path):
    free, source = free_memory("cpu")
    assert free > 0 and source
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       16000 kB\nMemAvailable:    1000 kB\n")
    assert _meminfo_available(str(info)) == 1000 * 1024
    assert _meminfo_available(str(tmp_path / "missing")) is None
    assert format_bytes(512) == "512 B"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"free_bytes": -1}, "free_bytes"),
        ({"multiple": 0}, "multiple"),
        ({"sizes": (0, 8)}, "sizes"),
        ({"sizes": ()}, "sizes"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"batch_size": 64, "free_bytes": 1 << 20, **kwargs}
    with pytest.raises(InputError, match=match):
        choose_chunk_size(_mlp(), torch.randn(16, 12), **args)
