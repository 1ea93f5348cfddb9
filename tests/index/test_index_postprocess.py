"""Post-processing inside the index: the searched answers equal the library's
``apply_postprocess`` on the same gallery, stay so when the gallery changes, survive save/load,
and an index is never searched with another post-processing than its own."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tripletlab import FileFormatError, InputError
from tripletlab.index import HAVE_FAISS, EmbeddingIndex
from tripletlab.index import embedding_index as ei
from tripletlab.metrics import apply_postprocess

BACKENDS = ["numpy"] + (["faiss"] if HAVE_FAISS else [])
SPECS = ["dba:k=3,alpha=3", "aqe:k=2,alpha=1", "dba+aqe:k=3", "rerank:k1=6,k2=3,lambda=0.3"]


def _data(n=60, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, d))
    return (centres[np.arange(n) % 6] + 0.5 * rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("spec", SPECS)
def test_index_search_is_apply_postprocess(spec, metric, backend):
    g, q = _data(), _data(7, seed=1)
    index = EmbeddingIndex(8, metric=metric, backend=backend, postprocess=spec)
    index.add(g, ids=np.arange(100, 160))
    d, ids = index.search(q, 5)
    tq, tg = torch.from_numpy(q), torch.from_numpy(g)
    if spec.startswith("rerank"):  # one query at a time: the others never change its answer
        parts = [apply_postprocess(spec, tq[i : i + 1], tg, k=5, distance=metric) for i in range(7)]
        rd, ri = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    else:
        rd, ri = apply_postprocess(spec, tq, tg, k=5, distance=metric)
    assert (ids == ri.numpy() + 100).all()
    np.testing.assert_allclose(d, rd.numpy(), atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", ["dba:k=4", "dba+aqe:k=2", "aqe:k=3"])
def test_a_changed_gallery_stays_consistent(spec, backend):
    """Adding and removing items gives the index one built from the final gallery."""
    g, q = _data(), _data(5, seed=2)
    grown = EmbeddingIndex(8, backend=backend, postprocess=spec)
    grown.add(g[:30])
    grown.add(g[30:])
    assert grown.remove_ids(np.arange(10, 20)) == 10
    keep = np.r_[0:10, 20:60]
    fresh = EmbeddingIndex(8, backend=backend, postprocess=spec)
    fresh.add(g[keep], ids=keep)
    d1, i1 = grown.search(q, 6)
    d2, i2 = fresh.search(q, 6)
    assert (i1 == i2).all()
    np.testing.assert_allclose(d1, d2, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_keeps_the_postprocess(tmp_path, backend):
    g, q = _data(), _data(4, seed=3)
    index = EmbeddingIndex(8, backend=backend, postprocess="dba+aqe:k=3,alpha=2")
    index.add(g)
    index.save(tmp_path / "ix")
    man = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert man["postprocess"] == "dba+aqe:k=3,alpha=2.0" and "raw.npy" in man["files"]
    back = EmbeddingIndex.load(tmp_path / "ix")
    assert back.postprocess == index.postprocess
    assert (back.search(q, 5)[1] == index.search(q, 5)[1]).all()
    plain = EmbeddingIndex(8, backend=backend)
    plain.add(g)
    plain.save(tmp_path / "plain")
    assert "raw.npy" not in json.loads((tmp_path / "plain" / "manifest.json").read_text())["files"]
    assert str(EmbeddingIndex.load(tmp_path / "plain").postprocess) == "none"


def test_a_damaged_postprocess_manifest_or_raw_file_is_named(tmp_path):
    index = EmbeddingIndex(8, backend="numpy", postprocess="dba")
    index.add(_data())
    index.save(tmp_path / "ix")
    man_path = tmp_path / "ix" / "manifest.json"
    man = json.loads(man_path.read_text())
    man["postprocess"] = "magic:k=2"
    man_path.write_text(json.dumps(man))
    with pytest.raises(FileFormatError, match="magic"):
        EmbeddingIndex.load(tmp_path / "ix")
    index.save(tmp_path / "ix2")
    (tmp_path / "ix2" / "raw.npy").write_bytes(b"xx")
    with pytest.raises(FileFormatError, match="raw.npy"):
        EmbeddingIndex.load(tmp_path / "ix2")


def test_rerank_refuses_a_gallery_above_its_limit(monkeypatch):
    monkeypatch.setattr(ei, "RERANK_MAX_ITEMS", 50)
    index = EmbeddingIndex(8, backend="numpy", postprocess="rerank")
    index.add(_data())
    with pytest.raises(InputError, match="60 items .limit 50."):
        index.search(_data(2, seed=4), 3)


def test_rerank_answers_do_not_depend_on_the_other_queries():
    index = EmbeddingIndex(8, backend="numpy", postprocess="rerank:k1=6,k2=3")
    index.add(_data())
    q = _data(6, seed=5)
    _, together = index.search(q, 4)
    alone = np.vstack([index.search(q[i : i + 1], 4)[1] for i in range(6)])
    assert (together == alone).all()


def test_small_gallery_and_unknown_spec():
    index = EmbeddingIndex(8, backend="numpy", postprocess="dba+aqe:k=9")
    index.add(_data(3))
    d, i = index.search(_data(2, seed=6), 5)  # k clamped to the 3 items, no index error
    assert i.shape == (2, 3) and np.isfinite(d).all()
    with pytest.raises(InputError, match="unknown post-processing method 'blend'"):
        EmbeddingIndex(8, postprocess="blend")
