"""`tripletlab serve` as a real process on 127.0.0.1, with real AT&T photos; ONNX export.

A tiny model is trained on AT&T s1-s30 in a fixture (30 steps at 28x23, a few seconds); the
gallery holds 7 photos of each of s31-s40 and queries use their other 3. Skipped with a reason
where the data, FastAPI or onnxruntime are absent. The load test here is smaller than the one in
docs/serving.md (16 clients x 10 searches instead of x 50) to keep CI short.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tripletlab
from tripletlab.cli import main

from conftest import shared_data

httpx = pytest.importorskip("httpx", reason="needs the serve extra (httpx)")
pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'tripletlab[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'tripletlab[serve]'")

TOKEN, READ_TOKEN = "test-token-123", "read-only-456"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SRC = str(Path(tripletlab.__file__).resolve().parents[1])


def att_faces() -> Path:
    return shared_data("att_faces")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m tripletlab serve ...` on a free loopback port; stopped by :meth:`stop`."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        e = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
        e.pop("TRIPLETLAB_TOKEN", None)
        e.update(env or {})
        cmd = [sys.executable, "-m", "tripletlab", "serve", *args, "--port", str(self.port)]
        self.proc = subprocess.Popen(
            cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=e, cwd=log.parent
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"server did not start in 120 s: {log.read_text()[-2000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None and httpx.get(self.url + "/healthz").status_code == 200

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)


def cli_json(args: list[str]):
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(args) == 0
    return json.loads(buf.getvalue())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A trained run, a gallery folder (s31-s40, photos 1-7), query photos and a CLI index."""
    att = att_faces()
    base = tmp_path_factory.mktemp("serve")
    run = base / "run"
    with redirect_stdout(io.StringIO()):
        rc = main(
            [
                "train",
                "--data",
                str(att),
                "--config",
                "att_faces",
                "--steps",
                "30",
                "--image-size",
                "28",
                "23",
                "--threads",
                "1",
                "--no-report",
                "--quiet",
                "--out",
                str(run),
            ]
        )
    assert rc == 0
    gallery, queries = base / "gallery", []
    for i in range(31, 41):
        (gallery / f"s{i}").mkdir(parents=True)
        for j in range(1, 8):
            shutil.copy(att / f"s{i}" / f"{j}.pgm", gallery / f"s{i}" / f"{j}.pgm")
        queries += [att / f"s{i}" / f"{j}.pgm" for j in (8, 9, 10)]
    index = base / "index"
    with redirect_stdout(io.StringIO()):
        assert (
            main(["index", "--model", str(run), "--data", str(gallery), "--out", str(index)]) == 0
        )
    return {"base": base, "run": run, "gallery": gallery, "queries": queries, "index": index}


@pytest.fixture(scope="module")
def server(env):
    live = env["base"] / "live-index"
    shutil.copytree(env["index"], live)
    s = Server(
        [
            "--model",
            str(env["run"]),
            "--index",
            str(live),
            "--threads",
            "1",
            "--max-upload-mb",
            "1",
        ],
        env["base"] / "server.log",
        env={"TRIPLETLAB_TOKEN": TOKEN, "TRIPLETLAB_READ_TOKEN": READ_TOKEN},
    )
    yield s
    s.stop()


def post_image(url: str, route: str, path: Path, headers=AUTH, **data) -> httpx.Response:
    files = {"image": (path.name, path.read_bytes())}
    return httpx.post(url + route, files=files, data=data, headers=headers, timeout=60)


# ------------------------------------------------------------------------- endpoints


def test_search_verify_identify_equal_the_cli(env, server):
    queries = env["queries"][::3]  # one photo of each person
    cli = cli_json(
        [
            "search",
            "--model",
            str(env["run"]),
            "--index",
            str(env["index"]),
            "-k",
            "5",
            "--json",
            *map(str, queries),
        ]
    )
    thr = json.loads((env["run"] / "eval.json").read_text())["threshold"]
    for q, expected in zip(queries, cli, strict=True):
        r = post_image(server.url, "/search", q, k=5)
        assert r.status_code == 200, r.text
        got = r.json()["neighbours"]
        assert [h["id"] for h in got] == [h["id"] for h in expected["neighbours"]]
        assert [h["label"] for h in got] == [h["label"] for h in expected["neighbours"]]
        assert [h["path"] for h in got] == [h["path"] for h in expected["neighbours"]]
        np.testing.assert_allclose(
            [h["distance"] for h in got],
            [h["distance"] for h in expected["neighbours"]],
            atol=1e-6,
        )
        assert all(h["match"] == (h["distance"] <= thr) for h in got)
        who = post_image(server.url, "/identify", q).json()
        best = got[0]
        assert who["id"] == best["id"] and who["known"] == (best["distance"] <= thr)
        assert who["label"] == (best["label"] if who["known"] else "unknown")
    # verify: same-person and different-person pairs, equal to `tripletlab verify`
    pairs = [(queries[0], env["queries"][1]), (queries[0], queries[1]), (queries[2], queries[5])]
    for a, b in pairs:
        expected = cli_json(["verify", "--model", str(env["run"]), str(a), str(b), "--json"])
        files = {"image_a": (a.name, a.read_bytes()), "image_b": (b.name, b.read_bytes())}
        r = httpx.post(server.url + "/verify", files=files, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        v = r.json()
        assert v["threshold"] == pytest.approx(expected["threshold"])
        assert v["distance"] == pytest.approx(expected["pairs"][0]["distance"], abs=1e-6)
        assert v["same"] == expected["pairs"][0]["same"]
        assert v["metric"] == expected["distance"]
        ver = json.loads((env["run"] / "eval.json").read_text())["verification"]
        assert v["far"] == ver["far_at_threshold"] and 0 <= v["far"] < 1


def test_embed_equals_cli_embed(env, server, tmp_path):
    folder = tmp_path / "q" / "s31"
    folder.mkdir(parents=True)
    picks = env["queries"][:3]
    for p in picks:
        shutil.copy(p, folder / p.name)
    with redirect_stdout(io.StringIO()):
        assert (
            main(
                [
                    "embed",
                    "--model",
                    str(env["run"]),
                    "--data",
                    str(folder.parent),
                    "--out",
                    str(tmp_path / "e.npz"),
                ]
            )
            == 0
        )
    ref = np.load(tmp_path / "e.npz")
    order = [Path(p).name for p in ref["paths"]]
    files = [("images", (n, (folder / n).read_bytes())) for n in order]
    r = httpx.post(server.url + "/embed", files=files, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.asarray(r.json()["embeddings"]), ref["embeddings"], atol=1e-5)
    # an image model takes images, not vectors
    r = httpx.post(server.url + "/embed", json={"vectors": [[0.5] * 644]}, headers=AUTH)
    assert r.status_code == 422 and "takes images" in r.json()["error"]["message"]


def test_gallery_enrol_list_thumbnail_delete(env, server):
    from tripletlab.index import EmbeddingIndex

    before = httpx.get(server.url + "/gallery", headers=AUTH).json()
    assert before["count"] == 70 and before["labels"]["s31"] == 7
    new = [env["queries"][0], env["queries"][1]]  # s31's photos 8 and 9
    files = [("images", (p.name, p.read_bytes())) for p in new]
    r = httpx.post(server.url + "/gallery", files=files, data={"label": "alice"}, headers=AUTH)
    assert r.status_code == 201, r.text
    ids = r.json()["ids"]
    assert len(ids) == 2 and r.json()["gallery_size"] == 72
    listing = httpx.get(server.url + "/gallery", params={"limit": 1000}, headers=AUTH).json()
    assert listing["labels"]["alice"] == 2
    assert {it["id"] for it in listing["items"] if it["label"] == "alice"} == set(ids)
    # the index on disk verifies and the CLI finds the enrolled photo first
    live = env["base"] / "live-index"
    assert len(EmbeddingIndex.load(live)) == 72
    hit = cli_json(
        [
            "search",
            "--model",
            str(env["run"]),
            "--index",
            str(live),
            "-k",
            "1",
            "--json",
            str(new[0]),
        ]
    )[0]["neighbours"][0]
    assert hit["id"] == ids[0] and hit["label"] == "alice" and hit["distance"] < 1e-5
    # thumbnails are PNGs (of PGM files from `tripletlab index` and of uploads alike)
    for i in (0, ids[0]):
        t = httpx.get(f"{server.url}/gallery/{i}/image", headers=AUTH)
        assert t.status_code == 200 and t.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(t.content)).size[0] > 10
    for i in ids:
        assert httpx.delete(f"{server.url}/gallery/{i}", headers=AUTH).json()["deleted"] == i
    gone = httpx.delete(f"{server.url}/gallery/{ids[0]}", headers=AUTH)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    assert len(EmbeddingIndex.load(live)) == 70


# ------------------------------------------------------------------------- bad requests


def png_bomb(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of side x side black pixels (compresses to a few tens of KB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" * (1 + side // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def chunked_file_upload(mb: int = 3):
    """A multipart body streamed in chunks (no Content-Length): one file part of ``mb`` MB."""
    yield (
        b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n"
    )
    for _ in range(mb * 16):
        yield b"\x00" * 65536
    yield b"\r\n--xyz--\r\n"


def test_bad_requests_get_4xx_json_and_the_server_stays_up(env, server):
    q = env["queries"][0]
    good = q.read_bytes()
    buf = io.BytesIO()
    Image.open(q).save(buf, "PNG")
    png = buf.getvalue()
    bomb = png_bomb()
    assert len(bomb) < 100_000
    assert struct.unpack(">II", bomb[16:24]) == (20000, 20000)  # IHDR width, height
    u = server.url
    cases = {
        "not an image": lambda: httpx.post(
            u + "/search", files={"image": ("a.png", b"hello")}, headers=AUTH
        ),
        "truncated image": lambda: httpx.post(
            u + "/search", files={"image": ("t.png", png[: len(png) // 2])}, headers=AUTH
        ),
        "empty file": lambda: httpx.post(
            u + "/search", files={"image": ("e.png", b"")}, headers=AUTH
        ),
        "decompression bomb": lambda: httpx.post(
            u + "/search", files={"image": ("b.png", bomb)}, headers=AUTH
        ),
        "above the size limit": lambda: httpx.post(
            u + "/search", files={"image": ("big.png", os.urandom(1_500_000))}, headers=AUTH
        ),
        "chunked upload above the limit": lambda: httpx.post(
            u + "/search",
            content=chunked_file_upload(),
            headers={**AUTH, "content-type": "multipart/form-data; boundary=xyz"},
        ),
        "k not an integer": lambda: httpx.post(
            u + "/search", files={"image": ("q.pgm", good)}, data={"k": "five"}, headers=AUTH
        ),
        "image sent as text": lambda: httpx.post(
            u + "/search", data={"image": "x", "k": "3"}, headers=AUTH
        ),
        "k = 0": lambda: post_image(u, "/search", q, k=0),
        "k < 0": lambda: post_image(u, "/search", q, k=-3),
        "k huge": lambda: post_image(u, "/search", q, k=10**9),
        "k overflow": lambda: post_image(u, "/search", q, k="9" * 40),
        "verify with one image": lambda: httpx.post(
            u + "/verify", files={"image_a": ("a.pgm", good)}, headers=AUTH
        ),
        "vectors of the wrong shape": lambda: httpx.post(
            u + "/embed", json={"vectors": [[1.0, 2.0]]}, headers=AUTH
        ),
        "vectors not numbers": lambda: httpx.post(
            u + "/embed", json={"vectors": [["a"]]}, headers=AUTH
        ),
        "embed as plain text": lambda: httpx.post(u + "/embed", content=b"x", headers=AUTH),
        # no label is allowed since #24 (the file name is the id); a blank one is not
        "label blank": lambda: httpx.post(
            u + "/gallery", data={"label": " "}, files={"images": ("a.pgm", good)}, headers=AUTH
        ),
        "delete a non-integer id": lambda: httpx.delete(u + "/gallery/abc", headers=AUTH),
        "missing token": lambda: post_image(u, "/search", q, headers={}),
        "wrong token": lambda: post_image(u, "/search", q, headers={"Authorization": "Bearer x"}),
        "missing token on a write": lambda: httpx.post(
            u + "/gallery", files={"images": ("a.pgm", good)}, data={"label": "x"}
        ),
        "read-only token on a write route": lambda: httpx.post(
            u + "/gallery",
            files={"images": ("a.pgm", good)},
            data={"label": "x"},
            headers={"Authorization": f"Bearer {READ_TOKEN}"},
        ),
        "read-only token on delete": lambda: httpx.delete(
            u + "/gallery/0", headers={"Authorization": f"Bearer {READ_TOKEN}"}
        ),
        "unknown route": lambda: httpx.get(u + "/nope", headers=AUTH),
    }
    expected = {
        "decompression bomb": 413,
        "above the size limit": 413,
        "chunked upload above the limit": 413,
        "missing token": 401,
        "wrong token": 401,
        "missing token on a write": 401,
        "read-only token on a write route": 403,
        "read-only token on delete": 403,
        "unknown route": 404,
        "embed as plain text": 415,
        "not an image": 400,
        "truncated image": 400,
        "empty file": 400,
    }
    for name, call in cases.items():
        r = call()
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
        assert r.status_code == expected.get(name, 422), (name, r.status_code, r.text[:300])
        body = r.json()
        assert set(body["error"]) >= {"code", "message"} and body["error"]["message"], name
        assert server.alive(), name
    # the read-only token may read; the server still answers normally
    ok = post_image(u, "/search", q, headers={"Authorization": f"Bearer {READ_TOKEN}"}, k=3)
    assert ok.status_code == 200 and len(ok.json()["neighbours"]) == 3
    assert httpx.get(u + "/healthz").json()["status"] == "ok"  # no token needed
    m = httpx.get(u + "/metrics", headers=AUTH).json()
    assert m["routes"]["POST /search"]["by_status"]["413"] >= 2
    assert m["routes"]["POST /search"]["requests"] >= 10


def raw_post(url: str, headers: dict, body_chunks, timeout: float = 30.0) -> tuple[int, dict]:
    """POST over a raw socket: send the headers and *every* body byte, then read the answer.
    A server that answers early and closes with the body unread makes the kernel reset the
    connection (ECONNRESET / EPIPE here), which is what a real client sees."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(f"POST /search HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode())
        for chunk in body_chunks:
            sock.sendall(chunk)
        data = b""
        while got := sock.recv(65536):  # the answer says "connection: close"
            data += got
    head, _, payload = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        out = b""
        while payload:
            size, _, rest = payload.partition(b"\r\n")
            out, payload = out + rest[: int(size, 16)], rest[int(size, 16) + 2 :]
        payload = out
    return int(head.split(b" ", 2)[1]), json.loads(payload)


@pytest.mark.parametrize("case", ["content-length", "chunked", "no token"])
def test_an_early_answer_reaches_a_client_still_uploading(server, case):
    """A 413 or 401 sent before the body is read: the server reads (and drops) the rest of the
    upload first, bounded, so the client gets its answer instead of a connection reset (the
    kernel resets a socket closed with unread data). Found as an intermittent CI failure."""
    mb8 = [b"\x00" * 65536] * 128  # 8 MB: more than the loopback socket buffers hold
    part = (
        b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n"
    )
    body = [part, *mb8, b"\r\n--xyz--\r\n"]
    size = sum(len(c) for c in body)
    headers = {"Content-Type": "multipart/form-data; boundary=xyz", **AUTH}
    if case == "chunked":
        headers["Transfer-Encoding"] = "chunked"
        body = [b"%x\r\n%s\r\n" % (len(c), c) for c in body] + [b"0\r\n\r\n"]
    else:
        headers["Content-Length"] = str(size)
    if case == "no token":
        del headers["Authorization"]
    for _ in range(3):
        status, answer = raw_post(server.url, headers, body)
        assert status == (401 if case == "no token" else 413), answer
        assert answer["error"]["message"]
    assert server.alive()


# ------------------------------------------------------------------------- load, onnx


def test_load_16_clients_torch_and_onnx(env, server):
    from tripletlab.serve.loadtest import run_load

    pytest.importorskip("onnxruntime", reason="needs onnxruntime (serve extra)")
    images = env["queries"]
    torch_r = run_load(server.url, images, clients=16, requests=10, token=TOKEN, timeout_s=60)
    assert torch_r["errors"] == 0, torch_r["first_errors"]
    assert torch_r["n"] == 160 and torch_r["wall_s"] < 90
    m = httpx.get(server.url + "/metrics", headers=AUTH).json()
    assert m["batching"]["mean_batch"] > 1  # concurrent requests shared model calls
    onnx = Server(
        [
            "--model",
            str(env["run"]),
            "--index",
            str(env["index"]),
            "--runtime",
            "onnx",
            "--threads",
            "1",
        ],
        env["base"] / "server-onnx.log",
    )
    try:
        onnx_r = run_load(onnx.url, images, clients=16, requests=10, timeout_s=60)
        assert onnx_r["errors"] == 0, onnx_r["first_errors"]
        q = env["queries"][4]
        a = post_image(server.url, "/search", q, k=5).json()["neighbours"]
        b = post_image(onnx.url, "/search", q, headers={}, k=5).json()["neighbours"]
        assert [h["id"] for h in a] == [h["id"] for h in b]
        np.testing.assert_allclose(
            [h["distance"] for h in a], [h["distance"] for h in b], atol=1e-4
        )
        info = httpx.get(onnx.url + "/info").json()
        assert info["runtime"] == "onnx"
    finally:
        onnx.stop()
    print(f"\nload (16 clients x 10): torch {torch_r}\nonnx {onnx_r}")


def test_onnx_export_matches_torch_on_real_images(env, tmp_path):
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (serve extra)")
    from tripletlab.errors import InputError
    from tripletlab.inference.onnx import OnnxInference, compare_onnx, read_onnx_metadata

    out = tmp_path / "model.onnx"
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(
            [
                "export",
                "--model",
                str(env["run"]),
                "--format",
                "onnx",
                "--out",
                str(out),
                "--check-data",
                str(env["gallery"]),
                "--json",
            ]
        )
    assert rc == 0, buf.getvalue()
    check = json.loads(buf.getvalue().split("\n", 1)[1])
    assert check["ok"] and check["max_abs_diff"] <= 1e-4 and check["n_images"] >= 60
    assert set(check["latency_ms"]) == {"1", "32"}
    meta = read_onnx_metadata(out)
    assert meta["input_shape"] == [1, 28, 23] and meta["distance"] == "cosine"
    assert meta["preprocessing"]["color"] == "L" and meta["preprocessing"]["resize"] == [28, 23]
    assert meta["threshold"] == pytest.approx(
        json.loads((env["run"] / "eval.json").read_text())["threshold"]
    )
    # dynamic batch: 1 and 30 images in one call, every query photo
    r = compare_onnx(
        env["run"], out, [str(p) for p in env["queries"]], repeats=2, batch_sizes=(1, 30)
    )
    assert r["n_images"] == 30 and r["max_abs_diff"] <= 1e-4
    # an ONNX file from another run is refused
    other = tmp_path / "other"
    shutil.copytree(env["run"], other)
    w = other / "model.safetensors"
    from safetensors.torch import load_file, save_file

    t = load_file(str(w))
    k0 = next(iter(t))
    t[k0] = t[k0] + 1
    save_file(t, str(w))
    with pytest.raises(InputError, match="fingerprints differ"):
        OnnxInference.from_run_and_onnx(other, out)


# ------------------------------------------------------------------------- durability


def test_enrolments_survive_sigkill(env, tmp_path):
    from tripletlab.index import EmbeddingIndex

    gal = tmp_path / "gallery"
    args = ["--model", str(env["run"]), "--index", str(gal), "--threads", "1"]
    s = Server(args, tmp_path / "server.log", env={"TRIPLETLAB_TOKEN": TOKEN})
    photos = sorted(env["gallery"].rglob("*.pgm"))
    ok: dict[int, str] = {}
    answered = 0

    def enrol(i: int):
        p = photos[i % len(photos)]
        label = f"{p.parent.name}-{i}"
        r = httpx.post(
            s.url + "/gallery",
            files={"images": (p.name, p.read_bytes())},
            data={"label": label},
            headers=AUTH,
            timeout=60,
        )
        return label, r

    try:
        with cf.ThreadPoolExecutor(16) as pool:
            futs = [pool.submit(enrol, i) for i in range(200)]
            for f in cf.as_completed(futs):
                try:
                    label, r = f.result()
                except httpx.HTTPError:
                    continue  # in flight when the server died: no 2xx, no promise
                answered += 1
                if r.status_code == 201:
                    (ok[r.json()["ids"][0]],) = [label]
                if answered == 120:
                    s.proc.kill()  # SIGKILL while the other enrolments are in flight
                    s.proc.wait(15)
        assert s.proc.returncode == -9
        assert len(ok) >= 100
        idx = EmbeddingIndex.load(gal)  # checksums verify
        classes = idx.classes
        stored = {int(i): classes[int(lab)] for i, lab in zip(idx.ids, idx.labels, strict=True)}
        assert all(stored.get(i) == label for i, label in ok.items())
        assert len(set(stored.values())) == len(stored)  # no enrolment stored twice
        s2 = Server(args, tmp_path / "server2.log", env={"TRIPLETLAB_TOKEN": TOKEN})
        try:
            listing = httpx.get(s2.url + "/gallery", params={"limit": 1000}, headers=AUTH).json()
            assert listing["count"] == len(stored) >= len(ok)
            assert {it["id"] for it in listing["items"]} >= set(ok)
            more = httpx.post(
                s2.url + "/gallery",
                data={"label": "after"},
                headers=AUTH,
                files={"images": (photos[0].name, photos[0].read_bytes())},
            )
            assert more.status_code == 201 and more.json()["ids"][0] not in ok
        finally:
            s2.stop()
    finally:
        s.stop()


# ------------------------------------------------------------------------- the page


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]


def test_page_in_headless_chromium_on_a_phone_sized_window(env, server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (dev extra)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    drv = shutil.which("chromedriver")
    if exe is None or drv is None:
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for f in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=390,844"]:
        opts.add_argument(f)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=drv))
    driver.set_page_load_timeout(60)
    wait = WebDriverWait(driver, 60)
    enrolled: list[int] = []
    try:
        driver.get(server.url + "/")
        driver.execute_script("localStorage.setItem('tripletlab-token', arguments[0])", TOKEN)
        driver.refresh()
        wait.until(lambda d: "gallery 70" in d.find_element(By.ID, "model-info").text)
        # search: pick a query photo; five result cards with thumbnails, green or red
        inp = driver.find_element(By.ID, "search-file")
        driver.execute_script("arguments[0].hidden = false", inp)
        inp.send_keys(str(env["queries"][0]))
        wait.until(lambda d: d.find_element(By.ID, "results").get_attribute("data-state") == "done")
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .result")
        assert len(cards) == 5
        expected = post_image(server.url, "/search", env["queries"][0], k=5).json()["neighbours"]
        assert [int(c.get_attribute("data-id")) for c in cards] == [h["id"] for h in expected]
        for c, h in zip(cards, expected, strict=True):
            assert ("nomatch" if not h["match"] else "match") in c.get_attribute("class").split()
            assert h["label"] in c.text
        wait.until(
            lambda d: all(
                d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                for i in d.find_elements(By.CSS_SELECTOR, "#results img")
            )
        )
        assert driver.find_element(By.ID, "identify").text.strip()
        driver.execute_script("arguments[0].hidden = true", inp)
        png = driver.get_screenshot_as_png()
        if os.environ.get("TRIPLETLAB_SCREENSHOT"):  # docs/serve-page.png is made this way
            Path(os.environ["TRIPLETLAB_SCREENSHOT"]).write_bytes(png)
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
        assert pixels.std() > 20  # not a blank page
        assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 50  # photos, not just text
        # verify two photos of the same person
        driver.find_element(By.ID, "verify-a").send_keys(str(env["queries"][0]))
        driver.find_element(By.ID, "verify-b").send_keys(str(env["queries"][1]))
        driver.find_element(By.ID, "verify-btn").click()
        wait.until(lambda d: "distance" in d.find_element(By.ID, "verify-result").text)
        assert driver.find_element(By.ID, "verify-result").text.split()[0] in ("SAME", "DIFFERENT")
        # enrol a photo under a label
        driver.find_element(By.ID, "enrol-files").send_keys(str(env["queries"][2]))
        driver.find_element(By.ID, "enrol-label").send_keys("browser-enrolled")
        driver.find_element(By.ID, "enrol-btn").click()
        wait.until(lambda d: "enrolled 1 image" in d.find_element(By.ID, "enrol-result").text)
        listing = httpx.get(server.url + "/gallery", params={"limit": 1000}, headers=AUTH).json()
        enrolled = [it["id"] for it in listing["items"] if it["label"] == "browser-enrolled"]
        assert len(enrolled) == 1
        # usable at phone width: nothing wider than the window
        width = driver.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]"
        )
        assert width[0] <= width[1], width
    finally:
        driver.quit()
        for i in enrolled:
            httpx.delete(f"{server.url}/gallery/{i}", headers=AUTH)
