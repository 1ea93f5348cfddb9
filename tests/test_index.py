"""EmbeddingIndex: exact search vs brute force, persistence, corruption, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tripletlab import FileFormatError, InputError, MissingFileError
from tripletlab.index import EmbeddingIndex


def _data(n=200, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 5, n)


def _brute(x, q, metric, k):
    if metric == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        d = 1 - qn @ xn.T
    else:
        d = np.linalg.norm(q[:, None] - x[None], axis=2)
    return np.sort(d, axis=1)[:, :k], d


@pytest.mark.parametrize("backend", ["faiss", "numpy"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_search_equals_bruteforce(backend, metric):
    x, y = _data()
    q, _ = _data(15, seed=1)
    index = EmbeddingIndex(8, metric=metric, backend=backend)
    index.add(x, labels=y, paths=[f"img{i}.png" for i in range(len(x))])
    d, ids = index.search(q, 7)
    want, full = _brute(x, q, metric, 7)
    assert d.shape == ids.shape == (15, 7)
    assert np.allclose(d, want, atol=1e-4)
    # tie-aware: every returned id is at its reported distance
    assert np.allclose(np.take_along_axis(full, ids, axis=1), d, atol=1e-4)
    assert (index.labels_of(ids) == y[ids]).all()
    assert index.paths_of(ids[:1, :2]) == [[f"img{ids[0, 0]}.png", f"img{ids[0, 1]}.png"]]


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_kinds_find_exact_self_matches(kind):
    x, y = _data(500)
    index = EmbeddingIndex(8, metric="euclidean", kind=kind, ivf_nlist=8, nprobe=8)
    index.add(x, labels=y)
    d, ids = index.search(x[:20], 1)
    assert (ids[:, 0] == np.arange(20)).all() and np.allclose(d[:, 0], 0, atol=1e-3)


@pytest.mark.parametrize("backend", ["faiss", "numpy"])
def test_save_load_round_trip(tmp_path, backend):
    x, y = _data()
    index = EmbeddingIndex(8, backend=backend)
    index.add(x[:100], labels=y[:100], ids=np.arange(1000, 1100))
    index.add(x[100:], labels=y[100:], ids=np.arange(2000, 2100))
    index.save(tmp_path / "idx", fingerprint="abc123")
    loaded = EmbeddingIndex.load(tmp_path / "idx", expected_fingerprint="abc123")
    q, _ = _data(5, seed=2)
    for a, b in zip(index.search(q, 4), loaded.search(q, 4), strict=True):
        assert np.array_equal(a, b)
    assert len(loaded) == 200 and loaded.labels_of([2000])[0] == y[100]


def test_corrupted_truncated_missing_and_mismatched(tmp_path):
    x, y = _data()
    index = EmbeddingIndex(8)
    index.add(x, labels=y)
    d = tmp_path / "idx"
    index.save(d, fingerprint="model-a")
    with pytest.raises(InputError, match="another model"):
        EmbeddingIndex.load(d, expected_fingerprint="model-b")
    data = (d / "index.faiss").read_bytes()
    (d / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="index.faiss"):
        EmbeddingIndex.load(d)
    index.save(d)
    (d / "labels.npy").unlink()
    with pytest.raises(FileFormatError, match="labels.npy"):
        EmbeddingIndex.load(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(FileFormatError, match="manifest"):
        EmbeddingIndex.load(d)
    with pytest.raises(MissingFileError):
        EmbeddingIndex.load(tmp_path / "nope")
    index.save(d)
    man = json.loads((d / "manifest.json").read_text())
    man["count"] = 3
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(FileFormatError, match="inconsistent"):
        EmbeddingIndex.load(d)


def test_bad_queries_and_empty_index():
    index = EmbeddingIndex(8)
    with pytest.raises(InputError, match="empty"):
        index.search(np.zeros((1, 8)), 1)
    x, y = _data(10)
    index.add(x, labels=y)
    with pytest.raises(InputError, match="dimension 4"):
        index.search(np.zeros((1, 4)), 1)
    with pytest.raises(InputError, match="NaN"):
        index.search(np.full((1, 8), np.nan), 1)
    with pytest.raises(InputError, match="k must"):
        index.search(np.zeros((1, 8)), 0)
    d, ids = index.search(x[:2], 50)  # k > size: clamped
    assert ids.shape == (2, 10)
    with pytest.raises(InputError, match="metric"):
        EmbeddingIndex(8, metric="l1")
    with pytest.raises(InputError, match="labels"):
        index.add(x, labels=np.arange(3))
