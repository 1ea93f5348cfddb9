"""Pieces of `tripletlab.serve` without a server process or real data: the gallery's atomic
swap and its recovery, the batching queue, safe image decoding, the app in-process."""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from contextlib import redirect_stdout

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'tripletlab[serve]'")
pytest.importorskip("httpx", reason="needs the serve extra (httpx)")

from tripletlab.cli import main  # noqa: E402
from tripletlab.errors import InputError  # noqa: E402
from tripletlab.index import EmbeddingIndex  # noqa: E402
from tripletlab.serve.batching import BatchQueue  # noqa: E402
from tripletlab.serve.gallery import Enrolment, GalleryStore  # noqa: E402
from tripletlab.serve.images import ImageRejected, decode_image  # noqa: E402

from conftest import make_image_folder  # noqa: E402


def vec(*v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


def test_gallery_persists_and_recovers_an_interrupted_swap(tmp_path):
    d = tmp_path / "gal"
    s = GalleryStore(d, dim=2, metric="cosine", fingerprint="fp")
    assert s.apply([Enrolment(vec(1, 0), "a", b"x", "png"), Enrolment(vec(0, 1), "b")]) == [0, 1]
    assert (tmp_path / "gal.images").is_dir()
    assert len(EmbeddingIndex.load(d, expected_fingerprint="fp")) == 2
    # a crash between the two renames: NAME is gone, .NAME.old is complete, .NAME.new partial
    s.close()  # one store per index directory at a time (its lock)
    os.rename(d, tmp_path / ".gal.old")
    (tmp_path / ".gal.new").mkdir()
    (tmp_path / ".gal.new" / "ids.npy").write_bytes(b"partial")
    s2 = GalleryStore(d, dim=2, metric="cosine", fingerprint="fp")
    assert len(s2) == 2 and sorted(os.listdir(tmp_path)) == [".gal.lock", "gal", "gal.images"]
    assert s2.describe([1]) == [{"id": 1, "label": "b", "path": ""}]
    # deletions, unknown ids, and a new id after the largest
    r = s2.apply([0, 7, Enrolment(vec(1, 1), "c")])
    assert r[0] is True and isinstance(r[1], KeyError) and r[2] == 2
    assert sorted(EmbeddingIndex.load(d).ids.tolist()) == [1, 2]
    # ids are never reused, also across restarts, even after deleting the largest
    assert s2.apply([2]) == [True]
    s2.close()
    s3 = GalleryStore(d, dim=2, metric="cosine", fingerprint="fp")
    assert s3.apply([Enrolment(vec(1, 1), "d")]) == [3]
    s3.close()
    with pytest.raises(InputError, match="another model"):
        GalleryStore(d, dim=2, metric="cosine", fingerprint="other")
    with pytest.raises(InputError, match="dimension"):
        GalleryStore(d, dim=3, metric="cosine", fingerprint="fp")


def test_gallery_refuses_a_directory_that_is_not_an_index(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not an index directory"):
        GalleryStore(tmp_path / "photos", dim=2, metric="cosine", fingerprint="fp")
    assert (tmp_path / "photos" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    s = GalleryStore(tmp_path / "empty", dim=2, metric="cosine", fingerprint="fp")
    s.apply([Enrolment(vec(1, 0), "a")])
    assert len(EmbeddingIndex.load(tmp_path / "empty")) == 1


def test_gallery_failed_persist_reloads_from_disk(tmp_path, monkeypatch):
    d = tmp_path / "gal"
    s = GalleryStore(d, dim=2, metric="euclidean", fingerprint="fp")
    s.apply([Enrolment(vec(1, 0), "a")])

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(EmbeddingIndex, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        s.apply([Enrolment(vec(0, 1), "b")])
    assert len(s) == 1  # memory matches the disk again


def test_batch_queue_joins_concurrent_jobs_and_keeps_their_rows():
    calls = []

    def double(rows):
        calls.append(len(rows))
        time.sleep(0.01)
        return np.stack(rows) * 2

    q = BatchQueue({"vectors": double}, max_batch=16, max_wait_s=0.005)
    q.start()

    async def many():
        jobs = [q.submit("vectors", [np.full(2, i, np.float32)]) for i in range(40)]
        return await asyncio.gather(*jobs)

    try:
        out = asyncio.run(many())
    finally:
        q.stop()
    assert [float(o[0, 0]) for o in out] == [2.0 * i for i in range(40)]
    assert sum(calls) == 40 and len(calls) < 40 and max(calls) <= 16

    def fail(rows):
        raise ValueError("bad batch")

    q2 = BatchQueue({"x": fail})
    q2.start()
    try:
        with pytest.raises(ValueError, match="bad batch"):
            asyncio.run(q2.submit("x", [1]))
    finally:
        q2.stop()
    assert not any(t.name == "tripletlab-batcher" for t in threading.enumerate())


def test_decode_image_limits():
    buf = io.BytesIO()
    Image.new("L", (64, 48), 128).save(buf, "PNG")
    png = buf.getvalue()
    assert decode_image(png, max_pixels=64 * 48).size == (64, 48)
    with pytest.raises(ImageRejected) as e:
        decode_image(png, max_pixels=64 * 48 - 1)
    assert e.value.status == 413
    for bad in (b"", b"not an image", png[:40]):
        with pytest.raises(ImageRejected) as e:
            decode_image(bad, max_pixels=10**6)
        assert e.value.status == 400
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    with pytest.raises(ImageRejected):  # formats outside the allow-list are refused
        decode_image(eps, max_pixels=10**6)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    data = make_image_folder(base / "imgs", n_classes=6, per_class=6, size=(16, 12))
    run = base / "run"
    with redirect_stdout(io.StringIO()):
        rc = main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(run),
                "--steps",
                "5",
                "--p",
                "3",
                "--k",
                "3",
                "--test-classes",
                "class4,class5",
                "--embedding-dim",
                "8",
                "--quiet",
                "--no-report",
                "--threads",
                "1",
            ]
        )
    assert rc == 0
    return run, data


def test_app_in_process_with_an_in_memory_gallery(tiny_run):
    from fastapi.testclient import TestClient

    from tripletlab.serve import ServeSettings, create_app

    run, data = tiny_run
    with pytest.raises(InputError, match="read-only token needs"):
        create_app(run, settings=ServeSettings(read_token="r"))
    with pytest.raises(InputError, match="max_k"):
        create_app(run, settings=ServeSettings(max_k=0))
    app = create_app(run, settings=ServeSettings(max_k=3))
    img = sorted((data / "class0").glob("*.png"))[0].read_bytes()
    with TestClient(app) as c:
        page = c.get("/")
        assert "<title>tripletlab</title>" in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        for ref in ('src="http', 'href="http', "url(http", "import "):
            assert ref not in page.text  # nothing loaded from elsewhere
        assert c.get("/info").json()["gallery_size"] == 0
        r = c.post("/search", files={"image": ("q.png", img)})
        assert r.status_code == 409 and "empty" in r.json()["error"]["message"]
        assert c.post("/identify", files={"image": ("q.png", img)}).json()["label"] == "unknown"
        r = c.post("/gallery", files={"images": ("q.png", img)}, data={"label": "zero"})
        assert r.status_code == 201 and r.json()["ids"] == [0]
        hit = c.post("/search", files={"image": ("q.png", img)}, data={"k": 3}).json()
        assert hit["neighbours"][0]["label"] == "zero" and hit["neighbours"][0]["distance"] < 1e-5
        assert c.post("/search", files={"image": ("q.png", img)}, data={"k": 4}).status_code == 422
        assert c.get("/gallery/0/image").headers["content-type"] == "image/png"
        schema = c.get("/openapi.json").json()
        assert {"/search", "/verify", "/identify", "/embed", "/gallery", "/healthz"} <= set(
            schema["paths"]
        )


def test_app_searches_with_the_post_processing_and_refuses_another_gallery(tiny_run, tmp_path):
    """/search and /identify use the run's post-processing (here a given DBA); a gallery
    directory built with another one is refused at start-up."""
    from fastapi.testclient import TestClient

    from tripletlab.serve import create_app

    run, data = tiny_run
    gallery = tmp_path / "gallery"
    app = create_app(run, index=gallery, postprocess="dba:k=2")
    imgs = sorted((data / "class0").glob("*.png"))[:3] + sorted((data / "class1").glob("*.png"))[:3]
    with TestClient(app) as c:
        for i, f in enumerate(imgs):
            label = "zero" if i < 3 else "one"
            r = c.post(
                "/gallery", files={"images": ("g.png", f.read_bytes())}, data={"label": label}
            )
            assert r.status_code == 201
        hit = c.post("/search", files={"image": ("q.png", imgs[0].read_bytes())},
                     data={"k": 3}).json()  # fmt: skip
        assert (
            c.post("/identify", files={"image": ("q.png", imgs[0].read_bytes())}).status_code == 200
        )
    store = app.state.store
    assert str(store.index.postprocess) == "dba:k=2,alpha=3.0"
    # the answer is that of the library's DBA over the stored raw gallery
    from tripletlab.inference import Inference
    from tripletlab.metrics import apply_postprocess

    inf = Inference.from_run(run)
    q = inf.embed_files([imgs[0]])
    ref_d, _ = apply_postprocess("dba:k=2", q, store.index._raw, k=3, distance=inf.distance)
    got_d = [h["distance"] for h in hit["neighbours"]]
    assert got_d == pytest.approx(ref_d[0].tolist(), abs=1e-5)  # ids may swap on exact ties
    store.close()
    with pytest.raises(InputError, match="built with post-processing 'dba:k=2,alpha=3.0'"):
        create_app(run, index=gallery, postprocess="none")


def test_vector_model_export_and_embed_vectors(tmp_path):
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (serve extra)")
    from fastapi.testclient import TestClient

    from tripletlab.inference import Inference
    from tripletlab.inference.onnx import OnnxInference, export_onnx, read_onnx_metadata
    from tripletlab.serve import create_app
    from tripletlab.serve import engine as serve_engine

    assert serve_engine.OnnxInference is OnnxInference  # the server's name for it still works

    run = tmp_path / "digits"
    with redirect_stdout(io.StringIO()):
        assert main(["train", "--steps", "5", "--out", str(run), "--quiet", "--no-report"]) == 0
    out = export_onnx(run, tmp_path / "digits.onnx")
    meta = read_onnx_metadata(out)
    assert meta["input_shape"] == [64] and meta["preprocessing"]["dtype"] == "float32"
    x = np.random.default_rng(0).random((7, 64)).astype(np.float32) * 16
    ref = Inference.from_run(run).embed_vectors(x)
    onnx = OnnxInference.from_run_and_onnx(run, out)
    np.testing.assert_allclose(onnx.embed_vectors(x), ref, atol=1e-4)
    with TestClient(create_app(run)) as c:
        r = c.post("/embed", json={"vectors": x.tolist()})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.asarray(r.json()["embeddings"]), ref, atol=1e-5)
        img = io.BytesIO()
        Image.new("L", (8, 8)).save(img, "PNG")
        r = c.post("/embed", files={"images": ("a.png", img.getvalue())})
        assert r.status_code == 422 and "vectors" in r.json()["error"]["message"]


def test_inference_does_not_import_the_server():
    """Layering: inference (ONNX export, runtime and comparison included) sits below the
    server; no module of it imports tripletlab.serve, not even inside a function."""
    import ast
    from pathlib import Path

    import tripletlab.inference

    found = []
    for path in sorted(Path(tripletlab.inference.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):  # "..serve" is tripletlab.serve from here
                module = node.module or ""
                relative = node.level == 2 and (
                    module.startswith("serve") or any(a.name == "serve" for a in node.names)
                )
                if relative or module.startswith("tripletlab.serve"):
                    found.append(f"{path.name}:{node.lineno}")
            elif isinstance(node, ast.Import):
                if any(a.name.startswith("tripletlab.serve") for a in node.names):
                    found.append(f"{path.name}:{node.lineno}")
    assert found == []


def test_batch_queue_isolates_a_failing_item_to_its_own_job():
    """Issue #25 row 1: a batch whose model call fails is retried job by job, so only the
    job holding the bad item gets the error."""

    def embed(rows):
        if any(r[0] < 0 for r in rows):
            raise ValueError("bad row")
        time.sleep(0.01)
        return np.stack(rows)

    q = BatchQueue({"vectors": embed}, max_batch=64, max_wait_s=0.02)
    q.start()

    async def many():
        jobs = [q.submit("vectors", [np.full(2, -1.0 if i == 3 else i, np.float32)])
                for i in range(12)]  # fmt: skip
        return await asyncio.gather(*jobs, return_exceptions=True)

    try:
        out = asyncio.run(many())
    finally:
        q.stop()
    assert isinstance(out[3], ValueError)
    assert all(np.array_equal(out[i], np.full((1, 2), i, np.float32)) for i in range(12) if i != 3)
    assert q.isolated >= 1


def test_pixel_budget_refuses_beyond_the_limit_and_releases():
    from tripletlab.serve.http import _RESERVED, PixelBudget

    b = PixelBudget(100)
    held: list = []
    token = _RESERVED.set(held)
    try:
        b.reserve(60)
        with pytest.raises(Exception) as e:
            b.reserve(50)
        assert getattr(e.value, "status_code", None) == 503
        b.reserve(40)
        assert b.in_use == 100 and held == [60, 40]
    finally:
        _RESERVED.reset(token)
    b.release(sum(held))
    assert b.in_use == 0 and b.refused == 1


def test_gallery_lock_and_rollback_of_a_failed_commit(tmp_path, monkeypatch):
    """Issue #25 rows 2 and 6: a second store on the same directory is refused; an id beyond
    int64 is that change's own KeyError; an unexpected error while persisting leaves
    nothing in memory that is not on disk."""
    d = tmp_path / "gal"
    s = GalleryStore(d, dim=2, metric="cosine", fingerprint="fp")
    with pytest.raises(InputError, match="in use by another process"):
        GalleryStore(d, dim=2, metric="cosine", fingerprint="fp")
    r = s.apply([Enrolment(vec(1, 0), "a"), 10**23, -5])
    assert r[0] == 0 and isinstance(r[1], KeyError) and isinstance(r[2], KeyError)

    def boom(*a, **k):
        raise OverflowError("unexpected")

    monkeypatch.setattr(EmbeddingIndex, "save", boom)
    with pytest.raises(OverflowError):
        s.apply([Enrolment(vec(0, 1), "b")])
    monkeypatch.undo()
    assert len(s) == 1
    assert s.apply([Enrolment(vec(1, 1), "c")]) == [2]  # the failed one is not stored later
    assert len(EmbeddingIndex.load(d)) == 2
    s.close()
    GalleryStore(d, dim=2, metric="cosine", fingerprint="fp").close()  # free again
