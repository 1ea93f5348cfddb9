"""Small-batch per-call time of ``TripletLoss`` across source revisions, interleaved in ONE process.

Why: at B = 64-256 a training step of the loss costs a few hundred µs, so two separate runs on a
shared machine differ by more than the change being measured. This script exports each git
revision's ``src/`` (``git archive``) into a temporary directory, imports every copy of
``tripletlab`` side by side in this process (each under its own module objects), optionally adds
pytorch-metric-learning, and times one training step of each — ``zero_grad; e =
normalize(lin(x)); loss = f(e, y); loss.backward()``, the step of ``bench_mining.py`` — in
rotated order, repetition after repetition, so a load change hits all of them alike. It prints
the median µs per call and the ratio to the first revision, and checks that every revision gives
the same loss and weight gradient (relative 1e-4; pml only where its semantics agree: ``hard``
and ``all``; not for the unseeded ``random`` and ``distance-weighted``).

Usage (from the repository root)::

    python benchmarks/small_batch_ab.py --revs ff23ab0 HEAD --pml
    python benchmarks/small_batch_ab.py --revs HEAD~3 WORKTREE --sizes 64 --strategies hard

``WORKTREE`` means the working tree's ``src/`` as it is (uncommitted changes included).
Times are wall-clock (``time.perf_counter``) medians by default; ``--cpu-time`` uses the
thread's CPU time instead, which a busy machine's descheduling does not inflate.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAME_AS_PML = ("hard", "all")  # pml's semi-hard keeps every semi-hard triplet: not comparable
RANDOMISED = ("random", "distance-weighted")  # unseeded draws: values are not compared


def export_src(rev: str, dest: Path) -> Path:
    """``src/`` of ``rev`` (or the working tree for ``WORKTREE``) as an importable directory."""
    if rev == "WORKTREE":
        return ROOT / "src"
    out = dest / rev.replace("/", "_").replace("~", "-").replace("^", "-")
    out.mkdir(parents=True, exist_ok=True)
    tar = dest / "src.tar"
    with tar.open("wb") as fh:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], stdout=fh, check=True)
    with tarfile.open(tar) as tf:
        tf.extractall(out, filter="data")
    return out / "src"


def import_tripletlab(src: Path):
    """A fresh ``tripletlab`` imported from ``src`` (earlier copies stay usable: their functions
    keep references to their own module objects)."""
    for name in [m for m in sys.modules if m == "tripletlab" or m.startswith("tripletlab.")]:
        del sys.modules[name]
    sys.path.insert(0, str(src))
    try:
        mod = importlib.import_module("tripletlab")
        importlib.import_module("tripletlab.losses")
    finally:
        sys.path.remove(str(src))
    return mod


def pml_loss(strategy: str, margin: float):
    from pytorch_metric_learning import distances, losses, miners

    dist = distances.LpDistance(normalize_embeddings=False)
    loss = losses.TripletMarginLoss(margin, distance=dist)
    if strategy == "hard":
        miner = miners.BatchHardMiner(distance=dist)
    else:
        miner = miners.TripletMarginMiner(margin, type_of_triplets=strategy, distance=dist)
    return lambda e, y: loss(e, y, miner(e, y))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--revs", nargs="+", default=["HEAD"], help="git revisions (or WORKTREE)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--strategies", nargs="+", default=["hard", "semihard", "all"])
    p.add_argument("--pml", action="store_true", help="add pytorch-metric-learning")
    p.add_argument("--calls", type=int, default=40, help="calls per sample (median of them)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved samples per function")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("--cpu-time", action="store_true", help="thread CPU time, not wall-clock")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        mods = [import_tripletlab(export_src(r, Path(tmp))) for r in args.revs]
    names = list(args.revs)
    print(
        f"small_batch_ab: D={args.dim}, K={args.k}, {args.threads} thread(s), "
        f"median of {args.rounds} interleaved samples x median of {args.calls} calls, "
        f"{'thread CPU time' if args.cpu_time else 'wall-clock'}; torch {torch.__version__}"
    )
    bad = 0
    for b in args.sizes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, args.dim, generator=g)
        y = torch.arange(b // args.k).repeat_interleave(args.k)
        y = y[torch.randperm(y.numel(), generator=g)]
        x = x[: y.numel()]
        lin = torch.nn.Linear(args.dim, args.dim)

        def step(f, lin=lin, x=x, y=y):
            lin.zero_grad(set_to_none=True)
            f(torch.nn.functional.normalize(lin(x), dim=1), y).backward()

        for strategy in args.strategies:
            fns = [m.TripletLoss(args.margin, strategy=strategy) for m in mods]
            labels = list(names)
            if args.pml and strategy in ("hard", "semihard", "all"):
                fns.append(pml_loss(strategy, args.margin))
                labels.append("pml")
            checks = []
            for f in fns:
                step(f)
                loss = float(f(torch.nn.functional.normalize(lin(x), dim=1), y).detach())
                checks.append((loss, float(lin.weight.grad.norm())))
            ref = checks[0]
            for lab, c in zip(labels, checks, strict=True):
                if strategy in RANDOMISED or (lab == "pml" and strategy not in SAME_AS_PML):
                    continue
                if any(abs(u - v) > 1e-4 * max(abs(v), 1e-12) for u, v in zip(c, ref, strict=True)):
                    print(f"  VALUES DIFFER: {lab} {c} vs {labels[0]} {ref}")
                    bad += 1
            times: dict[str, list[float]] = {lab: [] for lab in labels}
            for r in range(args.rounds):
                order = list(range(len(fns)))
                order = order[r % len(order) :] + order[: r % len(order)]
                for i in order:
                    step(fns[i])
                    ts = []
                    for _ in range(args.calls):
                        t0 = clock()
                        step(fns[i])
                        ts.append(clock() - t0)
                    times[labels[i]].append(statistics.median(ts))
            med = {lab: statistics.median(v) * 1e6 for lab, v in times.items()}
            first = med[labels[0]]
            cells = "  ".join(
                f"{lab} {med[lab]:7.0f} us ({med[lab] / first:4.2f})" for lab in labels
            )
            print(f"B={b:4d} {strategy:<17} {cells}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
