"""Load a running server with concurrent search requests and report latency and throughput.

Usage::

    python -m tripletlab.serve.loadtest --url http://127.0.0.1:8000 --clients 16 \\
        --requests 50 --k 5 IMAGE [IMAGE ...]

Each client (a thread with its own HTTP connection) sends ``requests`` searches, cycling through
the images. Prints p50/p99 latency, throughput and the error count as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

__all__ = ["run_load"]


def run_load(
    url: str,
    images: list[str | Path],
    clients: int = 16,
    requests: int = 50,
    k: int = 5,
    token: str | None = None,
    timeout_s: float = 60.0,
) -> dict:
    """``clients`` threads x ``requests`` POST /search each; returns ``n``, ``errors``,
    ``p50_ms``, ``p99_ms``, ``mean_ms``, ``wall_s`` and ``throughput_rps``.

    Example:
        >>> run_load("http://127.0.0.1:8000", ["q.png"], clients=4, requests=10)  # doctest: +SKIP
        {'n': 40, 'errors': 0, 'p50_ms': ..., ...}
    """
    import httpx

    payloads = [(Path(p).name, Path(p).read_bytes()) for p in images]
    if not payloads:
        raise ValueError("give at least one image")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(ci: int) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=timeout_s) as c:
            start.wait()
            for r in range(requests):
                name, data = payloads[(ci * requests + r) % len(payloads)]
                t = time.perf_counter()
                try:
                    resp = c.post("/search", files={"image": (name, data)}, data={"k": str(k)})
                    ok = resp.status_code == 200 and len(resp.json()["neighbours"]) > 0
                    err = None if ok else f"{resp.status_code}: {resp.text[:200]}"
                except Exception as e:  # noqa: BLE001 - counted, not raised
                    err = f"{type(e).__name__}: {e}"
                dt = time.perf_counter() - t
                with lock:
                    lat.append(dt)
                    if err:
                        errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    a = np.asarray(lat) * 1000
    return {
        "clients": clients,
        "requests_per_client": requests,
        "n": int(a.size),
        "errors": len(errors),
        "first_errors": errors[:3],
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "wall_s": wall,
        "throughput_rps": a.size / wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tripletlab.serve.loadtest", description=__doc__)
    p.add_argument("images", nargs="+")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("-k", "--k", type=int, default=5)
    p.add_argument("--token", default=None)
    args = p.parse_args(argv)
    r = run_load(args.url, args.images, args.clients, args.requests, args.k, args.token)
    print(json.dumps(r, indent=2))
    return 0 if r["errors"] == 0 else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
