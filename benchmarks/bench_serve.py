"""Load figures of `tripletlab serve` (eager torch and onnxruntime) and the ONNX export check,
as in docs/serving.md.

    python benchmarks/bench_serve.py --model runs/faces --data ../shared/data/att_faces \\
        --clients 16 --requests 50 --threads 1

Builds a gallery index of photos 1-7 of every class of --data (`tripletlab index`), starts
`tripletlab serve` on a free loopback port for each runtime, sends --clients x --requests
searches of photos 8-10 (`tripletlab.serve.loadtest`), and prints a markdown table plus the
`tripletlab export --check-data` result.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tripletlab", "serve", *args, "--port", str(port)],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start")


def main(argv: list[str] | None = None) -> int:
    from tripletlab.cli import main as cli
    from tripletlab.serve.loadtest import run_load

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="ROOT/<class>/<photos 1..10>")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runtimes", default="torch,onnx")
    args = p.parse_args(argv)
    root = Path(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        gallery, queries = tmp / "gallery", []
        for cls in sorted(d for d in root.iterdir() if d.is_dir()):
            files = sorted(cls.iterdir(), key=lambda f: (len(f.name), f.name))
            (gallery / cls.name).mkdir(parents=True)
            for f in files[:7]:
                os.symlink(f.resolve(), gallery / cls.name / f.name)
            queries += files[7:10]
        with redirect_stdout(io.StringIO()):
            cli(["index", "--model", args.model, "--data", str(gallery), "--out", str(tmp / "idx")])
        rows = []
        for rt in args.runtimes.split(","):
            proc, url = _serve(
                [
                    "--model",
                    args.model,
                    "--index",
                    str(tmp / "idx"),
                    "--runtime",
                    rt,
                    "--threads",
                    str(args.threads),
                ],
                tmp / f"{rt}.log",
            )
            try:
                run_load(url, queries[:16], clients=4, requests=5)  # warm-up
                r = run_load(url, queries, clients=args.clients, requests=args.requests)
                import httpx

                m = httpx.get(url + "/metrics").json()["batching"]
            finally:
                proc.terminate()
                proc.wait(30)
            r["runtime"], r["mean_batch"] = rt, m["mean_batch"]
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
        n_gallery = sum(not f.is_dir() for f in gallery.rglob("*"))
        print(
            f"gallery {n_gallery} items; {len(queries)} query photos; "
            f"{args.clients} clients x {args.requests} searches (k=5), {args.threads} thread(s)"
        )
        print("| runtime | requests | errors | p50 ms | p99 ms | throughput req/s | mean batch |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['runtime']} | {r['n']} | {r['errors']} | {r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {r['throughput_rps']:.1f} | {r['mean_batch']:.1f} |"
            )
        buf = io.StringIO()
        with redirect_stdout(buf):
            cli(
                [
                    "export",
                    "--model",
                    args.model,
                    "--out",
                    str(tmp / "m.onnx"),
                    "--check-data",
                    str(root),
                    "--threads",
                    str(args.threads),
                ]
            )
        print(buf.getvalue().strip())
        return 0 if all(r["errors"] == 0 for r in rows) else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
