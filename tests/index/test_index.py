"""EmbeddingIndex: exact search vs brute force (tie-aware), persistence, corruption, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tripletlab import FileFormatError, InputError, MissingFileError
from tripletlab.index import HAVE_FAISS, EmbeddingIndex

BACKENDS = ["faiss", "numpy"] if HAVE_FAISS else ["numpy"]
needs_faiss = pytest.mark.skipif(not HAVE_FAISS, reason="faiss is not importable")


def _data(n=200, d=8, seed=0, grid=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    if grid:  # small integer coordinates: many exactly equal distances
        x = np.round(x * 1.2)
    return x.astype(np.float32), rng.integers(0, 5, n)


def _brute_distances(x, q, metric):
    """Plain loops in float64: the distance of every query to every item."""
    out = np.empty((len(q), len(x)))
    for i in range(len(q)):
        for j in range(len(x)):
            a, b = q[i].astype(np.float64), x[j].astype(np.float64)
            if metric == "cosine":
                na, nb = max(np.linalg.norm(a), 1e-12), max(np.linalg.norm(b), 1e-12)
                out[i, j] = 1.0 - float(a @ b) / (na * nb)
            else:
                out[i, j] = float(np.sqrt(((a - b) ** 2).sum()))
    return out


def _assert_tie_aware_equal(full, d, ids, k, atol=1e-4):
    """Search result == brute force, allowing any order among (numerically) equal distances:
    the distances match the sorted brute-force distances, every returned id really is at its
    reported distance, ids are distinct, and every item strictly closer than the k-th returned
    distance is returned."""
    want = np.sort(full, axis=1)[:, :k]
    assert d.shape == ids.shape == (full.shape[0], k)
    np.testing.assert_allclose(d, want, atol=atol)
    np.testing.assert_allclose(np.take_along_axis(full, ids, axis=1), d, atol=atol)
    for i in range(full.shape[0]):
        assert len(set(ids[i].tolist())) == k
        closer = set(np.flatnonzero(full[i] < d[i, -1] - atol).tolist())
        assert closer <= set(ids[i].tolist())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("grid", [False, True])
def test_exact_search_equals_bruteforce(backend, metric, grid):
    x, y = _data(grid=grid)
    x[0] = 0.0 if metric == "euclidean" else x[0]  # a zero vector is fine for euclidean
    q, _ = _data(15, seed=1, grid=grid)
    index = EmbeddingIndex(8, metric=metric, backend=backend)
    index.add(x, labels=y, paths=[f"img{i}.png" for i in range(len(x))])
    d, ids = index.search(q, 7)
    _assert_tie_aware_equal(_brute_distances(x, q, metric), d, ids, 7)
    assert d.dtype == np.float32 and ids.dtype == np.int64
    assert (np.diff(d, axis=1) >= 0).all()
    assert (index.labels_of(ids) == y[ids]).all()
    assert index.paths_of(ids[:1, :2]) == [[f"img{ids[0, 0]}.png", f"img{ids[0, 1]}.png"]]


@needs_faiss
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_numpy_backend_equals_faiss(metric):
    x, y = _data(300, 16, seed=3)
    q, _ = _data(40, 16, seed=4)
    a = EmbeddingIndex(16, metric=metric, backend="faiss")
    b = EmbeddingIndex(16, metric=metric, backend="numpy")
    for idx in (a, b):
        idx.add(x[:100], labels=y[:100])
        idx.add(x[100:], labels=y[100:])
    da, ia = a.search(q, 10)
    db, ib = b.search(q, 10)
    np.testing.assert_allclose(da, db, atol=1e-5)
    assert np.array_equal(ia, ib)  # random floats: no ties


def test_numpy_backend_orders_ties_by_insertion():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=np.float32)
    index = EmbeddingIndex(2, metric="euclidean", backend="numpy")
    index.add(x, ids=[40, 30, 20, 10])
    d, ids = index.search(np.zeros((1, 2)), 4)  # all four at distance 1
    assert np.allclose(d, 1.0) and ids.tolist() == [[40, 30, 20, 10]]


def test_torch_and_numpy_inputs_and_single_vector_query():
    x, _ = _data(50)
    index = EmbeddingIndex(8, metric="euclidean")
    index.add(torch.from_numpy(x))
    d1, i1 = index.search(torch.from_numpy(x[:3]), 2)
    d2, i2 = index.search(x[:3].astype(np.float64), 2)
    d3, i3 = index.search(x[0], 2)  # one (dim,) vector
    assert np.array_equal(i1, i2) and np.allclose(d1, d2)
    assert i3.shape == (1, 2) and i3[0, 0] == 0 and d3[0, 0] == pytest.approx(0, abs=1e-3)


@needs_faiss
@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_approximate_kinds_smoke(kind, metric, tmp_path):
    x, y = _data(500)
    index = EmbeddingIndex(8, metric=metric, kind=kind, ivf_nlist=8, nprobe=8)
    index.add(x, labels=y)
    d, ids = index.search(x[:20], 5)
    assert (ids[:, 0] == np.arange(20)).all() and np.allclose(d[:, 0], 0, atol=1e-3)
    # with nprobe = nlist IVF is exhaustive; HNSW at this size finds the true neighbours
    full = _brute_distances(x, x[:20], metric)
    np.testing.assert_allclose(d, np.sort(full, axis=1)[:, :5], atol=1e-4)
    index.save(tmp_path / kind)
    loaded = EmbeddingIndex.load(tmp_path / kind)
    assert loaded.kind == kind and np.array_equal(loaded.search(x[:20], 5)[1], ids)


@needs_faiss
def test_ivf_needs_enough_training_vectors():
    index = EmbeddingIndex(8, kind="ivf", ivf_nlist=64)
    with pytest.raises(InputError, match="at least 64"):
        index.add(_data(10)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_round_trip(tmp_path, backend):
    x, y = _data()
    index = EmbeddingIndex(8, backend=backend)
    index.add(x[:100], labels=y[:100], ids=np.arange(1000, 1100))
    index.add(x[100:], labels=y[100:], ids=np.arange(2000, 2100), paths=["p"] * 100)
    index.classes = [f"c{i}" for i in range(5)]
    index.save(tmp_path / "idx", fingerprint="abc123")
    loaded = EmbeddingIndex.load(tmp_path / "idx", expected_fingerprint="abc123")
    q, _ = _data(5, seed=2)
    for a, b in zip(index.search(q, 4), loaded.search(q, 4), strict=True):
        assert np.array_equal(a, b)
    assert len(loaded) == 200 and loaded.labels_of([2000, 5])[0] == y[100]
    assert loaded.labels_of([5])[0] == -1  # unknown id
    assert loaded.paths_of([1000, 2000]) == ["", "p"]
    assert loaded.classes == index.classes and loaded.backend == backend
    man = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert {"format", "dim", "metric", "kind", "count", "fingerprint", "files"} <= set(man)
    assert man["count"] == 200 and man["dim"] == 8 and man["fingerprint"] == "abc123"
    assert all(len(h) == 64 for h in man["files"].values())
    # labels/ids are plain .npy: readable without pickle
    assert np.load(tmp_path / "idx" / "ids.npy", allow_pickle=False).dtype == np.int64
    # saving again over the same directory replaces the index
    index.add(x[:1], ids=[7])
    index.save(tmp_path / "idx")
    assert len(EmbeddingIndex.load(tmp_path / "idx")) == 201


def _saved(tmp_path, backend="auto"):
    x, y = _data()
    index = EmbeddingIndex(8, backend=backend)
    index.add(x, labels=y)
    d = tmp_path / "idx"
    index.save(d, fingerprint="model-a")
    return d


def test_fingerprint_mismatch(tmp_path):
    d = _saved(tmp_path)
    with pytest.raises(InputError, match="another model"):
        EmbeddingIndex.load(d, expected_fingerprint="model-b")
    assert len(EmbeddingIndex.load(d)) == 200  # no expectation: accepted


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["data", "ids.npy", "labels.npy", "meta.json"])
def test_truncated_or_corrupted_files_are_rejected_by_name(tmp_path, backend, name):
    d = _saved(tmp_path, backend)
    if name == "data":
        name = "index.faiss" if backend == "faiss" else "vectors.npy"
    data = (d / name).read_bytes()
    (d / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match=name):
        EmbeddingIndex.load(d)
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    (d / name).write_bytes(bytes(flipped))
    with pytest.raises(FileFormatError, match=name):
        EmbeddingIndex.load(d)
    (d / name).unlink()
    with pytest.raises(MissingFileError, match=name):
        EmbeddingIndex.load(d)


def test_bad_manifests(tmp_path):
    d = _saved(tmp_path)
    good = json.loads((d / "manifest.json").read_text())

    def write(man):
        (d / "manifest.json").write_text(man if isinstance(man, str) else json.dumps(man))

    for man in (
        "{not json",
        "[1, 2]",
        {**good, "format": 99},
        {**good, "dim": "x"},
        {**good, "metric": "l1"},
        {k: v for k, v in good.items() if k != "files"},
        {**good, "files": {"../../etc/passwd": "0" * 64}},
        {**good, "files": {k: v for k, v in good["files"].items() if k != "ids.npy"}},
    ):
        write(man)
        with pytest.raises(FileFormatError, match="manifest"):
            EmbeddingIndex.load(d)
    for key, value in (("count", 3), ("dim", 4)):
        write({**good, key: value})
        with pytest.raises(FileFormatError, match="inconsistent"):
            EmbeddingIndex.load(d)
    (d / "manifest.json").unlink()
    with pytest.raises(MissingFileError, match="manifest.json"):
        EmbeddingIndex.load(d)
    with pytest.raises(MissingFileError, match="nope"):
        EmbeddingIndex.load(tmp_path / "nope")


def test_pickled_arrays_are_not_loaded(tmp_path):
    d = _saved(tmp_path)
    man = json.loads((d / "manifest.json").read_text())
    np.save(d / "labels.npy", np.array([object()] * 200, dtype=object), allow_pickle=True)
    from tripletlab.utils import sha256_file

    man["files"]["labels.npy"] = sha256_file(d / "labels.npy")  # checksum made to match
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(FileFormatError, match="cannot read"):
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
    with pytest.raises(InputError, match="2-D"):
        index.search(np.zeros((1, 2, 8)), 1)
    for k in (0, -1, 1.5, True, "3"):
        with pytest.raises(InputError, match="k must"):
            index.search(np.zeros((1, 8)), k)
    d, ids = index.search(x[:2], 50)  # k > size: clamped to len(index)
    assert ids.shape == (2, 10) and sorted(ids[0].tolist()) == list(range(10))


def test_bad_construction_and_add():
    for kwargs, words in (
        ({"metric": "l1"}, "metric"),
        ({"kind": "lsh"}, "kind"),
        ({"backend": "annoy"}, "backend"),
        ({"backend": "numpy", "kind": "hnsw"}, "flat"),
    ):
        with pytest.raises(InputError, match=words):
            EmbeddingIndex(8, **kwargs)
    with pytest.raises(InputError, match="dimension"):
        EmbeddingIndex(0)
    index = EmbeddingIndex(8)
    x, _ = _data(10)
    with pytest.raises(InputError, match="labels"):
        index.add(x, labels=np.arange(3))
    with pytest.raises(InputError, match="labels"):
        index.add(x, labels=np.zeros(10))
    with pytest.raises(InputError, match="paths"):
        index.add(x, paths=["a"])
    with pytest.raises(InputError, match="unique"):
        index.add(x, ids=np.zeros(10, dtype=int))
    index.add(x, ids=np.arange(10))
    with pytest.raises(InputError, match="unique"):
        index.add(x[:1], ids=[3])
    index.add(x[:1])  # default ids continue after the largest
    assert index.ids[-1] == 10 and len(index) == 11


@needs_faiss
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_ivfpq_recall_is_measured_and_saved_with_checksums(metric, tmp_path):
    from tripletlab.index import search_quality

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 16))
    x = (centers[rng.integers(0, 20, 2000)] + 0.1 * rng.normal(size=(2000, 16))).astype("float32")
    index = EmbeddingIndex(16, metric=metric, kind="ivfpq", ivf_nlist=16, nprobe=16, pq_m=8)
    index.add(x, labels=np.arange(2000))
    q = search_quality(index, x, n_queries=200, k=10)
    assert 0.3 < q["recall_at_k"] <= 1.0 and q["ms_per_query"] > 0
    flat = EmbeddingIndex(16, metric=metric, kind="flat")
    flat.add(x)
    assert search_quality(flat, x, n_queries=50)["recall_at_k"] > 0.99
    index.quality = q
    index.save(tmp_path / "pq", fingerprint="abc")
    loaded = EmbeddingIndex.load(tmp_path / "pq", expected_fingerprint="abc")
    assert loaded.kind == "ivfpq" and loaded.pq_m == 8 and loaded.quality == q
    assert np.array_equal(loaded.search(x[:20], 5)[1], index.search(x[:20], 5)[1])
    with pytest.raises(InputError, match="another model"):
        EmbeddingIndex.load(tmp_path / "pq", expected_fingerprint="other")
    data = (tmp_path / "pq" / "index.faiss").read_bytes()
    (tmp_path / "pq" / "index.faiss").write_bytes(data[:-10])
    with pytest.raises(FileFormatError):
        EmbeddingIndex.load(tmp_path / "pq")


@needs_faiss
def test_ivfpq_on_too_few_vectors_is_a_clear_error():
    index = EmbeddingIndex(16, kind="ivfpq", ivf_nlist=4)
    with pytest.raises(InputError, match="at least 256 vectors.*--kind flat"):
        index.add(np.random.default_rng(0).normal(size=(100, 16)))
    with pytest.raises(InputError, match="pq_m"):
        EmbeddingIndex(10, kind="ivfpq", pq_m=3)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("faiss", marks=needs_faiss)])
def test_load_rejects_nan_vectors_and_a_kind_its_file_is_not(tmp_path, backend):
    """Issue #25: a tampered index (checksums made to match) holding NaN vectors, or whose
    manifest says hnsw over a flat faiss file, is a FileFormatError at load, not a 500 at
    the first search."""
    from tripletlab.utils import sha256_file

    rng = np.random.default_rng(0)
    idx = EmbeddingIndex(4, metric="euclidean", backend=backend)
    idx.add(rng.normal(size=(5, 4)).astype(np.float32), labels=np.arange(5))
    d = tmp_path / "idx"
    idx.save(d)
    man = json.loads((d / "manifest.json").read_text())
    if backend == "numpy":
        v = np.load(d / "vectors.npy")
        v[2, 1] = np.nan
        np.save(d / "vectors.npy", v)
        man["files"]["vectors.npy"] = sha256_file(d / "vectors.npy")
        (d / "manifest.json").write_text(json.dumps(man))
        with pytest.raises(FileFormatError, match="NaN or infinite"):
            EmbeddingIndex.load(d)
    else:
        man["kind"] = "hnsw"
        (d / "manifest.json").write_text(json.dumps(man))
        with pytest.raises(FileFormatError, match="not a 'hnsw' index"):
            EmbeddingIndex.load(d)
