"""Time retrieval_metrics against pytorch-metric-learning's AccuracyCalculator.

    python benchmarks/bench_metrics.py                     # 70,000 and 10,000 items
    python benchmarks/bench_metrics.py --sizes 70000 --skip-pml

Embeddings: Fashion-MNIST raw pixels (train + test, 70,000 images, parsed here from the idx.gz
files with gzip + numpy), times a fixed random projection 784 -> 128 (seeded); random Gaussian
data with 10 classes if ../shared/data/fashion-mnist is absent. A size n < 70,000 uses the first
n items. Leave-one-out, euclidean, nmi=False. pml's k is "max_bin_count" (the largest class
size minus one, 6,999 at 70k), so that both libraries' R-Precision and MAP@R are exact.

Each run is a separate worker process (its own peak RSS, and a memory limit so that a library
running out of memory fails alone instead of waking the system's OOM killer).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

_SHARED = os.environ.get("TRIPLETLAB_SHARED_DATA")
DATA = (
    Path(_SHARED) if _SHARED else Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
) / "fashion-mnist"
METRICS = ("precision_at_1", "r_precision", "map_at_r")


def read_idx_gz(path: Path) -> np.ndarray:
    """An MNIST idx file (gzip): big-endian magic (0, 0, dtype 0x08, ndim), dims, uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def embeddings(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """n x 128 float32 embeddings and int64 labels."""
    if DATA.exists():
        xs, ys = [], []
        for split in ("train", "t10k"):
            xs.append(read_idx_gz(DATA / f"{split}-images-idx3-ubyte.gz").reshape(-1, 784))
            ys.append(read_idx_gz(DATA / f"{split}-labels-idx1-ubyte.gz"))
        x = torch.from_numpy(np.concatenate(xs)[:n].astype(np.float32) / 255.0)
        y = torch.from_numpy(np.concatenate(ys)[:n].astype(np.int64))
        src = "Fashion-MNIST pixels x random 784->128"
    else:
        g = torch.Generator().manual_seed(0)
        x, y, src = torch.randn(n, 784, generator=g), torch.arange(n) % 10, "random Gaussian"
    proj = torch.randn(784, 128, generator=torch.Generator().manual_seed(0)) / 28.0
    return (x @ proj).contiguous(), y.contiguous(), src


def gemm_top1(emb: torch.Tensor) -> torch.Tensor:
    """The floor: the bare blocked similarity GEMM over the same (N, N) matrix, leave-one-out,
    keeping only each query's nearest neighbour (``tripletlab.distances.iter_score_blocks``)."""
    from tripletlab.distances import iter_score_blocks

    nn = torch.empty(emb.shape[0], dtype=torch.long)
    for s, e, sc in iter_score_blocks(emb, emb, "euclidean"):
        ar = torch.arange(s, e)
        sc[ar - s, ar] = float("inf")
        nn[s:e] = sc.argmin(dim=1)
    return nn


def worker(impl: str, n: int, threads: int = 0) -> dict:
    if threads:
        torch.set_num_threads(threads)
    emb, y, _ = embeddings(n)
    if impl == "gemm-top1":
        t = time.perf_counter()
        nn = gemm_top1(emb)
        sec = time.perf_counter() - t
        p1 = float((y[nn] == y).double().mean())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return {"time": sec, "values": [p1, float("nan"), float("nan")], "peak_rss_gib": rss}
    if impl == "tripletlab":
        from tripletlab.metrics import retrieval_metrics

        t = time.perf_counter()
        m = retrieval_metrics(emb, y, ks=(1,), distance="euclidean", nmi=False)
        sec = time.perf_counter() - t
        vals = [m[k] for k in METRICS]
    else:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(
            include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
            k="max_bin_count",
            device=torch.device("cpu"),
        )
        t = time.perf_counter()
        m = calc.get_accuracy(emb, y)
        sec = time.perf_counter() - t
        vals = [m["precision_at_1"], m["r_precision"], m["mean_average_precision_at_r"]]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"time": sec, "values": vals, "peak_rss_gib": rss}


def run_worker(impl: str, n: int, mem_gib: float, timeout: float, threads: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--sizes", str(n), "--threads", str(threads)]

    def limit() -> None:
        cap = int(mem_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, preexec_fn=limit, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:.0f} s"}
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["killed"])[-1]
        if proc.returncode in (-9, 137) or "memory" in err.lower() or "alloc" in err.lower():
            return {"error": f"out of memory (limit {mem_gib:g} GiB): {err[:80]}"}
        return {"error": err[:100]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="70000,10000", help="comma-separated item counts")
    p.add_argument("--skip-pml", action="store_true", help="time tripletlab only")
    p.add_argument("--mem-gib", type=float, default=16.0, help="memory limit per worker")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker")
    p.add_argument(
        "--floor",
        action="store_true",
        help="also time the floor (bare blocked GEMM + top-1 over the same matrix) before and "
        "after tripletlab, and print tripletlab's time / the floor's mean",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: default)")
    p.add_argument("--worker", choices=["tripletlab", "pml", "gemm-top1"], help=argparse.SUPPRESS)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker, sizes[0], args.threads)))
        return 0
    _, _, src = embeddings(10)
    print(f"embeddings: {src}; D = 128; torch threads {torch.get_num_threads()}")
    head = f"| N | implementation | time (s) | peak RSS (GiB) | {' | '.join(METRICS)} | agree |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for n in sizes:
        impls = ["tripletlab"] + ([] if args.skip_pml else ["pml"])
        floors = []
        if args.floor:
            floors.append(run_worker("gemm-top1", n, args.mem_gib, args.timeout, args.threads))
        res = {
            impl: run_worker(impl, n, args.mem_gib, args.timeout, args.threads) for impl in impls
        }
        if args.floor:
            floors.append(run_worker("gemm-top1", n, args.mem_gib, args.timeout, args.threads))
            ok = [f["time"] for f in floors if "time" in f]
            if ok and "time" in res["tripletlab"]:
                fl = sum(ok) / len(ok)
                times = ", ".join(f"{t:.1f}" for t in ok)
                print(
                    f"floor (blocked GEMM + top-1, N = {n:,}): {times} s; "
                    f"peak RSS {floors[0].get('peak_rss_gib', float('nan')):.2f} GiB; "
                    f"tripletlab / floor = {res['tripletlab']['time'] / fl:.2f}x",
                    flush=True,
                )
        ours = res["tripletlab"]
        for impl, r in res.items():
            name = "tripletlab retrieval_metrics" if impl == "tripletlab" else "pml AccuracyCalc."
            if "error" in r:
                rows.append(f"| {n:,} | {name} | {r['error']} | | | | | |")
                continue
            agree = ""
            if impl == "pml" and "values" in ours:
                diff = max(abs(a - b) for a, b in zip(r["values"], ours["values"], strict=True))
                agree = f"{'yes' if diff < 1e-4 else 'NO'} (max diff {diff:.1e})"
            vals = " | ".join(f"{v:.4f}" for v in r["values"])
            rows.append(
                f"| {n:,} | {name} | {r['time']:.1f} | {r['peak_rss_gib']:.2f} | {vals} | {agree} |"
            )
        print("\n".join(rows[-len(res) :]), flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
