"""``serve`` latency with and without ``--faces`` (issue #26), as a real server process.

One run trained with ``--faces`` (e.g. ``benchmarks/faces_scene_verification.py``'s
``arcface64``), two galleries of the same people (``index --faces`` as the run, and
``index --faces none``), and the same posted photos (640x480 scenes): ``/search`` answered by
``serve`` with the run's ``--faces`` (detect, align, embed, search) and with ``--faces none``
(the whole photo embedded). Sequential requests (1 client) give the latency of one photo;
4 clients show what the micro-batcher makes of concurrent ones.

    W=/work/cache/face_scenes
    PYTHONPATH=src python benchmarks/faces_serve_latency.py --model $W/runs/arcface64 \\
        --gallery $W/crops/att_test --queries $W/scenes/att_test
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tripletlab.serve.loadtest import run_load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tl(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "tripletlab", *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def serve_and_load(model: Path, index: Path, faces: str, images: list[str], threads: int,
                   requests: int, clients: tuple[int, ...]) -> dict:  # fmt: skip
    port = free_port()
    env = {**os.environ, "TRIPLETLAB_TOKEN": "bench-token"}
    cmd = [sys.executable, "-m", "tripletlab", "serve", "--model", str(model),
           "--index", str(index), "--port", str(port), "--threads", str(threads),
           "--faces", faces]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError("the server did not start")
        run_load(url, images[:4], clients=1, requests=4, token="bench-token")  # warm up
        out = {}
        for c in clients:
            r = run_load(url, images, clients=c, requests=requests, token="bench-token")
            out[f"clients_{c}"] = {k: r[k] for k in ("n", "errors", "p50_ms", "p99_ms",
                                                     "throughput_rps")}  # fmt: skip
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--gallery", type=Path, required=True)
    ap.add_argument("--queries", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/work/cache/faces_serve_latency"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=25, help="per client")
    args = ap.parse_args(argv)
    run_faces = (json.loads((args.model / "config.json").read_text())["train"] or {}).get("faces")
    images = sorted(str(p) for p in args.queries.rglob("*.png"))[:50]
    rows = {}
    for faces in (run_faces or "arcface", "none"):
        index = args.work / f"index_{faces}"
        if not index.exists():
            tl("index", "--model", str(args.model), "--data", str(args.gallery), "--out",
               str(index), "--faces", faces)  # fmt: skip
        rows[faces] = serve_and_load(args.model, index, faces, images, args.threads,
                                     args.requests, (1, 4))  # fmt: skip
        print(faces, json.dumps(rows[faces]), flush=True)
    a, b = rows[run_faces or "arcface"]["clients_1"], rows["none"]["clients_1"]
    print(f"1 client: p50 {a['p50_ms']:.0f} ms with --faces vs {b['p50_ms']:.0f} ms without "
          f"({a['p50_ms'] / b['p50_ms']:.2f}x)")  # fmt: skip
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "latency.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
