"""The attack of issue #25 against `tripletlab serve` and the CLI, as real processes on 127.0.0.1.

Each test reproduces one row of the attack table in docs/reliability.md (a tiny model trained
on a synthetic RGB folder in a module fixture, a few seconds). Loops and timeouts are bounded.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import os
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import free_port, make_folder, subprocess_env

httpx = pytest.importorskip("httpx", reason="needs the serve extra (httpx)")
pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'tripletlab[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'tripletlab[serve]'")

pytestmark = pytest.mark.slow  # ~4 min: a dozen server processes

TOKEN = "attack-token-1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def cli(*args: str, timeout: float = 180, env: dict | None = None, **kw):
    """`python -m tripletlab ARGS` as a child process (its CompletedProcess)."""
    e = subprocess_env()
    e.pop("TRIPLETLAB_TOKEN", None)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tripletlab", *args],
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


class Server:
    """`python -m tripletlab serve ARGS` on a free loopback port, stopped by :meth:`stop`."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        e = subprocess_env()
        e.pop("TRIPLETLAB_TOKEN", None)
        e.update(env or {})
        self.log = log
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

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def lab_tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("LAB", (8, 8)).save(buf, "TIFF")
    return buf.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("attack")
    make_folder(base / "faces", n_classes=4, per_class=6, size=(16, 16), rgb=True)
    r = cli(
        "train", "--data", str(base / "faces"), "--steps", "5", "--p", "2", "--k", "2",
        "--embedding-dim", "8", "--threads", "1", "--no-report", "--quiet",
        "--out", str(base / "run"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    good = sorted((base / "faces").rglob("*.png"))
    return {"base": base, "run": base / "run", "good": [p.read_bytes() for p in good]}


def serve(env, tmp_path, *extra: str, index: Path | None = None, log="server.log") -> Server:
    args = ["--model", str(env["run"]), "--threads", "1", "--threshold", "0.5", *extra]
    if index is not None:
        args += ["--index", str(index)]
    return Server(args, tmp_path / log, env={"TRIPLETLAB_TOKEN": TOKEN})


# ------------------------------------------------------------------------ 1. bad item


def test_one_bad_image_fails_only_its_own_request(env, tmp_path):
    """8 clients embed good images while 2 send a LAB TIFF (row 1): every good request 200,
    every TIFF 422 naming the mode, for ~3 s of concurrent traffic."""
    s = serve(env, tmp_path)
    bad = lab_tiff()
    try:
        stop = time.monotonic() + 3.0

        def client(i: int) -> Counter:
            out: Counter = Counter()
            with httpx.Client(headers=AUTH, timeout=30) as c:
                while time.monotonic() < stop:
                    data = bad if i < 2 else env["good"][i % len(env["good"])]
                    r = c.post(s.url + "/embed", files={"images": ("x.tif", data)})
                    ok = r.status_code == 422 and "mode LAB" in r.text if i < 2 else r.is_success
                    out[("bad" if i < 2 else "good", r.status_code, ok)] += 1
            return out

        with cf.ThreadPoolExecutor(10) as ex:
            counts = sum(ex.map(client, range(10)), Counter())
        good = {k: v for k, v in counts.items() if k[0] == "good"}
        bads = {k: v for k, v in counts.items() if k[0] == "bad"}
        assert set(good) == {("good", 200, True)}, counts
        assert set(bads) == {("bad", 422, True)}, counts
        assert sum(good.values()) >= 10 and sum(bads.values()) >= 2, counts
    finally:
        s.stop()


# ---------------------------------------------------------------- 2. one index, one server


def test_a_second_server_on_the_same_index_refuses_to_start(env, tmp_path):
    index = tmp_path / "gallery"
    a = serve(env, tmp_path, index=index, log="a.log")
    try:
        r = httpx.post(
            a.url + "/gallery", files={"images": ("a.png", env["good"][0])},
            data={"label": "x"}, headers=AUTH, timeout=30,
        )  # fmt: skip
        assert r.status_code == 201, r.text
        e = {"TRIPLETLAB_TOKEN": TOKEN}
        b = cli("serve", "--model", str(env["run"]), "--index", str(index), "--port",
                str(free_port()), env=e, timeout=120)  # fmt: skip
        assert b.returncode == 1, (b.returncode, b.stderr[-2000:])
        assert "in use by another process" in b.stderr and str(a.proc.pid) in b.stderr
        assert "Traceback" not in b.stderr
    finally:
        a.stop()
    # the lock went with the process: a new server opens the index and has the enrolment
    c = serve(env, tmp_path, index=index, log="c.log")
    try:
        assert httpx.get(c.url + "/gallery", headers=AUTH).json()["count"] == 1
    finally:
        c.stop()


# ------------------------------------------------------------------------ 3. pixel budget


def big_rgba_png(side: int = 4096) -> bytes:
    """A ~65 KB PNG declaring side x side RGBA pixels (zeros compress to nothing)."""
    raw = zlib.compress(b"".join(b"\x00" + bytes(4 * side) for _ in range(side)), 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        import struct

        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    import struct

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_request_pixel_budget_is_checked_before_decoding(env, tmp_path):
    """32 copies of a 4096x4096 RGBA PNG in one /embed (row 3): 413 from the headers, and the
    server's peak memory does not grow by the ~2 GB that decoding them would take."""
    big = big_rgba_png()
    assert len(big) < 100_000
    s = serve(env, tmp_path)
    try:
        before = s.peak_rss_mb()
        files = [("images", (f"{i}.png", big)) for i in range(32)]
        r = httpx.post(s.url + "/embed", files=files, headers=AUTH, timeout=60)
        assert r.status_code == 413, r.text
        assert "67,108,864 pixels per request" in r.json()["error"]["message"]
        assert s.peak_rss_mb() - before < 300, (before, s.peak_rss_mb())
        # a bomb's message names the limit in force, not Pillow's 2x
        bomb = big_rgba_png(20000)
        r = httpx.post(s.url + "/embed", files={"images": ("b.png", bomb)}, headers=AUTH)
        assert r.status_code == 413 and "16,777,216 pixels" in r.text, r.text
        ok = httpx.post(s.url + "/embed", files={"images": ("g.png", env["good"][0])}, headers=AUTH)
        assert ok.status_code == 200
    finally:
        s.stop()


# -------------------------------------------------------------------- 4. --out /dev/full


@pytest.mark.parametrize("command", ["export", "embed"])
def test_out_refuses_to_replace_a_device_or_fifo(env, tmp_path, command):
    """Row 4: `--out /dev/full` (and a FIFO): exit 1, a clear message, the target untouched."""
    pytest.importorskip("onnx", reason="export needs onnx")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for target in ("/dev/full", str(fifo)):
        args = ["--model", str(env["run"]), "--out", target]
        if command == "embed":
            args += ["--data", str(env["base"] / "faces")]
        r = cli(command, *args)
        assert r.returncode == 1, (target, r.stdout, r.stderr[-2000:])
        assert "not a regular file" in r.stderr and "Traceback" not in r.stderr
        assert "wrote" not in r.stdout
    assert Path("/dev/full").is_char_device() and fifo.is_fifo()


# ---------------------------------------------------------------------- 5. empty token


def test_empty_token_is_refused_at_start_up(env):
    """Row 5: `--token "$UNSET_VAR"` (and an empty $TRIPLETLAB_TOKEN) never means open."""
    port = str(free_port())
    for args, e in (
        (["--token", ""], {}),
        (["--token", "  "], {}),
        ([], {"TRIPLETLAB_TOKEN": ""}),
        (["--token", TOKEN, "--read-token", ""], {}),
    ):
        r = cli("serve", "--model", str(env["run"]), "--port", port, *args, env=e, timeout=60)
        assert r.returncode == 1, (args, e, r.stderr[-1000:])
        assert "is empty" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------- 6. ids and concurrent writes


def test_huge_ids_are_4xx_and_concurrent_writes_stay_consistent(env, tmp_path):
    """Row 6: DELETE of out-of-range ids while 8 clients enrol: no 5xx, and exactly the
    acknowledged enrolments are stored (also after a restart)."""
    index = tmp_path / "gallery"
    s = serve(env, tmp_path, index=index)
    huge = ["99999999999999999999999", str(2**63), "-1", "9223372036854775807", "1e30", "x"]
    try:
        for h in huge:
            r = httpx.delete(f"{s.url}/gallery/{h}", headers=AUTH)
            assert r.status_code in (404, 422), (h, r.status_code, r.text)
            r = httpx.get(f"{s.url}/gallery/{h}/image", headers=AUTH)
            assert r.status_code in (404, 422), (h, r.status_code, r.text)
        stop = time.monotonic() + 3.0

        def enrol(i: int) -> list:
            got = []
            with httpx.Client(headers=AUTH, timeout=30) as c:
                while time.monotonic() < stop:
                    if i == 0:
                        r = c.delete(f"{s.url}/gallery/{huge[len(got) % 2]}")
                        got.append((r.status_code, None))
                        continue
                    data = env["good"][(i + len(got)) % len(env["good"])]
                    r = c.post(s.url + "/gallery", files={"images": ("a.png", data)},
                               data={"label": f"p{i}"})  # fmt: skip
                    got.append((r.status_code, r.json().get("ids") if r.is_success else None))
            return got

        with cf.ThreadPoolExecutor(9) as ex:
            results = [x for part in ex.map(enrol, range(9)) for x in part]
        statuses = Counter(code for code, _ in results)
        assert all(code < 500 for code in statuses), statuses
        acked = sorted(i for code, ids in results if code == 201 for i in ids)
        assert len(acked) >= 8, statuses
        listed = httpx.get(s.url + "/gallery?limit=1000", headers=AUTH).json()
        assert sorted(it["id"] for it in listed["items"]) == acked
    finally:
        s.stop()
    s2 = serve(env, tmp_path, index=index, log="server2.log")
    try:
        listed = httpx.get(s2.url + "/gallery?limit=1000", headers=AUTH).json()
        assert sorted(it["id"] for it in listed["items"]) == acked
    finally:
        s2.stop()


# ------------------------------------------------------------- 7. unreadable class folder


def _unprivileged() -> list[str]:
    """A command prefix without the capabilities that let root read any folder."""
    if os.geteuid() != 0:
        return []
    import shutil

    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a chmod 000 folder stays readable")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", "--bounding-set", caps, "--inh-caps", caps]


def test_unreadable_class_folder_is_an_error_naming_it(env, tmp_path):
    """Row 7: a `chmod 000` class folder: exit 1 naming it; --skip-bad: a warning, exit 0.
    As root, run without the capabilities that read any folder (setpriv)."""
    root = tmp_path / "data"
    make_folder(root, n_classes=3, per_class=4, size=(16, 16), rgb=True)
    (root / "c1").chmod(0)
    prefix = _unprivileged()
    out = tmp_path / "idx"
    cmd = [*prefix, sys.executable, "-m", "tripletlab", "index", "--model", str(env["run"])]
    cmd += ["--data", str(root), "--out", str(out)]
    e = subprocess_env()
    try:
        r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=180)
        assert r.returncode == 1, (r.stdout, r.stderr[-2000:])
        assert "cannot read folder" in r.stderr and "c1" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        r = subprocess.run([*cmd, "--skip-bad"], env=e, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "unreadable folder" in r.stderr and "c1" in r.stderr, r.stderr
        assert "indexed 8 items" in r.stdout, r.stdout
    finally:
        (root / "c1").chmod(0o755)


def test_images_mode_rejected_in_decode_is_an_input_error():
    from tripletlab.errors import InputError
    from tripletlab.serve.images import decode_image

    with pytest.raises(InputError, match="mode LAB"):
        decode_image(lab_tiff(), max_pixels=1000, name="lab.tif")
    np.testing.assert_equal(decode_image(png(Image.new("RGB", (3, 2))), 100).size, (3, 2))


# ------------------------------------------------------------------------- minor rows


def test_bad_serve_options_exit_1_with_a_message(env, tmp_path):
    """--threshold nan, --port 70000 and a port in use: exit 1, a message, no traceback."""
    import socket

    run = str(env["run"])
    r = cli("serve", "--model", run, "--threshold", "nan", "--port", str(free_port()))
    assert r.returncode == 1 and "finite" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli("serve", "--model", run, "--port", "70000")
    assert r.returncode == 1 and "65535" in r.stderr and "Traceback" not in r.stderr, r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cli("serve", "--model", run, "--port", str(port))
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "cannot listen on 127.0.0.1" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_slow_clients_unauthenticated_bodies_and_redoc(env, tmp_path):
    """A client trickling its headers is closed after --header-timeout; a POST without a
    token gets its 401 before sending any of its (announced 5 MB) body; /redoc is off."""
    import socket

    s = serve(env, tmp_path, "--header-timeout", "1.5")
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
            t0 = time.monotonic()
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            try:
                while time.monotonic() - t0 < 8:  # one header byte a second: never complete
                    c.sendall(b"X")
                    time.sleep(0.5)
                    c.settimeout(0.5)
                    try:
                        if c.recv(1) == b"":
                            break
                    except TimeoutError:
                        pass
            except (BrokenPipeError, ConnectionResetError):
                pass
            closed_after = time.monotonic() - t0
        assert closed_after < 5, closed_after
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
            c.sendall(
                b"POST /gallery HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                b"boundary=xyz\r\nContent-Length: 5000000\r\n\r\n"
            )
            c.settimeout(5)
            head = c.recv(4096)
        assert head.startswith(b"HTTP/1.1 401"), head[:200]
        assert httpx.get(s.url + "/redoc").status_code == 404
        assert httpx.get(s.url + "/healthz").status_code == 200
    finally:
        s.stop()


def test_json_bombs_get_422_from_a_vector_model(tmp_path):
    """/embed with 100,000-deep nesting or a 400-digit integer: 422, the server stays up."""
    run = tmp_path / "digits"
    r = cli("train", "--steps", "3", "--out", str(run), "--quiet", "--no-report", "--no-eval")
    assert r.returncode == 0, r.stderr[-2000:]
    s = Server(["--model", str(run)], tmp_path / "server.log")
    try:
        deep = b'{"vectors": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        huge = b'{"vectors": [[' + b"9" * 400 + b"" + b", 0" * 63 + b"]]}"
        for body in (deep, huge):
            r = httpx.post(s.url + "/embed", content=body,
                           headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
            assert r.status_code == 422, (r.status_code, r.text[:300])
        ok = httpx.post(s.url + "/embed", json={"vectors": [[0.5] * 64]}, timeout=30)
        assert ok.status_code == 200, ok.text
    finally:
        s.stop()
