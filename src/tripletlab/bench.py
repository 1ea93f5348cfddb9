"""Benchmark: forward + backward time and peak memory of triplet mining, against
pytorch-metric-learning (pml) and the GEMM floor, on identical inputs.

Every configuration runs in its own subprocess, so its peak memory (``ru_maxrss`` after the runs
minus ``ru_maxrss`` after imports and input creation) is its own. Inputs: ``B`` samples, ``K`` per
class, ``D = 128``, embeddings = L2-normalise(Linear(128, 128)(x)) so the backward pass is real.

Usage: ``tripletlab bench [--quick] [--sizes 256 1024 ...] [--strategies all ...] [--json F]``
or ``python benchmarks/bench_mining.py ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

__all__ = ["run_benchmark"]

# implementation name -> (strategy, description, semantics group for value agreement)
IMPLS = {
    "tripletlab": "tripletlab TripletLoss",
    "pml": "pytorch-metric-learning miner + TripletMarginLoss",
    "dense-tfa": "dense TF-Addons-style semi-hard (O(B^3) memory)",
    "floor-gemm": "floor: (E @ E.T).sum() forward + backward",
    "floor-dist": "floor: tripletlab euclidean distance matrix forward + backward",
}


def _estimate_gib(impl: str, strategy: str, b: int) -> float:
    """Rough peak-memory estimate, used to skip configurations that cannot fit."""
    if impl == "pml" and strategy in ("all", "semihard"):
        return b**3 * 2.5 / 2**30  # B^3 bool masks + index tensors of all candidate triplets
    if impl == "dense-tfa":
        return b**3 * 4 * 4 / 2**30  # several (B*B, B) float32 tiles
    return 12 * b * b * 4 / 2**30


def _inputs(b: int, d: int, k: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g)
    labels = torch.arange(b // k).repeat_interleave(k)[:b]
    perm = torch.randperm(b, generator=g)
    lin = torch.nn.Linear(d, d)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d, d, generator=g) / d**0.5)
        lin.bias.zero_()
    return x[perm], labels[perm], lin


def _dense_tfa_semihard(emb, labels, margin):
    """TF-Addons ``triplet_semihard_loss`` semantics, computed densely like TF-Addons does."""
    import torch

    from tripletlab.distances import pairwise_distance

    d = pairwise_distance(emb)
    b = d.shape[0]
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(b, dtype=torch.bool)
    neg = ~same
    # (a, p, n): candidates n with d(a,n) > d(a,p)
    d_an = d[:, None, :].expand(b, b, b)
    outside = neg[:, None, :] & (d_an > d[:, :, None])
    inf = torch.tensor(float("inf"))
    semi = torch.where(outside, d_an, inf).min(dim=2).values
    far = torch.where(neg, d, -inf).max(dim=1).values[:, None].expand(b, b)
    chosen = torch.where(outside.any(dim=2), semi, far)
    losses = torch.relu(d - chosen + margin)
    valid = pos & neg.any(dim=1, keepdim=True)
    return losses[valid].mean()


def _make_step(impl: str, strategy: str, margin: float):

    from tripletlab import TripletLoss
    from tripletlab.distances import pairwise_distance

    if impl == "tripletlab":
        red = {"all": "mean_active", "semihard": "mean", "hard": "mean_active"}[strategy]
        fn = TripletLoss(margin=margin, strategy=strategy, reduction=red)
        return lambda e, y: fn(e, y)
    if impl == "floor-gemm":
        return lambda e, y: (e @ e.t()).sum()
    if impl == "floor-dist":
        return lambda e, y: pairwise_distance(e).sum()
    if impl == "dense-tfa":
        return lambda e, y: _dense_tfa_semihard(e, y, margin)
    if impl == "pml":
        from pytorch_metric_learning import distances, losses, miners

        dist = distances.LpDistance(normalize_embeddings=False)
        loss = losses.TripletMarginLoss(margin=margin, distance=dist)
        if strategy == "hard":
            miner = miners.BatchHardMiner(distance=dist)
        else:
            miner = miners.TripletMarginMiner(
                margin=margin, type_of_triplets=strategy, distance=dist
            )
        return lambda e, y: loss(e, y, miner(e, y))
    raise ValueError(impl)


def _worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    x, y, lin = _inputs(spec["b"], spec["d"], spec["k"])
    step_fn = _make_step(spec["impl"], spec["strategy"], spec["margin"])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        lin.zero_grad(set_to_none=True)
        e = torch.nn.functional.normalize(lin(x), dim=1)
        loss = step_fn(e, y)
        loss.backward()
        return float(loss.detach())

    value = step()  # warm-up
    times = []
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "time_s": statistics.median(times),
        "times": times,
        "loss": value,
        "extra_mib": (peak - base) / 1024.0,
    }


def _run_one(spec: dict, timeout: float) -> dict:
    est = _estimate_gib(spec["impl"], spec["strategy"], spec["b"])
    if est > spec["mem_cap_gib"]:
        return {"status": f"skipped: would need ~{est:.0f} GiB"}
    if spec["impl"] == "pml":
        try:
            import pytorch_metric_learning  # noqa: F401
        except ImportError:
            return {"status": "skipped: pytorch-metric-learning not installed (bench extra)"}
    cmd = [sys.executable, "-m", "tripletlab.bench", "--worker", json.dumps(spec)]
    env = dict(os.environ)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout (> {timeout:.0f} s)"}
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["?"]
        killed = proc.returncode < 0 or "MemoryError" in proc.stderr
        return {"status": ("out of memory" if killed else "failed") + f": {tail[0][:80]}"}
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"status": "failed: no result"}
    res["status"] = "ok"
    return res


def _plan(strategies, sizes):
    out = []
    for b in sizes:
        out.append(("floor", "floor-gemm", b))
        out.append(("floor", "floor-dist", b))
        for s in strategies:
            out.append((s, "tripletlab", b))
            out.append((s, "pml", b))
            if s == "semihard":
                out.append((s, "dense-tfa", b))
    return out


def _fmt_table(rows: list[dict]) -> str:
    head = (
        f"{'strategy':<9} {'B':>5} {'implementation':<12} {'time (s)':>9} {'extra MiB':>10} "
        f"{'peer/tl time':>12} {'peer/tl mem':>11} {'tl/GEMM':>8} {'tl/dist':>8} "
        f"{'loss':>9}  status"
    )
    lines = [head, "-" * len(head)]
    for r in rows:

        def f(v, spec):
            width = int(spec.split(".")[0])
            return format(v, spec) if isinstance(v, (int, float)) else "-".rjust(width)

        lines.append(
            f"{r['strategy']:<9} {r['b']:>5} {r['impl']:<12} {f(r.get('time_s'), '9.4f')} "
            f"{f(r.get('extra_mib'), '10.0f')} {f(r.get('peer_time_ratio'), '12.1f')} "
            f"{f(r.get('peer_mem_ratio'), '11.1f')} {f(r.get('vs_gemm'), '8.2f')} "
            f"{f(r.get('vs_dist'), '8.2f')} {f(r.get('loss'), '9.5f')}  {r['status']}"
            + (f" ({r['agree']})" if r.get("agree") else "")
        )
    return "\n".join(lines)


def run_benchmark(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; returns an exit code."""
    p = argparse.ArgumentParser(prog="tripletlab bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="B in {64, 256}, 2 repeats")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    p.add_argument(
        "--strategies",
        nargs="+",
        default=["all", "semihard", "hard"],
        choices=["all", "semihard", "hard"],
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up (5)")
    p.add_argument("--k", type=int, default=4, help="samples per class (4)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument(
        "--mem-cap-gib",
        type=float,
        default=8.0,
        help="skip configurations estimated to need more (8)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per configuration")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--json", dest="json_out", default=None, help="also write results as JSON")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    sizes, repeats = ([64, 256], 2) if args.quick else (args.sizes, args.repeats)
    rows = []
    t0 = time.time()
    for strategy, impl, b in _plan(args.strategies, sizes):
        spec = {
            "impl": impl,
            "strategy": strategy if strategy != "floor" else "all",
            "b": b,
            "d": args.dim,
            "k": args.k,
            "margin": args.margin,
            "repeats": repeats,
            "mem_cap_gib": args.mem_cap_gib,
            "threads": args.threads,
        }
        res = _run_one(spec, args.timeout)
        rows.append({"strategy": strategy, "impl": impl, "b": b, **res})
        print(
            f"  {strategy:<9} B={b:<5} {impl:<12} {res.get('status')}"
            + (f" {res['time_s']:.4f}s" if "time_s" in res else ""),
            file=sys.stderr,
        )
    # ratios within the same run
    by = {(r["strategy"], r["impl"], r["b"]): r for r in rows}
    for r in rows:
        if r["strategy"] == "floor" or r.get("status") != "ok":
            continue
        tl = by.get((r["strategy"], "tripletlab", r["b"]))
        if r["impl"] == "tripletlab":
            for key, fl in (("vs_gemm", "floor-gemm"), ("vs_dist", "floor-dist")):
                f = by.get(("floor", fl, r["b"]))
                if f and f.get("status") == "ok":
                    r[key] = r["time_s"] / f["time_s"]
        elif tl and tl.get("status") == "ok":
            r["peer_time_ratio"] = r["time_s"] / tl["time_s"]
            r["peer_mem_ratio"] = r["extra_mib"] / max(tl["extra_mib"], 1.0)
            same_semantics = (r["impl"] == "pml" and r["strategy"] in ("all", "hard")) or (
                r["impl"] == "dense-tfa"
            )
            if same_semantics:
                ok = abs(r["loss"] - tl["loss"]) <= 1e-4 * max(1.0, abs(tl["loss"]))
                r["agree"] = "loss agrees" if ok else f"LOSS DIFFERS from {tl['loss']:.6f}"
            else:
                r["agree"] = "different semantics"
    print(
        f"tripletlab bench: D={args.dim}, K={args.k}, margin={args.margin}, "
        f"median of {repeats} runs after a warm-up; threads={args.threads or 'default'}; "
        f"{time.time() - t0:.0f} s"
    )
    print(_fmt_table(rows))
    if args.json_out:
        from .utils import atomic_write_json

        atomic_write_json(args.json_out, {"args": vars(args), "rows": rows})
    disagree = [r for r in rows if "DIFFERS" in str(r.get("agree", ""))]
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(run_benchmark())
