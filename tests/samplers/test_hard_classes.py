"""Global hard-class mining (``--sampler hard-class``): the sampler's groups, the neighbour table,
seeding, exact resume (in memory and streamed), and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tripletlab import InputError
from tripletlab.samplers import HardClassSampler
from tripletlab.samplers.hard_class import (
    class_centroids,
    nearest_classes,
    nearest_classes_by_items,
    sample_per_class,
)
from tripletlab.train import Trainer
from tripletlab.train.config import resolve_config


def _clusters(n_clusters=4, per_cluster=3, per_class=10, dim=8, seed=0):
    """Classes in well separated clusters of ``per_cluster`` close classes; returns (x, y)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for g in range(n_clusters):
        centre = rng.normal(0, 1, dim) * 10
        for j in range(per_cluster):
            c = g * per_cluster + j
            mean = centre + rng.normal(0, 1, dim)
            xs.append(mean + 0.1 * rng.normal(0, 1, (per_class, dim)))
            ys += [c] * per_class
    return np.concatenate(xs).astype(np.float32), np.array(ys)


def _table(x, y, pool):
    cent, present = class_centroids(torch.from_numpy(x), torch.from_numpy(y), int(y.max()) + 1)
    return nearest_classes(cent, present, pool).numpy()


def test_nearest_classes_are_the_cluster_mates():
    x, y = _clusters()
    table = _table(x, y, pool=2)
    for c in range(12):
        assert set(table[c].tolist()) == {m for m in range(c // 3 * 3, c // 3 * 3 + 3)} - {c}


def test_nearest_classes_by_items_are_the_cluster_mates():
    x, y = _clusters()
    table = nearest_classes_by_items(torch.from_numpy(x), torch.from_numpy(y), 12, n=2).numpy()
    for c in range(12):
        assert set(table[c].tolist()) == {m for m in range(c // 3 * 3, c // 3 * 3 + 3)} - {c}


def test_items_mode_follows_touching_items_not_centroids():
    """Class 0 = 16 items at -10 and 4 at +10 (centroid -6); class 1 (at 10.5) touches its small
    blob; class 2 (at 2) has the centroid nearest to class 0's but is near none of its items."""
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.normal(-10, 0.1, 16), rng.normal(10, 0.1, 4), rng.normal(10.5, 0.1, 10),
         rng.normal(2, 0.1, 10)]
    ).astype(np.float32)[:, None]  # fmt: skip
    y = torch.tensor([0] * 20 + [1] * 10 + [2] * 10)
    emb = torch.from_numpy(x)
    cent, present = class_centroids(emb, y, 3)
    assert nearest_classes(cent, present, n=1)[0].item() == 2  # by centroid: class 2
    by_items = nearest_classes_by_items(emb, y, 3, n=2, k=5)
    assert by_items[0].tolist() == [1, 2]  # by items: class 1 (votes), then centroid order
    assert by_items[1, 0].item() == 0
    with pytest.raises(InputError, match="k >= 1"):
        nearest_classes_by_items(emb, y, 3, n=1, k=0)


def test_batches_are_groups_of_near_classes_and_deterministic():
    x, y = _clusters()
    s = HardClassSampler(y, p=6, k=4, seed=3, group=3, pool=2)
    assert [len(b) for b in s] and s.neighbours is None  # before a table: random classes
    s.set_neighbours(_table(x, y, pool=2), step=1)
    s.set_epoch(0)
    batches = list(s)
    for b in batches:
        classes = sorted({int(y[i]) for i in b})
        assert len(b) == 24 and len(classes) == 6
        assert all(np.sum(y[b] == c) == 4 for c in classes)
        # two whole clusters: each chosen class's cluster mates are in the batch too
        clusters = [c // 3 for c in classes]
        assert all(clusters.count(g) == 3 for g in clusters)
    # same seed and table: the same batches; another seed: other ones
    t = HardClassSampler(y, p=6, k=4, seed=3, group=3, pool=2)
    t.set_neighbours(_table(x, y, pool=2), step=1)
    assert list(t) == batches
    u = HardClassSampler(y, p=6, k=4, seed=4, group=3, pool=2)
    u.set_neighbours(_table(x, y, pool=2), step=1)
    assert list(u) != batches


def test_state_round_trip_continues_exactly():
    x, y = _clusters()
    s = HardClassSampler(y, p=4, k=3, seed=0, group=2)
    s.set_neighbours(_table(x, y, pool=s.pool), step=5)
    it = iter(s)
    [next(it) for _ in range(3)]
    state = json.loads(json.dumps(s.state_dict()))
    rest = [next(it) for _ in range(len(s) - 3)]
    t = HardClassSampler(y, p=4, k=3, seed=0, group=2)
    t.load_state_dict(state)
    assert t.refreshed_at == 5 and np.array_equal(t.neighbours, s.neighbours)
    assert list(t) == rest
    with pytest.raises(InputError, match="seed=0"):
        HardClassSampler(y, p=4, k=3, seed=1, group=2).load_state_dict(state)
    with pytest.raises(InputError, match="not a hard-class"):
        t.load_state_dict({"epoch": 0, "position": 0})


def test_sampler_bad_input():
    y = np.arange(5).repeat(4)
    with pytest.raises(InputError, match="more classes than P: 5 classes, P = 5"):
        HardClassSampler(y, p=5, k=2)
    with pytest.raises(InputError, match="group must be in"):
        HardClassSampler(y, p=4, k=2, group=5)
    s = HardClassSampler(y, p=3, k=2, group=2)
    with pytest.raises(InputError, match="shape"):
        s.set_neighbours(np.zeros((4, 2), dtype=int), step=1)
    with pytest.raises(InputError, match="entries"):
        s.set_neighbours(np.full((5, 2), 7), step=1)


def test_sample_per_class_caps_each_class():
    pos = np.array([0] * 10 + [1] * 3)
    keep = sample_per_class(pos, 4, seed=0)
    assert np.sum(pos[keep] == 0) == 4 and np.sum(pos[keep] == 1) == 3
    assert np.array_equal(keep, sample_per_class(pos, 4, seed=0))
    assert len(sample_per_class(pos, 0, seed=0)) == 13


def _cfg(tmp_path, name="run", **kw):
    base = {
        "data": "digits",
        "out": str(tmp_path / name),
        "steps": 24,
        "eval_every": 8,
        "checkpoint_every": 8,
        "log_every": 4,
        "quiet": True,
        "report": False,
        "embedding_dim": 16,
        "model_options": {"hidden": [32]},
        "p": 5,
        "k": 4,
        "sampler": "hard-class",
        "hard_class_group": 2,
    }
    base.update(kw)
    return resolve_config(overrides=base)


def _state(run):
    return load_file(str(run / "checkpoint" / "state.safetensors"))


@pytest.mark.parametrize("every", [6, 8], ids=["between-checkpoints", "at-a-checkpoint"])
def test_trainer_resume_is_bit_identical(tmp_path, every):
    full = Trainer(_cfg(tmp_path, "full", hard_class_every=every))
    res = full.fit()
    assert res["hard_class_refreshes"] == 23 // every
    half = Trainer(_cfg(tmp_path, "half", hard_class_every=every))
    half.total_steps = 16  # stop early, as if killed after the checkpoint at step 16
    half.fit()
    resumed = Trainer(_cfg(tmp_path, "half", hard_class_every=every), resume=True)
    assert resumed.state.step == 16
    resumed.fit()
    a, b = _state(tmp_path / "full"), _state(tmp_path / "half")
    for k in a:
        if k.startswith("model."):
            assert torch.equal(a[k], b[k]), k
    assert full.sampler.neighbours.tolist() == resumed.sampler.neighbours.tolist()
    logs = [
        json.loads(line) for line in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()
    ]
    refreshes = [r["step"] for r in logs if r.get("type") == "hard_classes"]
    assert refreshes == [s + 1 for s in range(every, 24, every)]  # none lost or doubled
    assert all(r["seconds"] >= 0 for r in logs if r.get("type") == "hard_classes")


@pytest.mark.parametrize("by", ["centroid", "items"])
def test_trainer_finds_the_near_classes(tmp_path, by):
    x, y = _clusters(per_class=12)
    np.savez(tmp_path / "clusters.npz", x=x, y=y)
    t = Trainer(
        _cfg(
            tmp_path,
            data=str(tmp_path / "clusters.npz"),
            split_by="sample",
            p=3,
            k=3,
            hard_class_group=3,
            hard_class_every=5,
            hard_class_by=by,
            steps=6,
            val_fraction=0.0,
            model_options={"hidden": []},
        )  # fmt: skip
    )
    t.fit()
    nb = t.sampler.neighbours
    assert t.sampler.refreshed_at == 5
    hits = [set(nb[c][:2].tolist()) == set(range(c // 3 * 3, c // 3 * 3 + 3)) - {c}
            for c in range(12)]  # fmt: skip
    assert sum(hits) >= 10, nb  # a random linear map keeps the well separated clusters


def test_trainer_bad_input(tmp_path):
    with pytest.raises(InputError, match="hard-class-every must be >= 1"):
        _cfg(tmp_path, hard_class_every=0)
    with pytest.raises(InputError, match="hard-class-group must be in"):
        _cfg(tmp_path, hard_class_group=6)
    with pytest.raises(InputError, match="more classes than P: 10 classes, P = 10"):
        Trainer(_cfg(tmp_path, p=10))
    assert not (tmp_path / "run").exists()  # nothing left behind
    _cfg(tmp_path, sampler="pk", hard_class_every=0, p=2, k=2)  # ignored without hard-class


def test_streamed_images_resume_exactly(tmp_path):
    from helpers import make_folder

    root = make_folder(tmp_path / "imgs", n_classes=6, per_class=8, size=(12, 12))
    kw = {"data": str(root), "split_by": "sample", "test_fraction": 0.25, "p": 3, "k": 2,
          "hard_class_every": 3, "steps": 10, "eval_every": 4, "checkpoint_every": 4,
          "image_size": [12, 12], "workers": 2, "threads": 1, "val_fraction": 0.0, "stream": True,
          "model_options": {"channels": [8, 8]}}  # fmt: skip
    full = Trainer(_cfg(tmp_path, "full", **kw))
    full.fit()
    half = Trainer(_cfg(tmp_path, "half", **kw))
    half.total_steps = 8
    half.fit()
    resumed = Trainer(_cfg(tmp_path, "half", **kw), resume=True)
    resumed.fit()
    a, b = _state(tmp_path / "full"), _state(tmp_path / "half")
    assert full.stream is not None and full.sampler.refreshed_at == 9
    for k in a:
        if k.startswith("model."):
            assert torch.equal(a[k], b[k]), k
