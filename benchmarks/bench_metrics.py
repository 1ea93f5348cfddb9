"""Time retrieval_metrics on 70,000 x 128 embeddings against pml's AccuracyCalculator.

    python benchmarks/bench_metrics.py [--n 70000] [--skip-pml]

Embeddings: Fashion-MNIST (train + test, 70,000 images) raw pixels times a fixed random
projection 784 -> 128 (random Gaussian data if ../shared/data is absent). k is the largest class
size (7,000) so R-Precision and MAP@R are exact for both libraries.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tripletlab.metrics import retrieval_metrics

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fashion-mnist"


def embeddings(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    if DATA.exists():
        from tripletlab.data import load_dataset

        ds = load_dataset(str(DATA))
        x, y, src = ds.x.flatten(1), ds.y, "Fashion-MNIST pixels x random 784->128"
    else:
        g = torch.Generator().manual_seed(0)
        x, y, src = torch.randn(n, 784, generator=g), torch.arange(n) % 10, "random"
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(x.shape[1], 128, generator=g) / 28.0
    return (x[:n] @ proj).contiguous(), y[:n].contiguous(), src


def run_pml(n: int) -> tuple:
    """pml's AccuracyCalculator on the same embeddings, in a subprocess (it may run out of
    memory: its k-NN holds all N x k neighbours and several N x k label/float tensors)."""
    import json
    import subprocess

    cmd = [sys.executable, __file__, "--pml-worker", "--n", str(n)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        why = (
            "killed: out of memory"
            if proc.returncode in (-9, 137)
            else (proc.stderr.strip().splitlines() or ["failed"])[-1][:50]
        )
        return (f"pml AccuracyCalculator ({why})", float("nan"), *[float("nan")] * 3)
    sec, p1, rp, mapr = json.loads(proc.stdout.strip().splitlines()[-1])
    return ("pml AccuracyCalculator", sec, p1, rp, mapr)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=70000)
    p.add_argument("--skip-pml", action="store_true")
    p.add_argument("--pml-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.pml_worker:
        import json

        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        emb, y, _ = embeddings(args.n)
        calc = AccuracyCalculator(
            include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
            k="max_bin_count",
            device=torch.device("cpu"),
        )
        t = time.perf_counter()
        m = calc.get_accuracy(emb, y)
        print(
            json.dumps(
                [
                    time.perf_counter() - t,
                    m["precision_at_1"],
                    m["r_precision"],
                    m["mean_average_precision_at_r"],
                ]
            )
        )
        return 0
    emb, y, src = embeddings(args.n)
    print(
        f"{emb.shape[0]} x {emb.shape[1]} embeddings ({src}), {len(y.unique())} classes, "
        f"torch threads {torch.get_num_threads()}"
    )
    rows = []
    t = time.perf_counter()
    ours = retrieval_metrics(emb, y, ks=(1,), distance="euclidean", nmi=False)
    rows.append(
        (
            "tripletlab retrieval_metrics",
            time.perf_counter() - t,
            ours["precision_at_1"],
            ours["r_precision"],
            ours["map_at_r"],
        )
    )
    peak_ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"tripletlab: {rows[0][1]:.1f} s, peak RSS {peak_ours:.2f} GiB", flush=True)
    if not args.skip_pml:
        rows.append(run_pml(args.n))
    print(f"{'implementation':<32} {'time (s)':>9} {'P@1':>8} {'R-Prec':>8} {'MAP@R':>8}")
    for name, sec, p1, rp, mapr in rows:
        print(f"{name:<32} {sec:>9.1f} {p1:>8.4f} {rp:>8.4f} {mapr:>8.4f}")
    if len(rows) == 2 and np.isfinite(rows[1][1]):
        print(
            f"speed-up {rows[1][1] / rows[0][1]:.1f}x; max |difference| "
            f"{max(abs(a - b) for a, b in zip(rows[0][2:], rows[1][2:], strict=True)):.2e}"
        )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
