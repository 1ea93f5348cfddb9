"""PKSampler: P classes x K samples, never one class, seeded, exactly resumable."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tripletlab import InputError
from tripletlab.samplers import PKSampler


def _quiet(*args, **kwargs) -> PKSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PKSampler(*args, **kwargs)


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 9), min_size=2, max_size=12),
    p=st.integers(2, 8),
    k=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_batch_has_p_classes_of_k_items(counts, p, k, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    s = _quiet(labels, p=p, k=k, seed=seed)
    p_eff = min(p, len(counts))
    assert len(s) == math.ceil(len(labels) / (p_eff * k))
    batches = list(s)
    assert len(batches) == len(s)
    for b in batches:
        assert all(0 <= i < len(labels) for i in b)
        per_class = np.bincount(labels[b], minlength=len(counts))
        assert (per_class > 0).sum() == p_eff >= 2  # never a single-class batch
        assert set(per_class[per_class > 0].tolist()) == {k}


def test_len_is_batches_per_epoch_and_iteration_advances_epochs():
    labels = torch.arange(10).repeat_interleave(7)  # 70 items
    s = PKSampler(labels, p=5, k=2, seed=0)
    assert len(s) == 7
    e0, e1 = list(s), list(s)
    assert s.epoch == 2 and len(e0) == len(e1) == 7 and e0 != e1
    assert len(PKSampler(labels, p=5, k=2, batches_per_epoch=3)) == 3


def test_items_are_visited_without_repeats_before_cycling():
    labels = torch.arange(4).repeat_interleave(6)  # 6 items per class, k=3 -> 2 draws per cycle
    s = PKSampler(labels, p=2, k=3, seed=5, batches_per_epoch=40)
    drawn: dict[int, list[int]] = {c: [] for c in range(4)}
    for b in s:
        for i in b:
            drawn[int(labels[i])].append(i)
    for c, seq in drawn.items():
        for start in range(0, len(seq) - 5, 6):  # every aligned window of 6 is a permutation
            assert sorted(seq[start : start + 6]) == list(range(6 * c, 6 * c + 6))


def test_classes_appear_about_equally_often():
    labels = np.repeat(np.arange(20), [3 + (c % 5) * 10 for c in range(20)])  # imbalanced
    s = _quiet(labels, p=4, k=3, seed=1, batches_per_epoch=500)
    seen = np.zeros(20, dtype=int)
    for b in s:
        seen[np.unique(labels[b])] += 1
    assert seen.min() >= 0.9 * seen.mean() and seen.max() <= 1.1 * seen.mean()


def test_deterministic_given_seed_and_different_across_seeds():
    labels = torch.arange(12).repeat_interleave(5)
    a, b = PKSampler(labels, p=4, k=3, seed=7), PKSampler(labels, p=4, k=3, seed=7)
    assert list(a) == list(b) and list(a) == list(b)  # two epochs each
    assert list(PKSampler(labels, p=4, k=3, seed=8)) != list(PKSampler(labels, p=4, k=3, seed=7))


@pytest.mark.parametrize("stop_after", [0, 1, 4, 5, 6, 9, 12, 13])
def test_state_dict_resumes_exactly_across_epochs(stop_after):
    labels = torch.arange(9).repeat_interleave(4)
    ref = PKSampler(labels, p=3, k=2, seed=3)  # 6 batches per epoch
    expected = [b for _ in range(3) for b in ref]
    a = PKSampler(labels, p=3, k=2, seed=3)
    got: list[list[int]] = []
    it = iter(a)
    while len(got) < stop_after:
        try:
            got.append(next(it))
        except StopIteration:
            it = iter(a)
    state = a.state_dict()
    b = PKSampler(labels, p=3, k=2, seed=3)
    b.load_state_dict(dict(state))
    while len(got) < len(expected):
        got += list(b)
    assert got[: len(expected)] == expected


def test_state_is_json_ints_and_a_state_from_other_settings_is_rejected():
    labels = torch.arange(4).repeat(3)
    state = PKSampler(labels, p=2, k=2, seed=1).state_dict()
    assert json.loads(json.dumps(state)) == state and all(type(v) is int for v in state.values())
    others = [
        (labels, {"p": 2, "k": 2, "seed": 2}, "seed"),
        (labels, {"p": 3, "k": 2, "seed": 1}, "p="),
        (labels, {"p": 2, "k": 3, "seed": 1}, "k="),
        (torch.arange(4).repeat(4), {"p": 2, "k": 2, "seed": 1}, "n_items"),
        (labels, {"p": 2, "k": 2, "seed": 1, "batches_per_epoch": 9}, "batches_per_epoch"),
    ]
    for lab, kwargs, match in others:
        with pytest.raises(InputError, match=match):
            PKSampler(lab, **kwargs).load_state_dict(state)
    with pytest.raises(InputError, match="invalid sampler state"):
        PKSampler(labels, p=2, k=2, seed=1).load_state_dict({**state, "position": 99})


def test_small_classes_are_sampled_with_replacement_and_counted():
    labels = np.array([0] * 5 + [1] + [2, 2] + [3] * 6)
    with pytest.warns(UserWarning, match="2 classes have fewer than k=3"):
        s = PKSampler(labels, p=3, k=3, seed=0)
    assert s.small == [1, 2]
    for b in s:
        assert len(b) == 9 and len(set(labels[b].tolist())) == 3


def test_p_larger_than_the_number_of_classes_is_clamped_with_a_warning():
    with pytest.warns(UserWarning, match="using p=3"):
        s = PKSampler([0, 0, 1, 1, 2, 2], p=8, k=2)
    assert s.p == 3 and all(len(b) == 6 for b in s)


@pytest.mark.parametrize(
    "labels, p, k, match",
    [
        (torch.zeros(5, dtype=torch.long), 2, 2, "at least 2 classes"),
        ([], 2, 2, "non-empty"),
        (np.zeros((2, 3)), 2, 2, "1-D"),
        ([0, 1, 1], 1, 2, "p >= 2"),
        ([0, 1, 1], 2, 0, "k >= 1"),
    ],
)
def test_errors(labels, p, k, match):
    with pytest.raises(InputError, match=match):
        PKSampler(labels, p=p, k=k)


def test_accepts_lists_numpy_and_tensors_alike():
    lab = [0, 0, 1, 1, 2, 2, 3, 3]
    runs = [list(PKSampler(x, p=2, k=2, seed=4)) for x in (lab, np.array(lab), torch.tensor(lab))]
    assert runs[0] == runs[1] == runs[2]
