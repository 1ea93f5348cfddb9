"""Few-shot (N-way K-shot nearest-prototype) accuracy vs a plain-loop oracle. (Bad
embeddings/labels are in the shared table of test_metrics_retrieval.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tripletlab import InputError
from tripletlab.metrics import few_shot_accuracy


def _oracle(emb, y, n_way, k_shot, n_query, n_episodes, seed, distance):
    """The documented episode sampling, then nearest prototype with plain Python loops."""
    emb = np.asarray(emb, dtype=np.float64)
    if distance == "cosine":
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-300)
    classes = sorted({int(c) for c in y})
    eligible = np.array([c for c in classes if (y == c).sum() >= k_shot + n_query])
    rng = np.random.default_rng(seed)
    accs = []
    for _ in range(n_episodes):
        chosen = rng.choice(eligible, size=n_way, replace=False)
        protos, queries = [], []
        for ci, c in enumerate(chosen):
            items = [i for i in range(len(y)) if y[i] == c]
            idx = rng.choice(np.array(items), size=k_shot + n_query, replace=False)
            proto = [sum(emb[i][d] for i in idx[:k_shot]) / k_shot for d in range(emb.shape[1])]
            proto = np.array(proto)
            if distance == "cosine":
                proto = proto / max(np.linalg.norm(proto), 1e-300)
            protos.append(proto)
            queries += [(i, ci) for i in idx[k_shot:]]
        correct = 0
        for i, ci in queries:
            if distance == "cosine":
                dists = [1.0 - float(emb[i] @ p) for p in protos]
            else:
                dists = [math.sqrt(sum((emb[i] - p) ** 2)) for p in protos]
            best = min(range(n_way), key=lambda c: (dists[c], c))
            correct += best == ci
        accs.append(correct / len(queries))
    return float(np.mean(accs)), float(1.96 * np.std(accs) / math.sqrt(n_episodes))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 1000),
    n_way=st.integers(2, 5),
    k_shot=st.integers(1, 3),
    n_query=st.integers(1, 3),
    distance=st.sampled_from(["euclidean", "cosine"]),
)
def test_equals_oracle(seed, n_way, k_shot, n_query, distance):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 8, 70)
    emb = rng.normal(size=(70, 3)) + np.eye(8, 3)[y] * 1.5
    got = few_shot_accuracy(
        emb,
        y,
        n_way=n_way,
        k_shot=k_shot,
        n_query=n_query,
        n_episodes=20,
        seed=seed,
        distance=distance,
    )
    acc, ci = _oracle(emb, y, n_way, k_shot, n_query, 20, seed, distance)
    assert got["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert got["ci95"] == pytest.approx(ci, abs=1e-12)
    assert (got["n_way"], got["k_shot"], got["n_episodes"]) == (n_way, k_shot, 20)


def test_separable_chance_and_seeded():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 6)
    emb = rng.normal(size=(10, 8))[y] * 10 + rng.normal(size=(60, 8)) * 0.01
    m = few_shot_accuracy(emb, y, n_way=5, k_shot=1, n_query=3, n_episodes=50, distance="euclidean")
    assert m["accuracy"] == 1.0 and m["ci95"] == 0.0
    noise = rng.normal(size=(60, 8))
    m2 = few_shot_accuracy(
        noise, y, n_way=5, k_shot=1, n_query=3, n_episodes=400, seed=1, distance="euclidean"
    )
    assert abs(m2["accuracy"] - 0.2) < 3 * m2["ci95"] + 0.02 and m2["ci95"] > 0
    again = few_shot_accuracy(torch.from_numpy(noise), torch.from_numpy(y), n_way=5, k_shot=1,
                              n_query=3, n_episodes=400, seed=1, distance="euclidean")  # fmt: skip
    assert again == m2
    other = few_shot_accuracy(
        noise, y, n_way=5, k_shot=1, n_query=3, n_episodes=400, seed=2, distance="euclidean"
    )
    assert other["accuracy"] != m2["accuracy"]


def test_more_shots_help_on_noisy_clusters():
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(20), 12)
    emb = rng.normal(size=(20, 16))[y] + rng.normal(size=(240, 16)) * 1.2
    one = few_shot_accuracy(
        emb, y, n_way=5, k_shot=1, n_query=5, n_episodes=300, distance="euclidean"
    )
    five = few_shot_accuracy(
        emb, y, n_way=5, k_shot=5, n_query=5, n_episodes=300, distance="euclidean"
    )
    assert five["accuracy"] > one["accuracy"] + 2 * max(one["ci95"], five["ci95"])


def test_small_classes_are_left_out():
    y = np.array([0] * 6 + [1] * 6 + [2] * 2 + [3] * 6)  # class 2 cannot serve 1 shot + 3 queries
    emb = np.eye(4)[y] * 5.0
    m = few_shot_accuracy(emb, y, n_way=3, k_shot=1, n_query=3, n_episodes=30, distance="euclidean")
    assert m["accuracy"] == 1.0  # only classes 0, 1, 3 are ever drawn
    with pytest.raises(InputError, match="only 3 qualify"):
        few_shot_accuracy(emb, y, n_way=4, k_shot=1, n_query=3, distance="euclidean")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"n_way": 1}, "n_way"),
        ({"n_way": 2.0}, "n_way"),
        ({"k_shot": 0}, "k_shot"),
        ({"n_query": 0}, "n_query"),
        ({"n_episodes": 0}, "n_episodes"),
        ({"n_episodes": True}, "n_episodes"),
        ({"n_way": 7}, "qualify"),
        ({"k_shot": 5, "n_query": 5}, "qualify"),
        ({"distance": "l1"}, "distance"),
    ],
)
def test_bad_options(kwargs, words):
    y = np.repeat(np.arange(6), 4)
    emb = np.random.default_rng(0).normal(size=(24, 3))
    with pytest.raises(InputError, match=words):
        few_shot_accuracy(emb, y, **{"n_way": 2, "n_query": 2, **kwargs})
