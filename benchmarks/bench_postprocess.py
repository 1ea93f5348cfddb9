"""Time and memory of retrieval post-processing at gallery sizes 10,000 and 100,000.

    python benchmarks/bench_postprocess.py                      # 10k and 100k, every method
    python benchmarks/bench_postprocess.py --sizes 10000 --queries 50

Vectors: a seeded mixture of Gaussian classes (50 items per class, dimension 128, cosine), as
an index of that many items searched by ``--queries`` held-out queries with k = 10 through
:class:`tripletlab.index.EmbeddingIndex` (exact flat, numpy backend: the same code path as
``tripletlab search`` and ``serve``). Per method: the build time (DBA augments the whole gallery
once), the search time per query and its extra over ``none``, and the peak resident memory of
a separate worker process (build + search). k-reciprocal re-ranking is exact and O(N^2) per
query; the index refuses it above ``RERANK_MAX_ITEMS`` (20,000), so at 100,000 it is timed
on the library function :func:`tripletlab.metrics.k_reciprocal_rerank` with one query.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

METHODS = ("none", "aqe:k=2", "dba:k=3", "dba+aqe:k=3", "rerank")


def make(n: int, n_queries: int, dim: int = 128, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_cls = max(2, n // 50)
    centres = rng.normal(size=(n_cls, dim)).astype(np.float32)
    y = rng.integers(0, n_cls, n + n_queries)
    x = centres[y] + 1.5 * rng.normal(size=(n + n_queries, dim)).astype(np.float32)
    return x[:n], x[n:]


def worker(n: int, method: str, n_queries: int) -> dict:
    import torch

    from tripletlab.index import EmbeddingIndex
    from tripletlab.index import embedding_index as ei
    from tripletlab.metrics import k_reciprocal_rerank

    torch.manual_seed(0)
    g, q = make(n, n_queries)
    out: dict = {"n": n, "method": method, "threads": torch.get_num_threads()}
    if method.startswith("rerank") and n > ei.RERANK_MAX_ITEMS:
        t0 = time.perf_counter()
        k_reciprocal_rerank(torch.from_numpy(q[:1]), torch.from_numpy(g), top_k=10)
        out.update(build_s=0.0, ms_per_query=1000 * (time.perf_counter() - t0), n_queries=1,
                   via="k_reciprocal_rerank (above the index's limit)")  # fmt: skip
    else:
        t0 = time.perf_counter()
        index = EmbeddingIndex(g.shape[1], metric="cosine", backend="numpy", postprocess=method)
        index.add(g)
        out["build_s"] = time.perf_counter() - t0
        nq = 5 if method.startswith("rerank") else n_queries
        t0 = time.perf_counter()
        index.search(q[:nq], 10)
        out.update(ms_per_query=1000 * (time.perf_counter() - t0) / nq, n_queries=nq,
                   via="EmbeddingIndex.search")  # fmt: skip
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--worker", nargs=2, metavar=("N", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(int(args.worker[0]), args.worker[1], args.queries)))
        return
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--worker", str(n), method, "--queries",
                   str(args.queries)]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode:
                print(res.stderr, file=sys.stderr)
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            base = next(r for r in rows if r["n"] == n and r["method"] == "none")
            r = rows[-1]
            r["extra_ms_per_query"] = r["ms_per_query"] - base["ms_per_query"]
            print(
                f"n={n:>7} {method:<12} build {r['build_s']:7.2f} s  search "
                f"{r['ms_per_query']:9.2f} ms/query (+{r['extra_ms_per_query']:8.2f})  peak "
                f"{r['peak_rss_mib']:7.0f} MiB  [{r['via']}, {r['n_queries']} queries, "
                f"{r['threads']} threads]",
                flush=True,
            )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
