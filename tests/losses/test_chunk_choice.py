"""The automatic chunk size (:mod:`tripletlab.losses.chunk_choice`): the probe's per-item cost
is linear in the items and positive, the probe leaves the model and the random state as they
were, a small free memory chunks and a large one does not, and bad arguments are errors."""

from __future__ import annotations

import pytest
import torch

from tripletlab import InputError
from tripletlab.losses import choose_chunk_size
from tripletlab.losses.chunk_choice import (
    _cgroup_free,
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


def test_mlp_cost_is_its_peak_per_item_plus_the_gradients():
    cost = measure_activation_cost(_mlp(), torch.randn(64, 12), sizes=(8, 16, 32, 64))
    # per item: the hidden layer (64 floats), ReLU's output (64), the output and its gradient
    # (8 + 8), the hidden layer's gradient (64) = 208 floats; fixed: the weight gradients
    # alive at the peak (520 floats); the inputs and the weights are not counted
    assert cost.method == "tensor peak"
    assert cost.per_item_bytes == 208 * 4 and cost.fixed_bytes == 520 * 4
    assert cost.measured == tuple(520 * 4 + n * 208 * 4 for n in (8, 16, 32, 64))  # linear
    # below 8 items another moment peaks (the first layer's weight gradient): the peak is the
    # largest of several lines, so the probe fits where the activations dominate
    tiny = measure_activation_cost(_mlp(), torch.randn(4, 12), sizes=(1, 4))
    assert tiny.measured[0] > 520 * 4 + 208 * 4


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


def test_a_frozen_model_costs_its_transient_forward_only():
    model = _mlp()
    model.requires_grad_(False)  # no backward, no gradients: the forward's tensors alone
    cost = measure_activation_cost(model, torch.randn(16, 12))
    assert cost.per_item_bytes == (64 + 64) * 4 and cost.fixed_bytes == 0


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
    fixed, per = 2080, 832

    def free_for(items):  # free memory whose half holds exactly this many items
        return 2 * (fixed + items * per)

    big = choose_chunk_size(model, x, batch_size=1024, free_bytes=1 << 30)
    assert big.chunk_size is None
    assert big.line().startswith("chunk size off (the batch of 1024 needs ~834.0 KiB")
    small = choose_chunk_size(model, x, batch_size=1024, free_bytes=free_for(100))
    assert small.chunk_size == 96  # 100 fit: a multiple of 8
    assert small.cost.bytes_for(small.chunk_size) <= small.budget_bytes
    assert small.line().startswith("chunk size 96 (the batch of 1024 would need ~834.0 KiB")
    assert "832 B per item, tensor peak" in small.line() and "(given)" in small.line()
    assert "0.5 of it allowed" in small.line()
    # fewer than 8 fit: not rounded; none fit: 1, with a warning in the line
    assert choose_chunk_size(model, x, 1024, free_bytes=free_for(5)).chunk_size == 5
    assert choose_chunk_size(model, x, 1024, free_bytes=free_for(13), multiple=1).chunk_size == 13
    tiny = choose_chunk_size(model, x, 1024, free_bytes=10)
    assert tiny.chunk_size == 1 and "it may not fit" in tiny.line()
    # all of the free memory allowed
    one = choose_chunk_size(model, x, 1024, free_bytes=free_for(100) // 2, fraction=1.0)
    assert one.chunk_size == 96
    # just enough for the whole batch: off
    assert choose_chunk_size(model, x, 1024, free_bytes=free_for(1024)).chunk_size is None


def test_mapping_and_short_samples():
    class Keyed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(12, 32)

        def forward(self, batch):
            return torch.tanh(self.lin(batch["x"]))

    cost = measure_activation_cost(Keyed(), {"x": torch.randn(16, 12), "n": 3})
    # the linear output, tanh's (the output) and its gradient; the weight's gradients
    assert cost.per_item_bytes == 3 * 32 * 4 and cost.fixed_bytes == (12 * 32 + 32) * 4
    one = measure_activation_cost(_mlp(), torch.randn(1, 12))  # one item: one point
    assert one.sizes == (1,) and one.per_item_bytes == one.measured[0] and one.fixed_bytes == 0
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


def test_cgroup_limits(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{1 << 30}\n")
    (v2 / "memory.current").write_text(f"{1 << 28}\n")
    assert _cgroup_free(str(v2)) == (1 << 30) - (1 << 28)
    (v2 / "memory.max").write_text("max\n")  # no limit
    assert _cgroup_free(str(v2)) is None
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{1 << 33}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{1 << 34}\n")  # over the limit: nothing left
    assert _cgroup_free(str(tmp_path / "v1")) == 0
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert _cgroup_free(str(tmp_path / "v1")) is None
    assert _cgroup_free(str(tmp_path / "none")) is None
