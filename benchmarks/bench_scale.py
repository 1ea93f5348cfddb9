"""Scaling benchmarks of issue #11 (figures in README "Scaling out" and docs/scaling.md).

``mining``: the per-rank work of sharded global mining (:class:`DistributedTripletLoss`): one
rank's forward + backward of its B/W anchors against the gathered global batch of B embeddings
(distance matrix, mining, loss), for W in ``--worlds``. It runs the rank's computation in this one
process (``triplet_loss_from_distances`` on the (B/W, B) block, exactly what each rank runs), so
it measures the compute each rank does, not gloo's communication; on a 2-core machine W real
processes would just share the 2 cores.

``index``: flat (exact) vs IVF-PQ on N synthetic 128-d vectors (a mixture of Gaussians, so
neighbours are meaningful): build time, index memory (faiss serialised size), recall@10 against
exact search and queries per second.

Usage::

    python benchmarks/bench_scale.py mining --batch 4096 --worlds 1 2 4
    python benchmarks/bench_scale.py index --n 1000000 --dim 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch


def bench_mining(batch: int, worlds: list[int], k: int, dim: int, strategy: str, repeats: int):
    from tripletlab.distances import pairwise_distance
    from tripletlab.functional import triplet_loss_from_distances

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(batch // k).repeat_interleave(k)[torch.randperm(batch, generator=g)]
    emb = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=1)
    rows = []
    for w in worlds:
        b = batch // w
        times = []
        for _ in range(repeats + 1):
            cols = emb.clone().requires_grad_(True)  # the gathered batch, own slice first
            own = cols[:b]
            t0 = time.perf_counter()
            d = pairwise_distance(own, cols, "euclidean")
            loss, _ = triplet_loss_from_distances(
                d, labels[:b], labels, strategy=strategy, reduction="sum", exclude_self=True
            )
            loss.backward()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times[1:])
        rows.append({"world": w, "rows_per_rank": b, "cols": batch, "ms_per_rank": 1000 * med})
    base = rows[0]["ms_per_rank"]
    for r in rows:
        r["speedup_vs_w1"] = base / r["ms_per_rank"]
    return rows


def bench_index(n: int, dim: int, n_queries: int, nlist: int, nprobe: int, pq_m: int):
    from tripletlab.index import EmbeddingIndex, search_quality

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(1000, dim)).astype(np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        x[s:e] = centers[rng.integers(0, 1000, e - s)] + 0.5 * rng.normal(size=(e - s, dim))
    rows = []
    for kind, kw in (("flat", {}), ("ivfpq", {"ivf_nlist": nlist, "nprobe": nprobe, "pq_m": pq_m})):
        index = EmbeddingIndex(dim, metric="euclidean", kind=kind, **kw)
        t0 = time.perf_counter()
        index.add(x)
        build = time.perf_counter() - t0
        import faiss

        mem = faiss.serialize_index(index._index).nbytes
        q = search_quality(index, x, n_queries=n_queries, k=10)
        rows.append(
            {
                "kind": kind,
                "n": n,
                "build_s": build,
                "index_mib": mem / 2**20,
                "recall_at_10": q["recall_at_k"],
                "queries_per_s": 1000.0 / q["ms_per_query"],
                **kw,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("mining")
    m.add_argument("--batch", type=int, default=4096)
    m.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    m.add_argument("--k", type=int, default=4)
    m.add_argument("--dim", type=int, default=128)
    m.add_argument("--strategy", default="semihard")
    m.add_argument("--repeats", type=int, default=3)
    i = sub.add_parser("index")
    i.add_argument("--n", type=int, default=1_000_000)
    i.add_argument("--dim", type=int, default=128)
    i.add_argument("--queries", type=int, default=1000)
    i.add_argument("--nlist", type=int, default=1024)
    i.add_argument("--nprobe", type=int, default=16)
    i.add_argument("--pq-m", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what == "mining":
        rows = bench_mining(args.batch, args.worlds, args.k, args.dim, args.strategy, args.repeats)
    else:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        rows = bench_index(args.n, args.dim, args.queries, args.nlist, args.nprobe, args.pq_m)
    for r in rows:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
